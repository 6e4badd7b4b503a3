#!/usr/bin/env bash
# Every GPU measurement of docs/perf/gpu.md and docs/perf/attention.md in one run, for a session
# whose task is lent the GPU machine (the `device` tool: one call, ~10 minutes, no cargo there).
#
# Here, once:
#   echo /.gl/ >>.git/info/exclude; mkdir -p .gl /tmp/amd64/partial
#   o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
#   apt-get $o update; (cd .gl && apt-get $o download libvulkan1)
#   cargo build --release -p femtochat-kernels -p femtochat-train
#   echo /.devbin/ >>.git/info/exclude; mkdir -p .devbin
#   strip -o .devbin/kernel-bench target/release/kernel-bench   # 6 MB instead of 42: a call
#   strip -o .devbin/train target/release/train                 # carries 64 MiB in all
# Then one device call, carrying .gl and the stripped binaries:
#   run(command="bash benches/gpu_device.sh", carry=[".gl", ".devbin"], timeout_s=600)
# Results come back as JSON lines under $OUT (matmul.jsonl, attention.jsonl, train.jsonl) plus
# log.txt; each part has its own time limit so one slow kernel cannot eat the others' time.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

if [ -d .gl ]; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -f $icd ]; then export VK_DRIVER_FILES=$icd; fi
BIN=.devbin
[ -x $BIN/train ] || BIN=target/release
KB=$BIN/kernel-bench
TRAIN=$BIN/train
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv || true

part() { # part NAME SECONDS FILE -- command...
    local name=$1 secs=$2 file=$3
    shift 4
    echo "== $name (limit ${secs}s)"
    local t0=$SECONDS
    timeout "$secs" "$@" | tee -a "$OUT/$file"
    echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - t0)) s"
}

# 1. matmul: every kernel at the 8192^3 anchor, and the model's shapes (d12: C 768,
#    B T = 16384 rows, MLP 4C, vocab 65536) in the transpose cases training runs.
#    The vec4 kernel's slice settings (pipeline constants) too: which default suits this GPU.
part "matmul 8192^3" 150 matmul.jsonl -- \
    $KB matmul --device gpu --m 8192 --k 8192 --n 8192 --reps 10 \
    --tiling 64,128,v4,v4-bk8,v4-bk32,v4-s2,v4-bk8-s2
part "matmul sizes" 90 matmul.jsonl -- \
    $KB matmul --device gpu --m 1024,4096 --k 1024,4096 --n 1024,4096 --reps 20 --tiling 128,v4
part "matmul d12 mlp" 60 matmul.jsonl -- \
    $KB matmul --device gpu --m 16384 --k 768 --n 3072 --trans-b --reps 5 --tiling auto
# The lm head runs on 4096-row chunks of the loss (a whole batch's logits are 4 GiB).
part "matmul d12 lm head" 60 matmul.jsonl -- \
    $KB matmul --device gpu --m 4096 --k 768 --n 65536 --trans-b --reps 5 --tiling auto
part "matmul d12 weight grad" 60 matmul.jsonl -- \
    $KB matmul --device gpu --m 3072 --k 16384 --n 768 --trans-a --reps 5 --tiling auto

# 2. attention against the SDPA anchors (B 4, H 6, T 2048, D 128; B 1, H 16, T 8192, D 128).
part "attention T2048" 120 attention.jsonl -- \
    $KB attention --device gpu --b 4 --h 6 --t 2048 --d 128 --pass fwd,both \
    --impl flash,flash-rows --reps 5
# The tiled kernels' tile shapes (pipeline constants), to pick the default for this GPU.
for tiles in "32 32" "64 16" "64 64" "32 64"; do
    set -- $tiles
    part "attention tiles $1x$2" 40 attention.jsonl -- \
        $KB attention --device gpu --b 4 --h 6 --t 2048 --d 128 --pass fwd,both \
        --impl flash --block-r $1 --block-c $2 --reps 3
done
part "attention T8192" 120 attention.jsonl -- \
    $KB attention --device gpu --b 1 --h 16 --t 8192 --d 128 --pass fwd,both --impl flash --reps 3

# 3. a full d12 training step (the PyTorch fp32 eager anchor: 42.8k tokens/s).
part "train d12" 180 train.jsonl -- \
    $TRAIN bench --device gpu --depth 12 --max-seq-len 2048 --device-batch-size 8 \
    --vocab-size 65536 --window-pattern L --steps 3 --peak-flops 67e12
