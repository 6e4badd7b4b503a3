#!/usr/bin/env bash
# Data-parallel speed on one machine: `mpirun -np 2 train --threads 1` against one process with
# `--threads 2`, same model, same total batch, interleaved rounds (docs/distributed.md).
# usage: benches/dist_speed.sh TRAIN_BINARY_WITH_MPI TOKENIZER_DIR [DEPTH...]
# Prints one line per run: depth, layout, median step tok/s over steps 1.. (step 0 warms up),
# and the bytes per step rank 0 reported sending.
set -euo pipefail
bin=$1; tok=$2; shift 2
depths=${*:-4 6}
rounds=${ROUNDS:-3}
work=$(mktemp -d)
export OMPI_MCA_btl_vader_single_copy_mechanism=none
median() { python3 -c 'import json,sys,statistics
v=[json.loads(l) for l in open(sys.argv[1])]
v=[x["tok_per_s"] for x in v if "tok_per_s" in x and x["step"]>0]
print(round(statistics.median(v)))' "$1"; }
for d in $depths; do
  args=(base --tokenizer "$tok" --depth "$d" --max-seq-len 256 --device-batch-size 4
        --total-batch-size 8192 --num-iterations 6 --eval-every 0 --eval-tokens 1024
        --sample-every 0 --save-every 0)
  for r in $(seq "$rounds"); do
    rm -rf "$work/one" "$work/two"
    "$bin" --threads 2 "${args[@]}" --out "$work/one" 2>/dev/null >/dev/null
    echo "d$d round $r one-process-2-threads $(median "$work/one/metrics.jsonl") tok/s"
    mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 "$bin" --threads 1 "${args[@]}" \
      --out "$work/two" 2>"$work/err" >/dev/null
    bytes=$(grep -o 'communication over.*' "$work/err" || true)
    echo "d$d round $r two-ranks-1-thread $(median "$work/two/metrics.jsonl") tok/s; $bytes"
  done
done
rm -rf "$work"
