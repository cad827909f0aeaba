#!/usr/bin/env bash
# Starts dockerd in the background when no daemon answers (CI machines have none running), and
# waits up to 60 s for it. A daemon that already answers is left alone. The pidfile lets a later
# run (or an operator) stop exactly this daemon: kill "$(cat /run/docker.pid)".
set -euo pipefail
if docker info >/dev/null 2>&1; then
  exit 0
fi
command -v dockerd >/dev/null || { echo "dockerd missing: apt-get install docker.io" >&2; exit 1; }
log=/var/log/quorumd-dockerd.log
echo "starting dockerd (log: $log)" >&2
setsid dockerd --pidfile /run/docker.pid </dev/null >>"$log" 2>&1 &
for _ in $(seq 60); do
  if docker info >/dev/null 2>&1; then
    exit 0
  fi
  sleep 1
done
echo "dockerd did not answer within 60 s; last lines of $log:" >&2
tail -n 20 "$log" >&2
exit 1
