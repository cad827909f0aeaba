# A stand-in for one host of the systemd walk-through in docs/operations.md (tests/integration/test_systemd_live.py):
# the debootstrapped base with systemd as PID 1 and curl. Nothing of quorumd is in the image: the
# test installs it as the documentation says. Run it with
#   --cap-add SYS_ADMIN --security-opt seccomp=unconfined --cgroupns=host
#   -v /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run --tmpfs /run/lock
FROM quorumd-base:bookworm
RUN apt-get update -q \
    && apt-get install -y -q --no-install-recommends systemd systemd-sysv curl \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && systemctl mask getty.target console-getty.service systemd-udevd.service \
       systemd-logind.service systemd-networkd-wait-online.service apt-daily.timer \
       apt-daily-upgrade.timer \
    && systemctl set-default multi-user.target
ENV container=docker
STOPSIGNAL SIGRTMIN+3
CMD ["/sbin/init"]
