# The coordinator image: loractl-coordinator and the loractl CLI on Debian slim.
#   docker build -f deploy/docker/coordinator.Dockerfile -t ghcr.io/OWNER/loractl-coordinator:0.1.0 .
# (from the repository root). It listens on 7070 (gRPC) and 9464 (Prometheus /metrics).
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
# protoc: scripts/env.sh points PROTOC at the vendored one.
RUN bash -c 'source scripts/env.sh && cargo build --release --locked -p loractl-coordinator -p loractl' \
    && strip target/release/loractl-coordinator target/release/loractl

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 loractl \
    && useradd --system --uid 10001 --gid loractl --home-dir /var/lib/loractl loractl \
    && mkdir -p /var/lib/loractl && chown loractl:loractl /var/lib/loractl
COPY --from=build /src/target/release/loractl-coordinator /src/target/release/loractl /usr/local/bin/
USER 10001:10001
EXPOSE 7070 9464
ENTRYPOINT ["/usr/local/bin/loractl-coordinator"]
CMD ["--listen=0.0.0.0:7070", "--metrics-listen=0.0.0.0:9464", "--store=redb:/var/lib/loractl/loractl.redb", "--artifacts=/var/lib/loractl/artifacts"]
