# twinwatch, built in one stage and run from a slim one as a non-root user.
#   docker build -t twinwatch .        (docker-compose.yml builds it as twinwatch:local)
FROM rust:1.94-bookworm AS build
WORKDIR /src
# Manifests first, so the dependency build is cached while only src/ changes.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && for b in live queries rooms; do echo 'fn main() {}' > benches/$b.rs; done \
 && cargo build --release --locked --bin twinwatch \
 && rm -rf src benches
COPY src src
COPY benches benches
# The stand-ins above are older than the real sources, but touch them anyway:
# cargo must not take the cached stand-in build for the real one.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin twinwatch

FROM debian:bookworm-slim
# openssl for scripts/gen-certs (the one-shot `gen-certs` service), CA roots for TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# uid 10001: no account of the host's; the volumes' mount points belong to it,
# so the named volumes created from them do too.
RUN useradd --system --uid 10001 --user-group --home-dir /deploy --no-create-home --shell /usr/sbin/nologin twinwatch \
 && mkdir -p /deploy/secrets /deploy/models \
 && chown twinwatch:twinwatch /deploy/secrets /deploy/models
COPY --from=build /src/target/release/twinwatch /usr/local/bin/twinwatch
COPY scripts/gen-certs /usr/local/bin/gen-certs
COPY queries /deploy/queries
COPY deploy/nats /deploy/nats
COPY deploy/twinwatch /deploy/twinwatch
USER 10001:10001
WORKDIR /deploy
ENV TWINWATCH=/usr/local/bin/twinwatch
EXPOSE 9464
ENTRYPOINT ["twinwatch"]
CMD ["run", "--config", "/deploy/twinwatch/processor.toml"]
