# syntax=docker/dockerfile:1
# hybrid-worker: computes protected layers on encrypted activations.
#
# Build from the repository root (the context is the whole workspace):
#   docker build -f deploy/docker/worker.Dockerfile -t hybrid-fhe/worker:latest .
# BuildKit reads worker.Dockerfile.dockerignore beside this file (it keeps target/ and .git out of
# the context). The cache mounts keep the cargo registry and build outputs between builds.

FROM rust:1.91-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p worker --bin hybrid-worker \
 && install -D -m 0755 target/release/hybrid-worker /out/hybrid-worker

FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 hybrid \
 && useradd --system --uid 10001 --gid hybrid --home-dir /nonexistent --shell /usr/sbin/nologin hybrid \
 && install -d -m 0755 /etc/hybrid /bundles
COPY --from=build /out/hybrid-worker /usr/local/bin/hybrid-worker

# Mount the config at /etc/hybrid/worker.toml and the server bundles (read-only) at /bundles.
# The root file system can be read-only.
USER 10001:10001
EXPOSE 8081 9181
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/hybrid-worker", "--config", "/etc/hybrid/worker.toml"]
