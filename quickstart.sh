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
if [ -f "$RUN/latest.json" ]; then
  # A second run continues (or finds complete) the first instead of overwriting it.
  ./target/release/train base --out "$RUN" --resume --num-iterations "$STEPS"
else
  [ -f "$RUN/tokenizer-src/tokenizer.json" ] ||
    ./target/release/train tokenizer --input data --vocab-size "$VOCAB" --out "$RUN/tokenizer-src"
  # nanochat's recipe, with one CPU-sized change: a step is one 8 x 256 micro-batch, 256 times
  # smaller than the recipe's reference batch, and the recipe would scale every learning rate
  # down by 16 for it (val bpb 2.30 after 300 steps, against 2.24 with these flags: measured,
  # docs/perf/train-cpu.md). So the LRs given here are 16 x the values the quickstart wants in
  # effect (setup_optimizer's defaults), and the Muon weight decay is off.
  ./target/release/train base --tokenizer "$RUN/tokenizer-src" --out "$RUN" \
    --depth "$DEPTH" --num-iterations "$STEPS" --total-batch-size 2048 \
    --unembedding-lr 0.064 --embedding-lr 3.2 --matrix-lr 0.32 --scalar-lr 8 --weight-decay 0 \
    --eval-every 100 --sample-every 100 --save-every 100
fi
echo
echo "Loss curve: $RUN/loss.svg   metrics: $RUN/metrics.jsonl"
./target/release/serve generate --checkpoint "$RUN" --prompt "ROMEO:" --max-tokens 60 --seed 1
if [ -t 0 ]; then
  ./target/release/serve chat --checkpoint "$RUN"
fi
