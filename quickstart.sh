#!/usr/bin/env bash
# The whole pipeline on the data bundled in data/, on a laptop-class CPU in ~8 minutes: train a
# tokenizer, pretrain a small GPT, fine-tune it on conversations (SFT), then talk to it.
# Everything lands in runs/quickstart (base) and runs/quickstart-sft (chat model).
# Knobs (environment): STEPS (300), SFT_STEPS (100), DEPTH (4), VOCAB (4096), RUN (runs/quickstart).
set -euo pipefail
cd "$(dirname "$0")"
STEPS=${STEPS:-300}
SFT_STEPS=${SFT_STEPS:-100}
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

# SFT on the conversation mixture bundled in data/sft/. nanochat's SFT takes the base run's LR
# flags without the batch scaling; the quickstart's base flags are 16x inflated (see above), so
# the base LRs it trained with in effect are given here.
if [ -f "$RUN-sft/latest.json" ]; then
  ./target/release/train sft --base "$RUN" --out "$RUN-sft" --resume --num-iterations "$SFT_STEPS"
else
  ./target/release/train sft --base "$RUN" --out "$RUN-sft" --num-iterations "$SFT_STEPS" \
    --embedding-lr 0.2 --unembedding-lr 0.004 --matrix-lr 0.02 --eval-every 50 --save-every 50
fi
echo "SFT loss curve: $RUN-sft/loss.svg"
if [ -t 0 ]; then
  ./target/release/serve chat --checkpoint "$RUN-sft"
fi
