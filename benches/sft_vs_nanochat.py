#!/usr/bin/env python3
"""`train sft` against nanochat's own `scripts/chat_sft.py`, from the same base checkpoint, on the
same conversations, for the same steps, float32 on the CPU. Run by hand; results in
docs/perf/sft.md.

    python3 benches/sft_vs_nanochat.py --nanochat /tmp/nanochat --train target/release/train \
        --base runs/quickstart --steps 40 --work /tmp/sftref

nanochat is run from a checkout the user gives (at commit 92d63d4; nothing of it is copied
here), through `runpy` with three stand-ins: `wandb` (not installed; nanochat logs to a dummy
anyway), the test splits of MMLU and GSM8K in its validation mixture (empty: the comparison
validates on held-out conversations only), and `torch.compile` (the identity: the model is
wrapped to record the first training batches, the optimizer's fused steps run uncompiled). Its data is given the way nanochat reads the hub:
parquet shards plus a manifest under $NANOCHAT_BASE_DIR/task_data/, so nanochat's own dataset
shuffle, TaskMixture and packing run unchanged. The base run is exported to nanochat's layout
with `train export-nanochat` (model, optimizer state, tokenizer.pkl).

Conversations are those of data/sft/ (Dolly and GPTeacher as "SmolTalk", GSM8K train) whose
rendering fits one row: nanochat renders at 2048 tokens, and with a shorter context a longer
conversation never fits its padding packer (femtochat truncates at the row length instead, so
the two would differ on those).

Checks: the first micro-batches (inputs and masked targets) are identical; the validation bits
per byte agree before training and after the steps. nanochat's `--num-iterations N` trains
N - 1 steps (its loop stops when the loader has yielded N micro-batches, one ahead of the
model) and reads its LR progress one micro-batch ahead, so femtochat runs N - 1 steps.
Needs: torch, numpy, pyarrow, tiktoken, rustbpe, filelock.
"""
import argparse
import gzip
import json
import os
import re
import runpy
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_jsonl(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(l) for l in f if l.strip()]


def write_parquet(rows, path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    with open(os.path.join(os.path.dirname(path), "manifest.json"), "w") as f:
        json.dump([os.path.basename(path)], f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanochat", required=True, help="nanochat checkout at 92d63d4")
    ap.add_argument("--train", default=os.path.join(ROOT, "target/release/train"))
    ap.add_argument("--base", required=True, help="femtochat base run directory")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps both sides take")
    ap.add_argument("--work", default="/tmp/sft_vs_nanochat")
    ap.add_argument("--conversations", type=int, default=3000)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare-batches", type=int, default=4)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    if subprocess.run(["git", "-C", a.nanochat, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()[:7] not in ("92d63d4", ""):
        sys.exit(f"{a.nanochat} is not at nanochat 92d63d4")

    # The base run in nanochat's layout.
    nc = os.path.join(a.work, "nanochat_base")
    if not os.path.exists(os.path.join(nc, "tokenizer", "tokenizer.pkl")):
        subprocess.run([a.train, "export-nanochat", a.base, "--out", nc], check=True)
    state = json.load(open(os.path.join(a.base, json.load(open(os.path.join(a.base, "latest.json")))["dir"], "state.json")))
    s = state["settings"]
    seq, dbs = s["model"]["sequence_len"], s["device_batch_size"]
    total = dbs * seq * s["grad_accum_steps"]

    # Conversations that fit a row, measured with nanochat's own renderer.
    sys.path.insert(0, a.nanochat)
    from nanochat.tokenizer import get_tokenizer
    os.environ["NANOCHAT_BASE_DIR"] = nc
    tok = get_tokenizer()
    fits = lambda conv: len(tok.render_conversation(conv)[0]) <= seq + 1
    sft = os.path.join(ROOT, "data/sft")
    convs = []
    for name in ["dolly15k.jsonl.gz", "gpteacher_codegen.jsonl.gz", "gpteacher_roleplay.jsonl.gz"]:
        for row in read_jsonl(os.path.join(sft, name)):
            if len(convs) < a.conversations and fits(row):
                convs.append(row)
    gsm_rows = read_jsonl(os.path.join(sft, "gsm8k_train.jsonl.gz"))
    gsm = [r for r in gsm_rows[: a.conversations // 3]
           if fits({"messages": [{"role": "user", "content": r["question"]},
                                 {"role": "assistant", "content": gsm8k_parts(r["answer"])}]})]
    val = [r for r in read_jsonl(os.path.join(sft, "oasst1_en_validation.jsonl.gz")) if fits(r)]
    print(f"{len(convs)} conversations, {len(gsm)} GSM8K rows, {len(val)} validation conversations fit {seq + 1} tokens", file=sys.stderr)

    # femtochat's inputs.
    data_dir = os.path.join(a.work, "data")
    os.makedirs(data_dir, exist_ok=True)
    def jsonl(rows, name):
        p = os.path.join(data_dir, name)
        with open(p, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return p
    conv_p, gsm_p, val_p = jsonl(convs, "conv.jsonl"), jsonl(gsm, "gsm8k.jsonl"), jsonl(val, "val.jsonl")
    # nanochat's, as its hub cache.
    td = os.path.join(nc, "task_data")
    write_parquet(convs, os.path.join(td, "HuggingFaceTB--smol-smoltalk/default/train/00000.parquet"))
    write_parquet(val, os.path.join(td, "HuggingFaceTB--smol-smoltalk/default/test/00000.parquet"))
    write_parquet(gsm, os.path.join(td, "openai--gsm8k/main/train/00000.parquet"))

    lrs = ["--embedding-lr", "0.2", "--unembedding-lr", "0.004", "--matrix-lr", "0.02"]
    femto_steps = a.steps
    # --- femtochat
    batches_p = os.path.join(a.work, "femtochat_batches.i32")
    common = ["sft", "--base", a.base, "--data", conv_p, gsm_p, "--val", val_p, *lrs,
              "--eval-tokens", str(a.eval_tokens), "--eval-every", "100000", "--save-every", "0"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    subprocess.run([a.train, *common, "--out", os.path.join(a.work, "unused"), "--num-iterations", "1",
                    "--dump-batches", str(a.compare_batches), batches_p], check=True, env=env)
    out_dir = os.path.join(a.work, "femtochat_sft")
    t0 = time.time()
    subprocess.run([a.train, "--threads", str(a.threads), *common, "--out", out_dir, "--overwrite",
                    "--num-iterations", str(femto_steps)], check=True, env=env)
    femto_s = time.time() - t0
    femto_bpb = [json.loads(l)["val_bpb"] for l in open(os.path.join(out_dir, "metrics.jsonl")) if "val_bpb" in l]

    # --- nanochat, its chat_sft.py as-is
    child = os.path.join(a.work, "nanochat_driver.py")
    with open(child, "w") as f:
        f.write(DRIVER)
    nc_args = ["--device-type", "cpu", "--num-iterations", str(a.steps + 1), "--max-seq-len", str(seq),
               "--device-batch-size", str(dbs), "--total-batch-size", str(total), *lrs,
               "--mmlu-epochs", "0", "--gsm8k-epochs", "1", "--eval-every", "100000",
               "--eval-tokens", str(a.eval_tokens), "--chatcore-every", "-1"]
    env = dict(os.environ, NANOCHAT_BASE_DIR=nc, NANOCHAT_DTYPE="float32", OMP_NUM_THREADS=str(a.threads),
               SFT_BATCHES=os.path.join(a.work, "nanochat_batches.i32"), SFT_KEEP=str(a.compare_batches),
               PYTHONPATH=a.nanochat)
    t0 = time.time()
    run = subprocess.run([sys.executable, child, *nc_args], capture_output=True, text=True, env=env, cwd=a.nanochat)
    nano_s = time.time() - t0
    if run.returncode != 0:
        sys.exit(run.stdout[-3000:] + run.stderr[-3000:])
    nano_bpb = [float(m) for m in re.findall(r"Validation bpb: ([0-9.]+)", run.stdout)]

    import numpy as np
    ours = np.fromfile(batches_p, dtype="<i4")
    theirs = np.fromfile(os.path.join(a.work, "nanochat_batches.i32"), dtype="<i4")
    same_rows = ours.shape == theirs.shape and bool((ours == theirs).all())
    result = {
        "steps": femto_steps, "seq_len": seq, "device_batch_size": dbs, "total_batch_size": total,
        "conversations": len(convs), "gsm8k": len(gsm), "val_conversations": len(val),
        "first_batches_identical": same_rows, "compared_batches": a.compare_batches,
        "femtochat_val_bpb": femto_bpb, "nanochat_val_bpb": nano_bpb,
        "final_rel_diff": abs(femto_bpb[-1] - nano_bpb[-1]) / nano_bpb[-1] if femto_bpb and nano_bpb else None,
        "femtochat_seconds": femto_s, "nanochat_seconds": nano_s, "threads": a.threads,
    }
    print(json.dumps(result))


def gsm8k_parts(answer):
    """GSM8K's answer as nanochat's task renders it: text and <<expr=result>> tool parts."""
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, result = piece[2:-2].rsplit("=", 1) if "=" in piece else (piece[2:-2], "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


# Runs nanochat's scripts/chat_sft.py unchanged, with the stand-ins described above.
DRIVER = r'''
import os, runpy, sys, types
import numpy as np
import torch
sys.modules["wandb"] = types.SimpleNamespace(init=lambda **k: None)
import tasks.mmlu, tasks.gsm8k
from tasks.common import Task
class Empty(Task):
    def num_examples(self): return 0
    def get_example(self, i): raise IndexError(i)
def test_empty(cls):
    def make(*args, **kwargs):
        split = kwargs.get("split", args[1] if len(args) > 1 else None)
        return Empty() if split == "test" else cls(*args, **kwargs)
    return make
tasks.mmlu.MMLU = test_empty(tasks.mmlu.MMLU)
tasks.gsm8k.GSM8K = test_empty(tasks.gsm8k.GSM8K)
kept, keep = [], int(os.environ["SFT_KEEP"])
class Recorder(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m
    def forward(self, x, y=None, **kw):
        if y is not None and self.training and len(kept) < keep:
            kept.append(np.concatenate([x.cpu().numpy().astype("<i4").ravel(), y.cpu().numpy().astype("<i4").ravel()]))
            if len(kept) == keep:
                np.concatenate(kept).tofile(os.environ["SFT_BATCHES"])
        return self.m(x, y, **kw)
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.m, name)
def compile_standin(m=None, **kw):
    # The decorator form (nanochat's fused optimizer steps) runs uncompiled, same arithmetic.
    if m is None:
        return lambda f: f
    return Recorder(m) if isinstance(m, torch.nn.Module) else m
torch.compile = compile_standin
sys.argv = ["chat_sft"] + sys.argv[1:]
runpy.run_module("scripts.chat_sft", run_name="__main__")
'''

if __name__ == "__main__":
    main()
