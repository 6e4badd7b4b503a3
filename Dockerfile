# syntax=docker/dockerfile:1
# `serve` in a container: the OpenAI-compatible API and web chat for a run directory mounted at
# /model. Build: `docker build -t femtochat-serve .`; run:
#   docker run --rm -p 8000:8000 -v "$PWD/runs/quickstart-sft:/model:ro" femtochat-serve
# Every RUN step is a script under docker/, so CI (which has no container engine) runs the same
# steps on the host: .ci/docker and serve/tests/dockerfile.rs.

# Build stage: the toolchain rust-toolchain.toml pins, on the Debian release the runtime uses
# (the binary links glibc dynamically; same release, same glibc).
FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN docker/build.sh /out

# Runtime stage: the binary, the Vulkan loader and lavapipe (Mesa's CPU Vulkan driver), so
# `--device gpu` finds an adapter on hosts without a GPU; nothing else.
FROM debian:bookworm-slim
COPY docker/runtime.sh /tmp/runtime.sh
RUN /tmp/runtime.sh --image && rm /tmp/runtime.sh
COPY --from=build /out/serve /usr/local/bin/serve
# An unprivileged user; a numeric id needs no passwd entry.
USER 10001:10001
# The Vulkan loader wants a private runtime directory.
ENV XDG_RUNTIME_DIR=/tmp
EXPOSE 8000
ENTRYPOINT ["serve"]
CMD ["--checkpoint", "/model", "--host", "0.0.0.0", "--port", "8000"]
