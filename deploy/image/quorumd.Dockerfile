# quorumd image, built by deploy/image/build.sh (`make image`) with no registry pull:
# the base is Debian bookworm made with debootstrap and `docker import` (quorumd-base:bookworm);
# the build context (build/image/) holds the wheels of quorumd and its dependencies (`pip wheel .`)
# and bringup.py.

# Stage 1: a virtualenv installed from the wheels only (no index), then stripped of pip.
FROM quorumd-base:bookworm AS venv
COPY wheels /wheels
RUN python3 -m venv /opt/quorumd \
    && /opt/quorumd/bin/pip install -q --no-index --find-links /wheels --no-compile quorumd \
    && /opt/quorumd/bin/pip uninstall -q -y pip setuptools \
    && find /opt/quorumd -name __pycache__ -prune -exec rm -rf {} +

# Stage 2: the base, the virtualenv and a non-root user (its home is the data-dir).
FROM quorumd-base:bookworm
ENV PATH=/opt/quorumd/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=venv /opt/quorumd /opt/quorumd
COPY bringup.py /usr/local/bin/quorumd-bringup
# /join receives the join-token files written by the compose `init` service.
RUN groupadd --system --gid 10001 quorumd \
    && useradd --system --uid 10001 --gid quorumd --home-dir /var/lib/quorumd --shell /usr/sbin/nologin quorumd \
    && install -d -o quorumd -g quorumd -m 0700 /var/lib/quorumd /join \
    && install -d -o root -g quorumd -m 0750 /etc/quorumd \
    && chmod 0755 /usr/local/bin/quorumd-bringup

USER quorumd
WORKDIR /var/lib/quorumd
EXPOSE 5002 7000

# Liveness over the API's HTTPS port (self-signed certificate, hence no verification).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import ssl, urllib.request; urllib.request.urlopen('https://127.0.0.1:5002/healthz', context=ssl._create_unverified_context(), timeout=2)"]

STOPSIGNAL SIGTERM
CMD ["quorumd", "run", "--config", "/etc/quorumd/quorumd.yaml"]
