# Prometheus image for deploy/compose, built by deploy/image/build.sh (`make image`): Debian's
# prometheus package on the same debootstrapped base as quorumd:local (no registry pull).
# The compose file mounts deploy/prometheus/ (prometheus.yml, rules.yml) at /etc/prometheus.
FROM quorumd-base:bookworm
# moment-timezone's data (214 MB, for the web UI's date picker) is left out.
RUN echo 'path-exclude /usr/share/javascript/moment-timezone/*' > /etc/dpkg/dpkg.cfg.d/02-prometheus-slim \
    && apt-get update -q \
    && apt-get install -y -q --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && install -d -o prometheus -g prometheus -m 0750 /prometheus
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
