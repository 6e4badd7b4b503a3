#!/usr/bin/env python3
"""femtochat `train base` against a PyTorch implementation of the same model, optimizer and
schedules, on the same machine, threads, tokenizer, data rows and number of steps.

The PyTorch side is written here from ../shared/SPEC.md (the nanochat GPT, MuonAdamW, LR /
momentum / weight-decay schedules), matching femtochat's semantics where the fixtures settled
them (the value-embedding gate reads norm(x)). Both sides train on exactly the same token rows:
`train batches` writes the rows `train base` consumes.

    python3 benches/train_vs_pytorch.py --train target/release/train --tokenizer DIR \
        --depth 4 --seq-len 256 --batch 8 --steps 100 --threads 2 --out runs/vs_torch

Prints one JSON object (tok/s of both, their ratio, val bpb of both, the relative gap) and a
Markdown table for docs/perf/train-cpu.md. Needs: torch, numpy.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1.1920929e-07  # float32 machine epsilon: torch's default for rms_norm
POLAR = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def norm(x):
    return F.rms_norm(x, (x.size(-1),), eps=EPS)


def window_sizes(cfg):
    """Per-layer windows: the pattern tiled over layers, the last layer always long."""
    t = cfg["sequence_len"]
    short = math.ceil(t / 4 / 128) * 128
    pat = cfg["window_pattern"]
    ws = [t if pat[i % len(pat)] == "L" else short for i in range(cfg["n_layer"])]
    ws[-1] = t
    return ws


class GPT:
    """Parameters by femtochat/nanochat state-dict name; forward as SPEC.md §3."""

    def __init__(self, cfg, seed):
        g = torch.Generator().manual_seed(seed)
        self.cfg = cfg
        C, L = cfg["n_embd"], cfg["n_layer"]
        H, Hkv = cfg["n_head"], cfg["n_kv_head"]
        D = C // H
        self.D = D
        V = cfg["vocab_size"]
        Vp = (V + 63) // 64 * 64
        s = math.sqrt(3) / math.sqrt(C)

        def u(shape, lo, hi):
            return torch.empty(shape).uniform_(lo, hi, generator=g)

        p = {
            "transformer.wte.weight": torch.empty(Vp, C).normal_(0, 0.8, generator=g),
            "lm_head.weight": torch.empty(Vp, C).normal_(0, 0.001, generator=g),
            "resid_lambdas": torch.tensor([1.15 - 0.10 * i / max(L - 1, 1) for i in range(L)]),
            "x0_lambdas": torch.tensor([0.20 - 0.15 * i / max(L - 1, 1) for i in range(L)]),
            "smear_gate.weight": u((1, 24), 0, 0.02),
            "smear_lambda": torch.zeros(1),
            "backout_lambda": torch.full((1,), 0.2),
        }
        self.ve_layers = [i for i in range(L) if i % 2 == (L - 1) % 2]
        for i in range(L):
            h = f"transformer.h.{i}."
            p[h + "attn.c_q.weight"] = u((H * D, C), -s, s)
            p[h + "attn.c_k.weight"] = u((Hkv * D, C), -s, s)
            p[h + "attn.c_v.weight"] = u((Hkv * D, C), -s, s)
            p[h + "attn.c_proj.weight"] = torch.zeros(C, C)
            p[h + "mlp.c_fc.weight"] = u((4 * C, C), -0.4 * s, 0.4 * s)
            p[h + "mlp.c_proj.weight"] = torch.zeros(C, 4 * C)
            if i in self.ve_layers:
                p[f"value_embeds.{i}.weight"] = u((Vp, Hkv * D), -s, s)
                p[h + "attn.ve_gate.weight"] = u((Hkv, 12), 0, 0.02)
        self.p = {k: v.requires_grad_() for k, v in p.items()}
        T = cfg["sequence_len"]
        inv = 100000.0 ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)
        ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
        self.cos, self.sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
        self.windows = window_sizes(cfg)

    def rope(self, x):
        T, h = x.size(1), self.D // 2
        x1, x2 = x[..., :h], x[..., h:]
        c, s = self.cos[:, :T], self.sin[:, :T]
        return torch.cat([x1 * c + x2 * s, -x1 * s + x2 * c], dim=-1)

    def loss(self, idx, targets, reduction="mean"):
        p, cfg = self.p, self.cfg
        B, T = idx.shape
        C, L, H, Hkv, D = cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_kv_head"], self.D
        x = norm(p["transformer.wte.weight"][idx])
        if T > 1:
            gate = p["smear_lambda"] * torch.sigmoid(x[:, 1:, :24] @ p["smear_gate.weight"].T)
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0, xb = x, None
        for i in range(L):
            h = f"transformer.h.{i}."
            x = p["resid_lambdas"][i] * x + p["x0_lambdas"][i] * x0
            a = norm(x)
            q = (a @ p[h + "attn.c_q.weight"].T).view(B, T, H, D)
            k = (a @ p[h + "attn.c_k.weight"].T).view(B, T, Hkv, D)
            v = (a @ p[h + "attn.c_v.weight"].T).view(B, T, Hkv, D)
            if i in self.ve_layers:
                ve = p[f"value_embeds.{i}.weight"][idx].view(B, T, Hkv, D)
                g = 3 * torch.sigmoid(a[..., :12] @ p[h + "attn.ve_gate.weight"].T)
                v = v + g[..., None] * ve
            q, k = norm(self.rope(q)) * 1.2, norm(self.rope(k)) * 1.2
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if H != Hkv:
                k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            w = self.windows[i]
            if w >= T:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                ii = torch.arange(T)[:, None]
                jj = torch.arange(T)[None, :]
                mask = (jj <= ii) & (ii - jj <= w)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            y = y.transpose(1, 2).reshape(B, T, H * D) @ p[h + "attn.c_proj.weight"].T
            x = x + y
            m = torch.relu(norm(x) @ p[h + "mlp.c_fc.weight"].T).square()
            x = x + m @ p[h + "mlp.c_proj.weight"].T
            if i == L // 2:
                xb = x
        x = x - p["backout_lambda"] * xb
        V = cfg["vocab_size"]
        logits = (norm(x) @ p["lm_head.weight"].T)[..., :V]
        logits = 15 * torch.tanh(logits / 15)
        return F.cross_entropy(
            logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1, reduction=reduction
        )


class MuonAdamW:
    """SPEC.md §6, one matrix at a time (identical to nanochat's stacked form)."""

    def __init__(self, model, st):
        cfg, p = model.cfg, model.p
        s = (cfg["n_embd"] / 768) ** -0.5
        ve = [n for n in p if n.startswith("value_embeds.")]
        adam = [
            (st["unembedding_lr"] * s, (0.8, 0.96), 0.01, ["lm_head.weight"]),
            (st["embedding_lr"] * s, (0.8, 0.995), 0.001, ["transformer.wte.weight"]),
            (st["embedding_lr"] * s * 0.5, (0.8, 0.995), 0.01, ve),
            (st["scalar_lr"] * 0.01, (0.8, 0.95), 0.05, ["resid_lambdas"]),
            (st["scalar_lr"], (0.96, 0.95), 0.0, ["x0_lambdas"]),
            (0.2, (0.8, 0.95), 0.0, ["smear_lambda", "backout_lambda", "smear_gate.weight"]),
        ]
        self.adam = [g for g in adam if g[3]]
        self.muon = [n for n in p if n.startswith("transformer.h.")]
        self.matrix_lr, self.wd0 = st["matrix_lr"], st["weight_decay"]
        self.state = {n: [torch.zeros_like(t), torch.zeros_like(t)] for n, t in p.items()}
        for n in self.muon:
            r, c = p[n].shape
            self.state[n][1] = torch.zeros(r if r >= c else c)
        self.p, self.t = p, 0

    @torch.no_grad()
    def step(self, lrm, momentum, wd):
        self.t += 1
        t = self.t
        for lr0, (b1, b2), decay, names in self.adam:
            lr = lr0 * lrm
            for n in names:
                p, g = self.p[n], self.p[n].grad
                m, v = self.state[n]
                p.mul_(1 - lr * decay)
                m.lerp_(g, 1 - b1)
                v.lerp_(g * g, 1 - b2)
                denom = (v / (1 - b2**t)).sqrt() + 1e-10
                p.sub_(lr / (1 - b1**t) * m / denom)
        for n in self.muon:
            p, g = self.p[n], self.p[n].grad
            mom, second = self.state[n]
            rows, cols = p.shape
            mom.lerp_(g, 1 - momentum)
            x = g.lerp(mom, momentum)
            x = x * (x.norm() / math.sqrt(rows)) / x.norm(dim=1, keepdim=True).clamp_min(1e-6)
            x = x / (x.norm() * 1.01 + 1e-6)
            for a, b, c in POLAR:
                if rows > cols:
                    A = x.T @ x
                    x = a * x + x @ (b * A + c * A @ A)
                else:
                    A = x @ x.T
                    x = a * x + (b * A + c * A @ A) @ x
            x = x * (math.sqrt(min(rows, cols)) / x.norm().clamp_min(1e-6))
            tall = rows >= cols
            red = cols if tall else rows
            v_mean = (x * x).mean(dim=1 if tall else 0)
            v_norm = (v_mean.sum() * red).sqrt()
            second.lerp_(v_mean, 1 - 0.9)
            step = second.clamp_min(1e-10).rsqrt()
            v_new = (v_mean * red * step * step).sum().sqrt()
            scale = step * v_norm / v_new.clamp_min(1e-10)
            x = x * (scale[:, None] if tall else scale[None, :])
            lr = self.matrix_lr * lrm * max(1.0, rows / cols) ** 0.5
            mask = (x * p >= 0).float()
            p.sub_(lr * x + lr * wd * p * mask)


def schedules(st, it):
    n = st["num_iterations"]
    wd_steps = round(st["warmdown_ratio"] * n)
    start = max(n - wd_steps, 0)
    prog = 0.0 if wd_steps == 0 or it <= start else min((it - start) / wd_steps, 1.0)
    if it < st["warmup_steps"]:
        lrm = (it + 1) / st["warmup_steps"]
    else:
        lrm = (1 - prog) + prog * st["final_lr_frac"]
    m = 0.85 + (0.97 - 0.85) * min(it / 400, 1.0)
    m = m + (0.90 - m) * prog
    wd = st["weight_decay"] * 0.5 * (1 + math.cos(math.pi * it / max(n, 1)))
    return lrm, m, wd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", default="target/release/train")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--window-pattern", default="L")
    ap.add_argument("--out", default="runs/vs_torch")
    ap.add_argument("--skip-rust", action="store_true", help="reuse OUT/rust")
    a = ap.parse_args()

    rust_dir, rows_dir = os.path.join(a.out, "rust"), os.path.join(a.out, "rows")
    common = ["--tokenizer", a.tokenizer, "--device-batch-size", str(a.batch),
              "--max-seq-len", str(a.seq_len)]
    if not a.skip_rust:
        cmd = [a.train, "--threads", str(a.threads), "base", *common, "--out", rust_dir,
               "--depth", str(a.depth), "--num-iterations", str(a.steps),
               "--window-pattern", a.window_pattern, "--eval-every", "0",
               "--eval-tokens", str(a.eval_tokens), "--sample-every", "0", "--save-every", "0"]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    latest = json.load(open(os.path.join(rust_dir, "latest.json")))
    ckpt = latest.get("dir") or latest.get("path") or f"step_{latest['step']:06d}"
    state = json.load(open(os.path.join(rust_dir, os.path.basename(ckpt), "state.json")))
    st = state["settings"]
    micro = st["num_iterations"] * st["grad_accum_steps"]
    cmd = [a.train, "batches", *common, "--micro-batches", str(micro),
           "--eval-tokens", str(a.eval_tokens), "--out", rows_dir]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)

    metrics = [json.loads(l) for l in open(os.path.join(rust_dir, "metrics.jsonl"))]
    rust_steps = [m for m in metrics if "tok_per_s" in m]
    rust_bpb = [m["val_bpb"] for m in metrics if "val_bpb" in m][-1]

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    meta = json.load(open(os.path.join(rows_dir, "meta.json")))
    B, T = meta["batch"], meta["seq_len"]
    train = np.fromfile(os.path.join(rows_dir, "train.u32"), dtype="<u4").reshape(-1, B, T + 1)
    val = np.fromfile(os.path.join(rows_dir, "val.u32"), dtype="<u4").reshape(-1, T + 1)
    token_bytes = torch.from_numpy(
        np.fromfile(os.path.join(rows_dir, "token_bytes.u32"), dtype="<u4").astype(np.int64))
    model = GPT(st["model"], st["seed"])
    opt = MuonAdamW(model, st)
    times, losses = [], []
    for it in range(st["num_iterations"]):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for k in range(st["grad_accum_steps"]):
            rows = torch.from_numpy(train[it * st["grad_accum_steps"] + k].astype(np.int64))
            loss = model.loss(rows[:, :-1], rows[:, 1:])
            (loss / st["grad_accum_steps"]).backward()
            loss_sum += loss.item()
        opt.step(*schedules(st, it))
        for t in model.p.values():
            t.grad = None
        times.append(time.perf_counter() - t0)
        losses.append(loss_sum / st["grad_accum_steps"])
    with torch.no_grad():
        nats, nbytes = 0.0, 0
        for i in range(0, len(val), B):
            rows = torch.from_numpy(val[i:i + B].astype(np.int64))
            tg = rows[:, 1:]
            l = model.loss(rows[:, :-1], tg, reduction="none")
            bl = token_bytes[tg.reshape(-1)]
            nats += l[bl > 0].double().sum().item()
            nbytes += bl.sum().item()
        torch_bpb = nats / (math.log(2) * nbytes)

    tokens = B * T * st["grad_accum_steps"]
    skip = min(3, len(times) - 1)  # warm-up steps on both sides
    torch_tps = statistics.median(tokens / t for t in times[skip:])
    rust_tps = statistics.median(m["tok_per_s"] for m in rust_steps[skip:])
    out = {
        "depth": a.depth, "n_embd": st["model"]["n_embd"], "vocab_size": st["model"]["vocab_size"],
        "seq_len": T, "batch": B, "steps": st["num_iterations"], "threads": a.threads,
        "torch": torch.__version__,
        "femtochat_tok_per_s": rust_tps, "torch_tok_per_s": torch_tps,
        "speedup": rust_tps / torch_tps,
        "femtochat_val_bpb": rust_bpb, "torch_val_bpb": torch_bpb,
        "bpb_rel_gap": (rust_bpb - torch_bpb) / torch_bpb,
        "femtochat_final_loss": rust_steps[-1]["loss"], "torch_final_loss": losses[-1],
    }
    print(json.dumps(out))
    print(f"| d{a.depth} C={out['n_embd']} V={out['vocab_size']} T={T} B={B} x{st['grad_accum_steps']}"
          f" | {a.threads} | {rust_tps:.0f} | {torch_tps:.0f} | {out['speedup']:.2f}x"
          f" | {rust_bpb:.4f} | {torch_bpb:.4f} | {100 * out['bpb_rel_gap']:+.2f}% |", file=sys.stderr)


if __name__ == "__main__":
    main()
