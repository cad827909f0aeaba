#!/usr/bin/env bash
# Builds the deployment images without pulling anything from a registry:
#
#   quorumd-base:bookworm      Debian bookworm from Debian's packages (debootstrap minbase + python3,
#                              python3-venv, gobgpd), imported with `docker import`; built once, reused while
#                              the tag exists (QUORUMD_REBUILD_BASE=1 builds it again)
#   quorumd:local              the daemon, installed from wheels built here (pip wheel) with
#                              pip install --no-index (quorumd.Dockerfile)
#   quorumd-prometheus:local   Debian's prometheus package on the same base (prometheus.Dockerfile)
#   quorumd-host:bookworm      the same base with systemd as PID 1, a stand-in for a host in the
#                              systemd walk-through (host.Dockerfile; only with the argument `host`)
#   quorumd-collector:local    BIRD 2 on the same base: the route collector of the compose `bgp`
#                              profile (collector.Dockerfile; only with the argument `collector`)
#
# Usage: deploy/image/build.sh [images|host]...   (default: images). Run from anywhere, as root
# (debootstrap). Needs docker (a running dockerd), debootstrap, and Debian's package mirror.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
suite=bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
base="quorumd-base:$suite"
stage="$repo/build/image"                      # git-ignored: wheels and the docker build context
python="${PYTHON:-python3}"

log() { printf 'image: %s\n' "$*" >&2; }

build_base() {
  if [ "${QUORUMD_REBUILD_BASE:-0}" != 1 ] && docker image inspect "$base" >/dev/null 2>&1; then
    log "$base present, reused"
    return
  fi
  local rootfs
  rootfs="$(mktemp -d /var/tmp/quorumd-rootfs.XXXXXX)"
  trap 'rm -rf "$rootfs"; trap - RETURN' RETURN
  log "debootstrap $suite into $rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,gobgpd "$suite" "$rootfs" "$mirror" >&2
  # Keep later apt-get installs small too: no documentation, man pages or translations.
  cat > "$rootfs/etc/dpkg/dpkg.cfg.d/01-quorumd-nodoc" <<'NODOC'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
NODOC
  printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
    > "$rootfs/etc/apt/apt.conf.d/01-quorumd-norecommends"
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$rootfs"/usr/share/{man,info,locale}/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
  log "docker import -> $base"
  tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$base" >/dev/null
}

build_images() {
  rm -rf "$stage" && mkdir -p "$stage/wheels"
  log "pip wheel . -> $stage/wheels"
  "$python" -m pip wheel -q --disable-pip-version-check "$repo" -w "$stage/wheels" >&2
  cp "$repo/deploy/compose/bringup.py" "$stage/bringup.py"
  log "docker build quorumd:local"
  docker build -q -f "$here/quorumd.Dockerfile" -t quorumd:local "$stage" >/dev/null
  log "docker build quorumd-prometheus:local"
  # Debian's package comes from the mirror: the build container uses the host's network.
  docker build -q --network host -f "$here/prometheus.Dockerfile" -t quorumd-prometheus:local "$here" >/dev/null
}

build_host() {
  log "docker build quorumd-host:$suite"
  docker build -q --network host -f "$here/host.Dockerfile" -t "quorumd-host:$suite" "$here" >/dev/null
}

build_collector() {
  log "docker build quorumd-collector:local"
  docker build -q --network host -f "$here/collector.Dockerfile" -t quorumd-collector:local "$repo" >/dev/null
}

build_base
for what in "${@:-images}"; do
  case "$what" in
    images) build_images ;;
    host) build_host ;;
    collector) build_collector ;;
    *) log "unknown target $what (images, host, collector)"; exit 2 ;;
  esac
done
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^quorumd' >&2 || true
