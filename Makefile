# quorumd developer targets. Every target creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck unit bgp-test upgrade-test soak bench bench-backup bench-scale chaos clean dockerd image compose-test systemd-test

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/quorumd demo --nodes 3

lint: $(STAMP)
	$(BIN)/ruff check raft api node tests bench
	$(BIN)/ruff format --check raft api node tests bench

# mypy cannot follow the editable install's import hook, so it reads a symlinked package tree.
typecheck: $(STAMP)
	mkdir -p .typecheck/quorumd
	for p in raft api node; do ln -sfn $(CURDIR)/$$p .typecheck/quorumd/$$p; done
	cd .typecheck && MYPYPATH=. $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p quorumd.raft -p quorumd.api -p quorumd.node

unit: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadgroup -m "not bgp" tests

# The BGP speaker on the wire: 3 quorumd nodes with gobgpd speakers peering with a BIRD collector in
# network namespaces (about 35 s; needs root and the Debian packages gobgpd and bird2, which
# .ci/run installs). Kept out of `unit` so its 1-second bounds never share the 2 cores with it.
bgp-test: $(STAMP)
	$(BIN)/pytest -q -n 0 -m bgp tests/integration/test_bgp_netns.py

test: lint typecheck unit

# The rolling upgrade from the baseline build (017d9cc) and the baseline data dir fixture alone
# (both are also in `unit`). The baseline virtualenv is cached in .upgrade-cache/.
upgrade-test: $(STAMP)
	$(BIN)/pytest -q -s tests/integration/test_rolling_upgrade.py tests/integration/test_upgrade_fixture.py

# GET /api/v1/backup at 100,000 leases, through the leader and through a follower (BENCHMARKS.md)
bench-backup: $(STAMP)
	$(BIN)/python bench/backup.py --leases 100000 --via-follower

# 10,000 simulator seeds (about 7 minutes; tests/README.md has the last run)
soak: $(STAMP)
	$(BIN)/python -m quorumd.raft.sim --sweep 10000 --steps 5000 --nodes 3,5 --jobs 2

# quorumd and its peers side by side (about 14 minutes); installs wrk and etcd when missing.
bench: $(STAMP)
	@command -v wrk >/dev/null && command -v etcd >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk etcd-server etcd-client)
	$(BIN)/python bench/run.py

# quorumd at 0 / 100k / 1M leases and with 3 / 5 / 7 voters and nonvoters, etcd beside it (about
# 15 minutes; see README); installs wrk, etcd and the bench extra (matplotlib, py-spy) when missing.
bench-scale: $(STAMP)
	@command -v wrk >/dev/null && command -v etcd >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk etcd-server etcd-client)
	$(BIN)/python -c 'import matplotlib' 2>/dev/null && test -x $(BIN)/py-spy || $(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/scale.py $(SCALE_ARGS)

# CHAOS_ARGS: more flags of the run, e.g. CHAOS_ARGS="--bgp gobgp" (real speakers and a route collector)
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos --minutes 30 $(CHAOS_ARGS)

# Deployment images, built offline (deploy/image/build.sh): a debootstrapped Debian base (reused once
# built), quorumd:local from wheels of this checkout, quorumd-prometheus:local. Starts dockerd if needed.
dockerd:
	deploy/image/dockerd.sh

image: $(STAMP) dockerd
	PYTHON=$(CURDIR)/$(BIN)/python deploy/image/build.sh images

# docs/operations.md's docker-compose walk-through against deploy/compose (see docs for its time).
compose-test: image
	QUORUMD_DOCKER_TESTS=1 $(BIN)/pytest -q -p no:cacheprovider tests/integration/test_compose_live.py

# docs/operations.md's three-host systemd walk-through in three systemd containers.
systemd-test: $(STAMP) dockerd
	deploy/image/build.sh host
	QUORUMD_DOCKER_TESTS=1 $(BIN)/pytest -q -p no:cacheprovider tests/integration/test_systemd_live.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .upgrade-cache
