# Route collector image of the compose `bgp` profile (BIRD 2 from Debian bookworm).
# The base is built by `make image` (deploy/image/build.sh), never pulled.
FROM quorumd-base:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends bird2 && rm -rf /var/lib/apt/lists/* \
    && install -d -m 0755 /run/bird
COPY deploy/compose/collector/bird.conf /etc/bird/bird.conf
EXPOSE 179
CMD ["bird", "-f", "-c", "/etc/bird/bird.conf", "-s", "/run/bird/bird.ctl"]
