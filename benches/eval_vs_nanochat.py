#!/usr/bin/env python3
"""`train eval` against nanochat's own evaluators on the same checkpoint, data and threads.

nanochat is imported from a checkout the user gives (--nanochat, at commit 92d63d4; nothing of
it is copied here). femtochat's run directory is loaded into nanochat's GPT (the state-dict
names are the same) in float32 on the CPU, with femtochat's tokenizer wrapped in nanochat's
RustBPETokenizer. nanochat's task classes read the repository's data files instead of the
Hugging Face hub (their own `.shuffle(seed=42)` still orders the rows).

    python3 benches/eval_vs_nanochat.py --nanochat ~/nanochat --train target/release/train \
        --checkpoint runs/d4 --max-per-task 100 --threads 2 [--chat 100 --gsm8k 20]

Prints per-task accuracies of both, the differences, wall times and their ratio, as JSON lines
and a Markdown table (docs/eval.md). Needs: torch, numpy, pyarrow, jinja2, pyyaml, tiktoken,
rustbpe, filelock.
"""
import argparse
import base64
import gzip
import json
import os
import subprocess
import sys
import time


def load_femtochat(run_dir, nanochat):
    """nanochat's GPT holding the newest checkpoint of a femtochat run, and the tokenizer."""
    import torch
    from safetensors import safe_open
    sys.path.insert(0, nanochat)
    from nanochat.gpt import GPT, GPTConfig
    latest = json.load(open(os.path.join(run_dir, "latest.json")))
    path = os.path.join(run_dir, latest["dir"], "model.safetensors")
    with safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["config"])
        state = {k: f.get_tensor(k).float() for k in f.keys()}
    keys = ["sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern"]
    with torch.device("meta"):
        model = GPT(GPTConfig(**{k: cfg[k] for k in keys}))
    model.to_empty(device="cpu")
    model.init_weights()  # rotary tables; every parameter is overwritten below
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and all(k in ("cos", "sin") for k in missing), (missing, unexpected)
    model.float().eval()
    # nanochat crops prompts from the left only for models that declare a limit; its GPT does
    # not, and asserts on prompts past its rotary tables (10x the context). femtochat crops at
    # that length instead, so give nanochat the same limit.
    model.max_seq_len = cfg["sequence_len"] * 10
    return model, load_tokenizer(os.path.join(run_dir, "tokenizer"), nanochat), latest["step"]


def load_tokenizer(tok_dir, nanochat):
    import tiktoken
    sys.path.insert(0, nanochat)
    from nanochat.tokenizer import RustBPETokenizer
    meta = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
    ranks = {}
    for line in open(os.path.join(tok_dir, "tokenizer.tiktoken")):
        if line.strip():
            b, r = line.split()
            ranks[base64.b64decode(b)] = int(r)
    enc = tiktoken.Encoding(name="femtochat", pat_str=meta["pattern"], mergeable_ranks=ranks,
                            special_tokens=meta["special_tokens"])
    return RustBPETokenizer(enc, "<|bos|>")


def nanochat_core(model, tok, bundle, max_per_task, only):
    """nanochat's evaluate_core loop (base_eval.py) over the bundle's tasks that have data."""
    import csv
    import random
    import yaml
    from nanochat.core_eval import evaluate_task
    tasks = yaml.safe_load(open(os.path.join(bundle, "core.yaml")))["icl_tasks"]
    out = {}
    for task in tasks:
        label = task["label"]
        path = os.path.join(bundle, "eval_data", task["dataset_uri"])
        path = path if os.path.exists(path) else path + ".gz"
        if (only and label not in only) or not os.path.exists(path):
            continue
        meta = {"task_type": task["icl_task_type"], "dataset_uri": task["dataset_uri"],
                "num_fewshot": task["num_fewshot"][0],
                "continuation_delimiter": task.get("continuation_delimiter", " ")}
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            data = [json.loads(line.strip()) for line in f]
        random.Random(1337).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        t0 = time.time()
        out[label] = (evaluate_task(model, tok, data, "cpu", meta), len(data), time.time() - t0)
        print(json.dumps({"side": "nanochat", "task": label, "accuracy": out[label][0],
                          "seconds": round(out[label][2], 2)}), file=sys.stderr, flush=True)
    return out


def patch_hub(chat_dir):
    """Make nanochat's tasks read the repository's files instead of the Hugging Face hub."""
    import pyarrow as pa
    import tasks.common as tc
    files = {
        ("allenai/ai2_arc", "ARC-Easy", "test"): "arc/ARC-Easy-test.jsonl.gz",
        ("allenai/ai2_arc", "ARC-Challenge", "test"): "arc/ARC-Challenge-test.jsonl.gz",
        ("cais/mmlu", "all", "test"): "mmlu/mmlu_test.jsonl.gz",
        ("openai/gsm8k", "main", "test"): "gsm8k/test.jsonl.gz",
    }

    def load(repo, subset="default", split="train"):
        with gzip.open(os.path.join(chat_dir, files[(repo, subset, split)]), "rt") as f:
            rows = [json.loads(line) for line in f]
        return tc.HubDataset(pa.Table.from_pylist(rows))
    import importlib
    for m in ["tasks.common", "tasks.arc", "tasks.mmlu", "tasks.gsm8k"]:
        importlib.import_module(m).load_hub_dataset = load


def nanochat_chat(model, tok, chat_dir, n_cat, n_gsm):
    from functools import partial
    patch_hub(chat_dir)
    import scripts.chat_eval as ce
    from nanochat.engine import Engine
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.mmlu import MMLU
    engine = Engine(model, tok)
    out = {}
    for name, make, n in [("arc-easy", partial(ARC, "ARC-Easy", "test"), n_cat),
                          ("arc-challenge", partial(ARC, "ARC-Challenge", "test"), n_cat),
                          ("mmlu", partial(MMLU, "all", "test"), n_cat),
                          ("gsm8k", partial(GSM8K, "main", "test"), n_gsm)]:
        if n <= 0:
            continue
        task = make()
        t0 = time.time()
        if task.eval_type == "categorical":
            acc = ce.run_categorical_eval(task, tok, model, 8, max_problems=n)
        else:
            acc = ce.run_generative_eval(task, tok, model, engine, 1, 512, 0.0, 50, max_problems=n)
        out[name] = (acc, min(n, len(task)), time.time() - t0)
    return out


def femtochat(cmd, threads):
    t0 = time.time()
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    res = subprocess.run(cmd + ["--threads", str(threads)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    return lines, time.time() - t0


def table(name, ours, theirs):
    print(f"\n| {name} task | n | nanochat | femtochat | equal |\n|---|---|---|---|---|")
    for label, (acc, n, _) in theirs.items():
        mine = ours.get(label)
        # Compare solved counts: nanochat's CORE accuracies are float32 means.
        same = mine is not None and round(mine * n) == round(acc * n)
        print(f"| {label} | {n} | {acc:.4f} | {mine if mine is None else f'{mine:.4f}'} | {'yes' if same else '**no**'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanochat", required=True, help="nanochat checkout (commit 92d63d4)")
    ap.add_argument("--train", default="target/release/train")
    ap.add_argument("--checkpoint", required=True, help="femtochat run directory")
    ap.add_argument("--bundle", default="data/eval/core")
    ap.add_argument("--chat-data", default="data/eval/chat")
    ap.add_argument("--max-per-task", type=int, default=100)
    ap.add_argument("--tasks", default="", help="CORE labels, comma-separated (default: all present)")
    ap.add_argument("--chat", type=int, default=0, help="problems per ARC/MMLU task (0: skip)")
    ap.add_argument("--gsm8k", type=int, default=0, help="GSM8K problems, greedy (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-core", action="store_true")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    sys.path.insert(0, a.nanochat)
    model, tok, step = load_femtochat(a.checkpoint, a.nanochat)
    only = [t for t in a.tasks.split(",") if t]
    summary = {"step": step, "threads": a.threads, "torch": torch.__version__}
    if not a.skip_core:
        t0 = time.time()
        theirs = nanochat_core(model, tok, a.bundle, a.max_per_task, only)
        summary["nanochat_core_s"] = time.time() - t0
        cmd = [a.train, "eval", "core", "--checkpoint", a.checkpoint, "--bundle", a.bundle,
               "--max-per-task", str(a.max_per_task)] + (["--tasks", ",".join(only)] if only else [])
        lines, summary["femtochat_core_s"] = femtochat(cmd, a.threads)
        ours = {l["task"]: l["accuracy"] for l in lines if "task" in l}
        summary["core_speedup"] = summary["nanochat_core_s"] / summary["femtochat_core_s"]
        summary["core_equal_tasks"] = sum(round(ours.get(k, -1) * v[1]) == round(v[0] * v[1]) for k, v in theirs.items())
        summary["core_tasks"] = len(theirs)
        table("CORE", ours, theirs)
    if a.chat > 0 or a.gsm8k > 0:
        t0 = time.time()
        theirs = nanochat_chat(model, tok, a.chat_data, a.chat, a.gsm8k)
        summary["nanochat_chat_s"] = time.time() - t0
        ours = {}
        for names, n in [("arc-easy,arc-challenge,mmlu", a.chat), ("gsm8k", a.gsm8k)]:
            if n > 0:
                cmd = [a.train, "eval", "chat", "--checkpoint", a.checkpoint, "--data", a.chat_data,
                       "--tasks", names, "--max-problems", str(n)]
                lines, secs = femtochat(cmd, a.threads)
                summary[f"femtochat_{names.split(',')[0]}_s"] = secs
                ours.update({l["task"]: l["accuracy"] for l in lines if "task" in l})
        table("chat", ours, theirs)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
