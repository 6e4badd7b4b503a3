#!/usr/bin/env python3
"""Greedy decode speed: femtochat (`train bench-infer`) against the real PyTorch nanochat
(92d63d4, its own GPT, KVCache and Engine.generate) on the same weights, prompt and number of
generated tokens, same thread count, float32 (NANOCHAT_DTYPE=float32).

Both sides do what nanochat's Engine.generate does: prefill the prompt once (batch 1), copy its
KV cache to B rows, then decode B rows together for --decode-tokens steps, greedy. Decode tok/s
= B x steps / time of the steps (prefill excluded; it is reported apart). Every measurement is a
fresh process; the two sides alternate within each round and the best round of each counts.

    python3 benches/infer_vs_pytorch.py --train target/release/train --run RUN_DIR \
        --threads 2 --batch-sizes 1,8 --rounds 5

RUN_DIR is a femtochat run (exported to nanochat's layout with `train export-nanochat`); without
--run, a d4 model is trained for a few steps on the bundled data first (tokenizer + train base).
Needs torch, tiktoken, rustbpe, filelock, and nanochat at --nanochat (default /tmp/nanochat:
git -C <nanochat mirror> archive 92d63d4 | tar -x -C /tmp/nanochat).
Prints one JSON line per (round, side, batch), then a summary JSON line and a Markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def nanochat_worker(a):
    """Runs inside a fresh process: nanochat's own loader and Engine on the export."""
    import torch
    torch.set_num_threads(a.threads)
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine
    model, tokenizer, meta = load_model("base", torch.device("cpu"), phase="eval")
    engine = Engine(model, tokenizer)
    v = model.config.vocab_size
    prompt = [(1 + 7919 * i) % v for i in range(a.prompt_tokens)]
    for b in a.batch_sizes:
        gen = engine.generate(prompt, num_samples=b, max_tokens=a.decode_tokens, temperature=0.0)
        t0 = time.perf_counter()
        first, _ = next(gen)  # prefill + copy of the cache + first token
        ttft = time.perf_counter() - t0
        tokens = [first[0]]
        t1 = time.perf_counter()
        for col, _ in gen:  # each further token is one decode forward of all B rows
            tokens.append(col[0])
        dt = time.perf_counter() - t1  # decode_tokens forwards (the last one's logits unused)
        print(json.dumps({
            "side": "nanochat", "batch": b, "threads": torch.get_num_threads(),
            "tok_per_s": b * a.decode_tokens / dt, "ms_per_token": dt / a.decode_tokens * 1e3,
            "ttft_ms": ttft * 1e3, "tokens": tokens,
        }), flush=True)


def femtochat_run(a, run):
    cmd = [a.train, "--threads", str(a.threads), "bench-infer", "--checkpoint", run,
           "--batch-sizes", ",".join(map(str, a.batch_sizes)), "--prompt-tokens",
           str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens), "--rounds", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    return [dict(l, side="femtochat") for l in lines if l.get("bench") == "infer"]


def nanochat_run(a, export):
    env = dict(os.environ, NANOCHAT_BASE_DIR=export, NANOCHAT_DTYPE="float32",
               PYTHONPATH=a.nanochat, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(a.threads),
           "--batch-sizes", ",".join(map(str, a.batch_sizes)), "--prompt-tokens",
           str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env,
                         cwd=a.nanochat).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def make_run(a, work):
    """A d4 model trained briefly on the bundled data (weights that are not a flat init)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tok, run = os.path.join(work, "tokenizer"), os.path.join(work, "run")
    subprocess.run([a.train, "tokenizer", "--input", os.path.join(repo, "data"), "--vocab-size",
                    "4096", "--out", tok], check=True, capture_output=True)
    subprocess.run([a.train, "base", "--tokenizer", tok, "--out", run, "--depth", "4",
                    "--max-seq-len", "256", "--device-batch-size", "8", "--total-batch-size",
                    "2048", "--num-iterations", str(a.train_steps), "--eval-every", "0",
                    "--sample-every", "0", "--save-every", "0"], check=True, capture_output=True)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", default="target/release/train")
    p.add_argument("--run", help="femtochat run directory (default: train a d4 briefly)")
    p.add_argument("--nanochat", default="/tmp/nanochat")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", default="1,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--work", help="scratch directory (default: a new temporary one)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return nanochat_worker(a)
    work = a.work or tempfile.mkdtemp(prefix="infer_vs_pytorch_")
    run = a.run or make_run(a, work)
    export = os.path.join(work, "nanochat")
    if not os.path.isdir(export):
        subprocess.run([a.train, "export-nanochat", run, "--out", export], check=True,
                       capture_output=True)
    best = {}
    tokens = {}
    for r in range(a.rounds):
        # Alternate which side goes first, so neither always gets the quieter moment.
        sides = [("femtochat", lambda: femtochat_run(a, run)), ("nanochat", lambda: nanochat_run(a, export))]
        for side, fn in (sides if r % 2 == 0 else sides[::-1]):
            for line in fn():
                line["round"] = r
                print(json.dumps({k: v for k, v in line.items() if k != "tokens"}), flush=True)
                key = (side, line["batch"])
                if key not in best or line["tok_per_s"] > best[key]["tok_per_s"]:
                    best[key] = line
                tokens[key] = line["tokens"]
    rows = []
    for b in a.batch_sizes:
        f, n = best[("femtochat", b)], best[("nanochat", b)]
        same = tokens[("femtochat", b)] == tokens[("nanochat", b)][: len(tokens[("femtochat", b)])]
        rows.append({"batch": b, "femtochat_tok_per_s": f["tok_per_s"],
                     "nanochat_tok_per_s": n["tok_per_s"], "ratio": f["tok_per_s"] / n["tok_per_s"],
                     "femtochat_ms_per_step": f["ms_per_token"], "nanochat_ms_per_step": n["ms_per_token"],
                     "same_tokens": same, "isa": f.get("isa")})
    print(json.dumps({"threads": a.threads, "prompt_tokens": a.prompt_tokens,
                      "decode_tokens": a.decode_tokens, "rounds": a.rounds, "results": rows}))
    print(f"\n| batch | femtochat tok/s | nanochat tok/s | ratio | same tokens |")
    print("|---:|---:|---:|---:|:---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['femtochat_tok_per_s']:,.0f} | {r['nanochat_tok_per_s']:,.0f} | "
              f"{r['ratio']:.2f}x | {'yes' if r['same_tokens'] else 'no'} |")


if __name__ == "__main__":
    main()
