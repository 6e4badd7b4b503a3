#!/usr/bin/env bash
# The Dockerfile's build stage: compile `serve` from the source tree in the current directory
# and install it as DEST/serve. CI runs this same script on the host (.ci/docker) with
# PROFILE=dev, which reuses the test build instead of compiling the release profile again.
set -euo pipefail
dest=${1:?usage: docker/build.sh DEST_DIR}
profile=${PROFILE:-release}
cargo build --locked --profile "$profile" -p femtochat-serve --bin serve
case "$profile" in dev) out=debug ;; *) out=$profile ;; esac
mkdir -p "$dest"
install -m 0755 "${CARGO_TARGET_DIR:-target}/$out/serve" "$dest/serve"
"$dest/serve" --version
