#!/usr/bin/env python3
"""Flash vs reference CPU attention with `kernel-bench attention`, for docs/perf/attention.md.

The development VM is shared, so every case runs in several rounds with flash and reference
interleaved; the table keeps each case's best time and the median of its per-round medians.

    cargo build --release -p femtochat-kernels --bin kernel-bench
    python3 benches/attention_cpu.py [--rounds 3] [--threads 1]
"""
import argparse
import json
import statistics
import subprocess
from collections import defaultdict

BIN = "target/release/kernel-bench"


def run(args, threads=None):
    if threads:
        args = [*args, "--threads", str(threads)]
    out = subprocess.run([BIN, "attention", *args], check=True, capture_output=True, text=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, help="worker threads (default: all cores)")
    a = ap.parse_args()
    speed = [  # (label, extra kernel-bench args)
        ("T2048 D64", ["--t", "2048", "--d", "64", "--h", "4", "--pass", "fwd,bwd,both"]),
        ("T2048 D128", ["--t", "2048", "--d", "128", "--h", "4", "--pass", "fwd,bwd,both"]),
        ("decode T8192 MHA", ["--t", "8192", "--tq", "1", "--h", "4", "--pass", "fwd"]),
        ("decode T8192 GQA 8/2", ["--t", "8192", "--tq", "1", "--h", "8", "--hkv", "2", "--pass", "fwd"]),
    ]
    times = defaultdict(list)  # (label, pass, impl) -> [(median, best)]
    for _ in range(a.rounds):
        for label, args in speed:
            for imp in ["flash", "reference"]:
                for r in run([*args, "--impl", imp, "--reps", str(a.reps)], a.threads):
                    times[(label, r["pass"], imp)].append((r["ms"], r["best_ms"]))
    print(f"{'case':<22} {'pass':<5} {'flash ms':>9} {'ref ms':>9} {'speed-up':>9}   (best-of: flash, ref, speed-up)")
    for label, _ in speed:
        for p in ["fwd", "bwd", "both"]:
            if (label, p, "flash") not in times:
                continue
            f, r = times[(label, p, "flash")], times[(label, p, "reference")]
            fm, rm = statistics.median(x[0] for x in f), statistics.median(x[0] for x in r)
            fb, rb = min(x[1] for x in f), min(x[1] for x in r)
            print(f"{label:<22} {p:<5} {fm:>9.2f} {rm:>9.2f} {rm / fm:>8.2f}x   ({fb:.2f}, {rb:.2f}, {rb / fb:.2f}x)")
    print()
    print(f"{'peak extra bytes':<22} {'pass':<5} {'T':>6} {'flash':>9} {'ref':>9} {'ratio':>7}")
    for d in ["64", "128"]:
        for t in ["1024", "2048", "4096", "8192"]:
            rows = {}
            for imp in ["flash", "reference"]:
                args = ["--t", t, "--d", d, "--pass", "fwd,both", "--impl", imp, "--reps", "1"]
                for r in run(args, a.threads):
                    rows[(r["pass"], imp)] = r["peak_extra_bytes"]
            for p in ["fwd", "both"]:
                f, r = rows[(p, "flash")], rows[(p, "reference")]
                print(f"{'D' + d:<22} {p:<5} {t:>6} {f:>9} {r:>9} {f / r:>6.0%}")


if __name__ == "__main__":
    main()
