"""The deployment walk-throughs of docs/operations.md are exactly what the live tests run.

tests/integration/test_compose_live.py and tests/integration/test_systemd_live.py
(``make compose-test``, ``make systemd-test``) need docker and run outside ``make test``; this
module checks, without docker, that the docs' command blocks are still the commands those tests
hold and run, so the runbook cannot drift from what is tested.
"""

from __future__ import annotations

import yaml

from quorumd.node.config.schema import config_from_dict
from tests.docker_support import doc_blocks, doc_commands
from tests.integration import test_compose_live, test_systemd_live


def test_docs_compose_section_is_what_the_compose_test_runs() -> None:
    assert doc_commands(test_compose_live.DOC_HEADING) == test_compose_live.DOC_COMMANDS


def test_docs_systemd_section_is_what_the_systemd_test_runs() -> None:
    assert doc_commands(test_systemd_live.DOC_HEADING) == test_systemd_live.DOC_COMMANDS


def test_docs_systemd_configs_load() -> None:
    """The three hosts' configurations (the docs' two YAML blocks, q3 derived as the docs say) are
    valid, and only q1 founds."""
    q1, q2 = doc_blocks(test_systemd_live.DOC_HEADING, "yaml")
    for node, text in ((1, q1), (2, q2), (3, test_systemd_live.q3_config(q2))):
        raw = yaml.safe_load(text)
        assert raw["data-dir"] == "/var/lib/quorumd"
        token_file = raw["cluster"].pop("join-token-file", None)
        assert (token_file is None) == (node == 1)
        cfg = config_from_dict(raw)
        assert cfg.node_id == node
        assert str(cfg.cluster.advertise_address) == f"10.0.0.{node}:7000"
        others = [f"10.0.0.{n}:7000" for n in (1, 2, 3) if n != node]
        assert sorted(str(p) for p in cfg.cluster.peers) == others
