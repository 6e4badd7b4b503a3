#!/usr/bin/env bash
# The Dockerfile's runtime stage: the Vulkan loader and lavapipe. `--image` (the image build)
# also drops apt's package lists, 20 MB the runtime never reads. Idempotent, so CI runs it on the
# host (.ci/docker), where the packages are already installed.
set -euo pipefail
packages=(libvulkan1 mesa-vulkan-drivers)
dpkg -s "${packages[@]}" >/dev/null 2>&1 && exit 0
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
if [ "${1:-}" = --image ]; then rm -rf /var/lib/apt/lists/*; fi
