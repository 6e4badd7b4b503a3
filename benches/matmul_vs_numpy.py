#!/usr/bin/env python3
"""femtochat's CPU matmul vs NumPy/OpenBLAS, same shapes, layouts and thread counts, one run.

Usage: python3 benches/matmul_vs_numpy.py [path/to/kernel-bench] [--isa avx2]
(build it first: cargo build --release -p femtochat-kernels --bin kernel-bench;
 needs: pip install numpy threadpoolctl).

The two are run alternately, ROUNDS times, and the best GFLOP/s of each is kept: on a shared or
virtual machine the best run is the least disturbed one. OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are
removed from the environment first (some machines set them to work around old OpenBLAS bugs, and
they slow a current one down); the OpenBLAS kernel in use is printed.

`--isa avx2` forces femtochat's AVX2 + FMA path (FEMTOCHAT_ISA) and pins OpenBLAS to its Haswell
(AVX2) kernel (OPENBLAS_CORETYPE=Haswell), so an AVX-512 machine measures the AVX2 pair like for
like.
"""
import json
import os
import subprocess
import sys
import time

for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(var, None)
ARGS = [a for a in sys.argv[1:] if not a.startswith("--isa")]
if "--isa" in sys.argv:
    forced = sys.argv[sys.argv.index("--isa") + 1]
    ARGS.remove(forced)
    if forced != "avx2":
        sys.exit("--isa: only avx2 has a matching OpenBLAS kernel to pin (Haswell)")
    os.environ["FEMTOCHAT_ISA"] = "avx2"
    os.environ["OPENBLAS_CORETYPE"] = "Haswell"

import numpy as np  # noqa: E402  (after the environment is cleaned)
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

BIN = ARGS[0] if ARGS else "target/release/kernel-bench"
ROUNDS = 3
CASES = [  # (m, k, n, trans_a, trans_b, what)
    (1024, 1024, 1024, False, False, "square"),
    (4096, 768, 3072, False, True, "forward x W^T"),
    (4096, 3072, 768, False, False, "backward dX = dY W"),
    (3072, 4096, 768, True, False, "backward dW = dY^T X"),
]


def numpy_gflops(m, k, n, ta, tb, threads, reps=5):
    rng = np.random.default_rng(0)
    a = rng.random((k, m) if ta else (m, k), dtype=np.float32)
    b = rng.random((n, k) if tb else (k, n), dtype=np.float32)
    a, b = (a.T if ta else a), (b.T if tb else b)
    with threadpool_limits(threads):
        a @ b
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def ours_gflops(m, k, n, ta, tb, threads):
    cmd = [BIN, "matmul", "--m", str(m), "--k", str(k), "--n", str(n), "--threads", str(threads),
           "--reps", "5"] + (["--trans-a"] if ta else []) + (["--trans-b"] if tb else [])
    line = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return 2 * m * k * n / (line["best_ms"] / 1e3) / 1e9, line["isa"]


def main():
    blas = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    print(f"numpy {np.__version__}, OpenBLAS {blas[0].get('version') if blas else '?'} "
          f"kernel {blas[0].get('architecture') if blas else '?'}")
    print(f"{'case':<24} {'m x k x n':<16} {'layout':<6} {'thr':>3} {'ours':>7} {'numpy':>7} {'ratio':>6}")
    for m, k, n, ta, tb, what in CASES:
        for threads in (1, 2):
            ours, theirs, isa = 0.0, 0.0, "?"
            for _ in range(ROUNDS):
                g, isa = ours_gflops(m, k, n, ta, tb, threads)
                ours = max(ours, g)
                theirs = max(theirs, numpy_gflops(m, k, n, ta, tb, threads))
            layout = ("T" if ta else "N") + ("T" if tb else "N")
            print(f"{what:<24} {f'{m}x{k}x{n}':<16} {layout:<6} {threads:>3} {ours:>7.1f} {theirs:>7.1f} "
                  f"{ours / theirs:>6.2f}   ({isa})", flush=True)


if __name__ == "__main__":
    main()
