#!/usr/bin/env bash
# The whole pipeline on the corpus bundled in data/, on a laptop-class CPU in ~5 minutes:
# train a tokenizer, pretrain a small GPT, then talk to it. Everything lands in runs/quickstart.
# Knobs (environment): STEPS (300), DEPTH (4), VOCAB (4096), RUN (runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")"
STEPS=${STEPS:-300}
DEPTH=${DEPTH:-4}
VOCAB=${VOCAB:-4096}
RUN=${RUN:-runs/quickstart}

cargo build --release -p femtochat-train -p femtochat-serve
./target/release/train tokenizer --input data --vocab-size "$VOCAB" --out "$RUN/tokenizer-src"
./target/release/train base --tokenizer "$RUN/tokenizer-src" --out "$RUN" \
  --depth "$DEPTH" --num-iterations "$STEPS" --eval-every 100 --sample-every 100 --save-every 100
echo
echo "Loss curve: $RUN/loss.svg   metrics: $RUN/metrics.jsonl"
./target/release/serve generate --checkpoint "$RUN" --prompt "ROMEO:" --max-tokens 60 --seed 1
if [ -t 0 ]; then
  ./target/release/serve chat --checkpoint "$RUN"
fi
