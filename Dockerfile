# The keyward operator image: `docker build -t ghcr.io/keyward/keyward:<version> .`
# Build stage: the release binary, with the exact dependency versions of Cargo.lock.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# The workspace's other member (test emulators) must be present for Cargo to load the
# workspace; only the keyward binary is built.
COPY emulators ./emulators
# src/ embeds examples/quickstart.yaml and hack/control-plane-binaries (for `keyward dev`).
COPY src ./src
COPY examples ./examples
COPY hack ./hack
RUN cargo build --release --locked --bin keyward

# Runtime: glibc and CA certificates only, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/keyward /keyward
# The distroless `nonroot` user; the Helm chart runs as the same UID.
USER 65532:65532
ENTRYPOINT ["/keyward"]
CMD ["run"]
