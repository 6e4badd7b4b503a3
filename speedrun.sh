#!/usr/bin/env bash
# The whole pipeline in one command, as nanochat's runs/speedrun.sh: tokenizer -> base -> base
# eval -> SFT -> chat eval -> RL -> chat eval -> report card.
#
#   ./speedrun.sh [PRESET] [--out DIR] [--data DIR]
#
# PRESET: cpu (default; the bundled data, about 10 minutes on the 2-core machine), tiny (a
# minutes-long smoke test, what CI runs), gpu-d20, gpu-d26 (nanochat's speedrun model sizes,
# --device gpu, for a real GPU and real shards given with --data).
#
# Every stage is skipped when its output is complete and resumed when it was interrupted, so
# running the same command again after a crash continues where it stopped. Everything a stage
# prints also goes to OUT/<stage>/<stage>.log (the tokenizer's to OUT/tokenizer.log). The report
# card ends in OUT/report/report.md.
#
# TRAIN=path/to/train uses that binary (default: builds target/release/train).
set -euo pipefail
cd "$(dirname "$0")"

preset=cpu
out=""
data=""
while [ $# -gt 0 ]; do
  case "$1" in
    cpu|tiny|gpu-d20|gpu-d26) preset="$1" ;;
    --out) out="$2"; shift ;;
    --data) data="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "speedrun.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
out="${out:-runs/speedrun-$preset}"

case "$preset" in
  tiny)
    vocab=512; device=cpu
    base_args="--depth 2 --max-seq-len 64 --device-batch-size 4 --total-batch-size 256 --num-iterations 20 --eval-every 10 --eval-tokens 512 --sample-every 0 --save-every 10"
    core_args="--max-per-task 12"
    sft_args="--num-iterations 10 --eval-every 5 --eval-tokens 512 --save-every 5"
    chat_args="--max-problems 2 --max-new-tokens 16 --tasks arc-easy,mmlu,gsm8k"
    rl_args="--num-iterations 2 --device-batch-size 2 --examples-per-step 2 --num-samples 2 --max-new-tokens 16 --eval-every 1 --eval-examples 2 --save-every 1"
    ;;
  cpu)
    vocab=4096; device=cpu
    base_args="--depth 4 --max-seq-len 256 --device-batch-size 8 --total-batch-size 8192 --num-iterations 300 --eval-every 100 --eval-tokens 65536 --sample-every 0 --save-every 100"
    core_args="--max-per-task 50"
    sft_args="--num-iterations 60 --eval-every 20 --eval-tokens 32768 --save-every 20"
    chat_args="--max-problems 50 --max-new-tokens 128"
    rl_args="--num-iterations 10 --device-batch-size 4 --examples-per-step 4 --num-samples 4 --max-new-tokens 128 --eval-every 5 --eval-examples 20 --save-every 5"
    ;;
  gpu-d20|gpu-d26)
    [ -n "$data" ] || { echo "speedrun.sh $preset: give --data DIR (FineWeb-Edu parquet shards)" >&2; exit 2; }
    vocab=32768; device=gpu
    if [ "$preset" = gpu-d20 ]; then depth=20; dbs=32; else depth=26; dbs=16; fi
    base_args="--depth $depth --aspect-ratio 64 --head-dim 128 --max-seq-len 2048 --window-pattern SSSL --device-batch-size $dbs --target-param-data-ratio 20 --eval-every 250 --eval-tokens 10485760 --core-every 2000 --save-every 1000"
    core_args=""
    sft_args="--eval-every 200 --save-every 500"
    chat_args=""
    rl_args=""
    ;;
esac
data_args=()
[ -n "$data" ] && data_args=(--data "$data")

if [ -z "${TRAIN:-}" ]; then
  cargo build --release -p femtochat-train
  TRAIN=target/release/train
fi
mkdir -p "$out"
echo "speedrun: preset $preset -> $out" | tee -a "$out/speedrun.log"

# stage NAME DIR CMD...: run CMD with its output also in DIR/NAME.log, timed.
stage() {
  local name="$1" dir="$2"; shift 2
  mkdir -p "$dir"
  echo "== $name: $*" | tee -a "$out/speedrun.log" "$dir/$name.log"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$dir/$name.log"
  echo "== $name: done in $((SECONDS - t0)) s" | tee -a "$out/speedrun.log" "$dir/$name.log"
}

# A training stage: --resume with the same flags when its directory holds a checkpoint (which
# finishes an interrupted run, and does nothing for a complete one); a run interrupted before its
# first checkpoint starts again with --overwrite (which moves the partial run aside, to
# DIR.old-<time>); else a new run.
train_stage() {
  local name="$1" dir="$2"; shift 2
  local resume=()
  if [ -f "$dir/latest.json" ]; then
    resume=(--resume)
  elif [ -f "$dir/run.json" ]; then
    resume=(--overwrite)
  fi
  stage "$name" "$dir" "$TRAIN" "$name" --out "$dir" --device "$device" "${resume[@]}" "$@"
}

# An evaluation: skipped when RUN_DIR/eval/KIND.jsonl has a result for the run's final step.
eval_done() {
  local dir="$1" kind="$2" step
  step=$(sed -n 's/.*"step":\([0-9]*\).*/\1/p' "$dir/latest.json" 2>/dev/null)
  [ -f "$dir/eval/$kind.jsonl" ] && grep -q "\"step\":$step[,}]" "$dir/eval/$kind.jsonl"
}

tok="$out/tokenizer"
if [ ! -f "$tok/tokenizer.tiktoken" ]; then
  # Its log goes beside it: a file inside would change the tokenizer's fingerprint.
  stage tokenizer "$out" "$TRAIN" tokenizer --input "${data:-data}" --vocab-size "$vocab" --out "$tok"
fi

# shellcheck disable=SC2086
train_stage base "$out/base" --tokenizer "$tok" "${data_args[@]}" $base_args
# shellcheck disable=SC2086
eval_done "$out/base" core || stage eval-core "$out/base" "$TRAIN" eval core --checkpoint "$out/base" --device "$device" $core_args

# shellcheck disable=SC2086
train_stage sft "$out/sft" --base "$out/base" $sft_args
# shellcheck disable=SC2086
eval_done "$out/sft" chat || stage eval-chat "$out/sft" "$TRAIN" eval chat --checkpoint "$out/sft" --device "$device" $chat_args

# shellcheck disable=SC2086
train_stage rl "$out/rl" --sft "$out/sft" $rl_args
# shellcheck disable=SC2086
eval_done "$out/rl" chat || stage eval-chat "$out/rl" "$TRAIN" eval chat --checkpoint "$out/rl" --device "$device" $chat_args

stage report "$out/report" "$TRAIN" report "$tok" "$out/base" "$out/sft" "$out/rl" --out "$out/report"
echo "speedrun: report card in $out/report/report.md" | tee -a "$out/speedrun.log"
