# syntax=docker/dockerfile:1
# hybrid-gateway: the licensed, metered entry point.
#
# Build from the repository root (the context is the whole workspace):
#   docker build -f deploy/docker/gateway.Dockerfile -t hybrid-fhe/gateway:latest .
# BuildKit reads gateway.Dockerfile.dockerignore beside this file (it keeps target/ and .git out of
# the context). The cache mounts keep the cargo registry and build outputs between builds.

FROM rust:1.91-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gateway --bin hybrid-gateway \
 && install -D -m 0755 target/release/hybrid-gateway /out/hybrid-gateway

FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 hybrid \
 && useradd --system --uid 10001 --gid hybrid --home-dir /nonexistent --shell /usr/sbin/nologin hybrid \
 && install -d -m 0755 /etc/hybrid
COPY --from=build /out/hybrid-gateway /usr/local/bin/hybrid-gateway

# Mount the config at /etc/hybrid/gateway.toml (and keyset.json, secrets/); give the database
# URL as GATEWAY_DATABASE_URL. The root file system can be read-only.
USER 10001:10001
EXPOSE 8080 9180
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/hybrid-gateway", "--config", "/etc/hybrid/gateway.toml"]
