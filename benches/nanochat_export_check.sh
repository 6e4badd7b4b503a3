#!/usr/bin/env bash
# By hand (not CI): a femtochat run exported with `train export-nanochat` loads in PyTorch
# nanochat, and nanochat's logits and greedy tokens equal femtochat's. Results: docs/interop.md.
#
#   NANOCHAT_SRC  nanochat checked out at 92d63d4, outside this repo (default /tmp/nanochat)
#   PY            a python with torch, tiktoken, rustbpe, filelock (default python3)
#   WORK          scratch directory (default: a new temporary one)
#   PROFILE       cargo profile (default release; dev reuses the test build)
set -euo pipefail
cd "$(dirname "$0")/.."
NANOCHAT_SRC=${NANOCHAT_SRC:-/tmp/nanochat}
PY=${PY:-python3}
WORK=${WORK:-$(mktemp -d)}
PROFILE=${PROFILE:-release}
OUT_DIR=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")

cargo build --profile "$PROFILE" -p femtochat-train
TRAIN=./target/$OUT_DIR/train
$TRAIN tokenizer --input data --vocab-size 1024 --out "$WORK/tokenizer"
$TRAIN base --tokenizer "$WORK/tokenizer" --out "$WORK/run" --depth 2 --max-seq-len 128 \
  --window-pattern SL --device-batch-size 4 --total-batch-size 512 --num-iterations 150 \
  --eval-every 0 --sample-every 0 \
  --save-every 0
$TRAIN export-nanochat "$WORK/run" --out "$WORK/nanochat"
NANOCHAT_BASE_DIR="$WORK/nanochat" PYTHONPATH="$NANOCHAT_SRC" "$PY" benches/nanochat_export_check.py
# nanochat's chat_cli on the export (its own loader and tokenizer, one reply).
(cd "$NANOCHAT_SRC" && NANOCHAT_BASE_DIR="$WORK/nanochat" "$PY" -m scripts.chat_cli -i base \
  -p "Hello" -t 0 --device-type cpu | tail -3)
FEMTOCHAT_NANOCHAT_DIR="$WORK/nanochat" FEMTOCHAT_RUN_DIR="$WORK/run" \
  cargo test --profile "$PROFILE" --test nanochat_import external_export_matches_nanochat -- --ignored --nocapture
