#!/usr/bin/env python3
"""Bytes each rank sends per optimizer step in femtochat's data-parallel training (train/src/dist/),
under a ring schedule: the communication model of docs/distributed.md.

It follows model/src/gpt.rs::param_shapes and model/src/optim.rs::param_groups: AdamW parameters
under 1024 elements are all-reduced (2 (N-1)/N of their bytes), larger ones reduce-scattered and
all-gathered by rows padded to a multiple of N ((N-1)/N each way); each Muon group (same-shaped
matrices inside the blocks) is reduce-scattered and all-gathered by whole matrices, padded to
ceil(K/N) per rank. `train` prints the same prediction next to the bytes it measured.

usage: benches/dist_comm_model.py [--depth D ...] [--ranks N ...] [--head-dim 128] [--vocab 32768]
"""
import argparse
import math

VE_GATE_CHANNELS = 12
SMEAR_CHANNELS = 24


def shapes(depth, aspect, head_dim, vocab):
    ce = math.ceil(depth * aspect / head_dim) * head_dim
    n_head = ce // head_dim
    hd = kvd = n_head * head_dim
    vp = math.ceil(vocab / 64) * 64
    out = [("transformer.wte.weight", (vp, ce))]
    for i in range(depth):
        p = f"transformer.h.{i}"
        out += [(f"{p}.attn.c_q.weight", (hd, ce)), (f"{p}.attn.c_k.weight", (kvd, ce)),
                (f"{p}.attn.c_v.weight", (kvd, ce)), (f"{p}.attn.c_proj.weight", (ce, hd)),
                (f"{p}.mlp.c_fc.weight", (4 * ce, ce)), (f"{p}.mlp.c_proj.weight", (ce, 4 * ce))]
        if i % 2 == (depth - 1) % 2:
            out += [(f"{p}.attn.ve_gate.weight", (n_head, VE_GATE_CHANNELS)),
                    (f"value_embeds.{i}.weight", (vp, kvd))]
    out += [("lm_head.weight", (vp, ce)), ("resid_lambdas", (depth,)), ("x0_lambdas", (depth,)),
            ("smear_gate.weight", (1, SMEAR_CHANNELS)), ("smear_lambda", (1,)), ("backout_lambda", (1,))]
    return out


def bytes_per_step(params, n):
    numel = lambda s: math.prod(s)
    ring = lambda elems, k: k * (n - 1) * 4 * elems // n  # k = 2: all-reduce, 1: RS or AG
    total = 0
    muon = {}
    for name, s in params:
        if name.startswith("transformer.h."):
            muon.setdefault(s, []).append(name)
        elif numel(s) < 1024:
            total += ring(numel(s), 2)
        else:
            rows, cols = s[0], numel(s) // s[0]
            total += 2 * ring(n * math.ceil(rows / n) * cols, 1)
    for s, names in muon.items():
        total += 2 * ring(n * math.ceil(len(names) / n) * numel(s), 1)
    return total, sum(numel(s) for _, s in params)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, nargs="+", default=[12, 20, 26])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    ap.add_argument("--aspect-ratio", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=32768)
    a = ap.parse_args()
    print("| depth | params | " + " | ".join(f"N={n}" for n in a.ranks) + " |")
    print("|---|---|" + "---|" * len(a.ranks))
    for d in a.depth:
        ps = shapes(d, a.aspect_ratio, a.head_dim, a.vocab)
        cells = []
        for n in a.ranks:
            b, total = bytes_per_step(ps, n)
            cells.append(f"{b / 1e6:.0f} MB")
        print(f"| d{d} | {total / 1e6:.0f} M | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
