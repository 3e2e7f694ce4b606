# syntax=docker/dockerfile:1
#
# wsbeat container image.
#
#   docker build -t wsbeat:0.1.0 .
#   docker run --rm -p 8080:8080 -p 9090:9090 \
#       -v "$PWD/my-wsbeat.yaml:/etc/wsbeat/wsbeat.yaml:ro" wsbeat:0.1.0
#   docker run --rm wsbeat:0.1.0 check        # validate and print the shipped config
#
# Arguments given to `docker run` replace the default command below as a whole, so keep
# `--admin-listen 0.0.0.0:9090` (or set admin.listen in your file) when you pass your own.
#
# Build stage: the same command the project and deploy/check.sh use. Only the manifest,
# the lock file and src/ are copied in (.dockerignore keeps target/ and .git out of the
# context), so `--locked` builds exactly the dependency versions in Cargo.lock.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# `wsbeat demo` embeds the browser client (include_str! in src/demo.rs).
COPY clients/js/wsbeat.js ./clients/js/wsbeat.js
RUN cargo build --release --locked

# Final stage: distroless `cc` (glibc + libgcc, which is all the binary links against;
# no shell, no package manager), running as the numeric non-root user 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/wsbeat /usr/local/bin/wsbeat
# The annotated reference config, every key at its default. In Kubernetes the ConfigMap
# in deploy/kubernetes/ is mounted over /etc/wsbeat instead.
COPY config/wsbeat.yaml /etc/wsbeat/wsbeat.yaml
# Lets `docker run IMAGE check` validate (and print) the config the image ships.
ENV WSBEAT_CONFIG=/etc/wsbeat/wsbeat.yaml
USER 65532:65532
# 8080: public WebSocket listener. 9090: admin (/metrics /livez /readyz /connections).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/wsbeat"]
# The reference config binds the admin listener to 127.0.0.1:9090, which nothing outside
# the container can reach; the default command overrides only that, so the image's own
# admin port is reachable (`--admin-listen off` turns it off). The Kubernetes Deployment
# replaces these arguments with just `--config …`: there the ConfigMap decides, and it
# sets admin.listen to 0.0.0.0:9090 itself.
CMD ["--config", "/etc/wsbeat/wsbeat.yaml", "--admin-listen", "0.0.0.0:9090"]
