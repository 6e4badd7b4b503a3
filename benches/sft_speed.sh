#!/usr/bin/env bash
# SFT steps against base-training steps on the same model, interleaved rounds, median tok/s of
# each run's metrics.jsonl (steps after the first 3). Usage: benches/sft_speed.sh BASE_RUN [ROUNDS]
set -euo pipefail
BASE=$1; ROUNDS=${2:-3}; T=${TRAIN:-target/release/train}; W=$(mktemp -d)
median() { python3 -c "import sys,json,statistics; v=[json.loads(l)['tok_per_s'] for l in open(sys.argv[1]) if '\"loss\"' in l][3:]; print(round(statistics.median(v)))" "$1"; }
for r in $(seq "$ROUNDS"); do
  "$T" sft --base "$BASE" --out "$W/sft$r" --num-iterations 15 --eval-every 0 --eval-tokens 2048 --save-every 0 \
    --embedding-lr 0.2 --unembedding-lr 0.004 --matrix-lr 0.02 >/dev/null 2>&1
  "$T" base --tokenizer "$BASE/tokenizer" --out "$W/base$r" --depth 4 --total-batch-size 2048 --num-iterations 15 \
    --eval-every 0 --eval-tokens 2048 --sample-every 0 --save-every 0 >/dev/null 2>&1
  echo "{\"round\": $r, \"sft_tok_per_s\": $(median "$W/sft$r/metrics.jsonl"), \"base_tok_per_s\": $(median "$W/base$r/metrics.jsonl"), \"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
done
rm -rf "$W"
