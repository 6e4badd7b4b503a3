#!/usr/bin/env python3
"""femtochat `train base` against upstream nanochat's own GPT and MuonAdamW, at matched budgets.

Both sides train the same config (depth, width, heads, sequence length, vocab, window pattern),
the same number of steps of the same batch on the same token rows (`train batches` writes the rows
`train base` consumed; nanochat's model is fed exactly those), with the same schedules (nanochat's
base_train formulas evaluated with femtochat's settings), the same threads and device. nanochat
is imported from a checkout or cache of its repository (fetched by the user) at a pinned commit:
the script exports exactly that commit into its work directory and refuses any other.

    python3 benches/vs_nanochat.py --ref 92d63d4 --nanochat ~/src/nanochat \\
        --train target/release/train --tokenizer TOK --depth 4 --seq-len 256 --batch 8 \\
        --steps 40 --eval-every 10 --threads 2 --no-require-gpu

Writes OUT/results.json and OUT/results.md (OUT defaults to results/<date>-vs-nanochat): tok/s,
MFU (with --peak-flops), peak memory, final train loss and validation bpb at every evaluation for
both, with femtochat/nanochat ratios. The raw outputs of both runs are kept in OUT/raw/, and
`--from-raw OUT/raw` rebuilds the results from them without training (the parsing is tested that
way on a committed sample). Needs torch and numpy for a real run; --from-raw needs neither.
"""
import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

# Commits this harness knows how to drive (nanochat's GPT/MuonAdamW/evaluate_bpb API), short ->
# full hash. A newer upstream commit is added here once the harness has been run against it.
PINNED = {"92d63d4": "92d63d4e8bb4df75c3b71618f31ddde2378b2bcd"}

# Steps excluded from throughput on both sides (allocator and cache warm-up, compilation).
WARMUP_STEPS = 3


def resolve_pinned(ref):
    hits = [f for f in PINNED.values() if len(ref) >= 7 and f.startswith(ref.lower())]
    if len(hits) != 1:
        sys.exit(f"--ref {ref}: not a pinned commit ({', '.join(PINNED)}); this harness refuses "
                 f"other commits")
    return hits[0]


def safetensors_numel(path):
    """Number of parameters in a safetensors file, from its header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def export_nanochat(repo, full, dest):
    """Export commit `full` of the git checkout or bare cache `repo` into `dest`."""
    try:
        got = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "--quiet",
                              full + "^{commit}"], capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        sys.exit(f"--nanochat {repo}: commit {full} is not there (fetch it first: git -C {repo} "
                 f"fetch origin {full})")
    if got.stdout.strip() != full:
        sys.exit(f"--nanochat {repo}: {full} resolves to {got.stdout.strip()}; refusing")
    if os.path.isdir(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", repo, "archive", "--format=tar", full],
                             capture_output=True, check=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(dest, filter="data")
    with open(os.path.join(dest, "PINNED_COMMIT"), "w") as f:
        f.write(full + "\n")
    return dest


def run_measured(cmd, env=None, stdout=None):
    """Run cmd; returns (exit status, peak RSS in KiB, wall seconds) of that process alone."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=stdout)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The nanochat side (a subprocess, so its peak memory is its own).

def nanochat_worker(cfg_path):
    import numpy as np
    import torch

    cfg = json.load(open(cfg_path))
    if not cfg["compile"]:
        # nanochat decorates its fused optimizer steps with torch.compile(fullgraph=True); with
        # compilation off they run as the eager functions they are.
        torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    sys.path.insert(0, cfg["nanochat_src"])
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.loss_eval import evaluate_bpb

    torch.set_num_threads(cfg["threads"])
    torch.set_num_interop_threads(1)
    device = torch.device(cfg["device"])
    st, m = cfg["settings"], cfg["settings"]["model"]
    torch.manual_seed(st["seed"])
    gcfg = GPTConfig(sequence_len=m["sequence_len"], vocab_size=m["vocab_size"],
                     n_layer=m["n_layer"], n_head=m["n_head"], n_kv_head=m["n_kv_head"],
                     n_embd=m["n_embd"], window_pattern=m["window_pattern"])
    with torch.device("meta"):
        model = GPT(gcfg)
    model.to_empty(device=device)
    model.init_weights()
    opt = model.setup_optimizer(unembedding_lr=st["unembedding_lr"],
                                embedding_lr=st["embedding_lr"], matrix_lr=st["matrix_lr"],
                                weight_decay=st["weight_decay"], scalar_lr=st["scalar_lr"])
    step_model = torch.compile(model, dynamic=False) if cfg["compile"] else model
    rows = cfg["rows"]
    meta = json.load(open(os.path.join(rows, "meta.json")))
    B, T = meta["batch"], meta["seq_len"]
    train = np.fromfile(os.path.join(rows, "train.u32"), dtype="<u4").reshape(-1, B, T + 1)
    val = np.fromfile(os.path.join(rows, "val.u32"), dtype="<u4").reshape(-1, T + 1)
    token_bytes = torch.from_numpy(np.fromfile(os.path.join(rows, "token_bytes.u32"),
                                               dtype="<u4").astype(np.int64)).to(device)

    def emit(**kw):
        print(json.dumps(kw), flush=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def val_bpb():
        model.eval()
        batches = []
        for i in range(0, len(val) - B + 1, B):
            r = torch.from_numpy(val[i:i + B].astype(np.int64)).to(device)
            batches.append((r[:, :-1].contiguous(), r[:, 1:].contiguous()))
        bpb = evaluate_bpb(model, batches, len(batches), token_bytes)
        model.train()
        return bpb

    n, accum = st["num_iterations"], st["grad_accum_steps"]
    wd_iters = round(st["warmdown_ratio"] * n)

    # nanochat's base_train schedules, with femtochat's settings
    def lr_mult(it):
        if it < st["warmup_steps"]:
            return (it + 1) / st["warmup_steps"]
        if it <= n - wd_iters:
            return 1.0
        p = (n - it) / wd_iters
        return p + (1 - p) * st["final_lr_frac"]

    def momentum(it):
        start = n - wd_iters
        if it < 400:
            return (1 - it / 400) * 0.85 + it / 400 * 0.97
        if it >= start:
            p = (it - start) / wd_iters
            return 0.97 * (1 - p) + 0.90 * p
        return 0.97

    emit(kind="info", torch=torch.__version__, device=str(device), compile=cfg["compile"],
         flops_per_token=model.estimate_flops(), params=sum(p.numel() for p in model.parameters()),
         dtype=str(next(model.parameters()).dtype))
    every = st["eval_every"]
    for it in range(n):
        if every > 0 and it % every == 0:
            emit(kind="eval", step=it, val_bpb=val_bpb())
        sync()
        t0 = time.perf_counter()
        loss_sum = 0.0
        for k in range(accum):
            r = torch.from_numpy(train[it * accum + k].astype(np.int64)).to(device)
            loss = step_model(r[:, :-1].contiguous(), r[:, 1:].contiguous())
            (loss / accum).backward()
            loss_sum += loss.item()
        lrm = lr_mult(it)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lrm
            if g["kind"] == "muon":
                g["momentum"] = momentum(it)
                g["weight_decay"] = st["weight_decay"] * 0.5 * (1 + math.cos(math.pi * it / n))
        opt.step()
        model.zero_grad(set_to_none=True)
        sync()
        emit(kind="step", step=it, loss=loss_sum / accum, dt=time.perf_counter() - t0)
    emit(kind="eval", step=n, val_bpb=val_bpb())
    if device.type == "cuda":
        emit(kind="memory", peak_bytes=torch.cuda.max_memory_allocated())


# ---------------------------------------------------------------------------------------------
# Results from the raw outputs (tested on a committed sample: --from-raw).

def median_tok_per_s(step_tok_per_s):
    xs = step_tok_per_s[WARMUP_STEPS:] if len(step_tok_per_s) > WARMUP_STEPS else step_tok_per_s
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def build_results(raw):
    """raw: a directory with run.json, femtochat_metrics.jsonl and nanochat.jsonl."""
    run = json.load(open(os.path.join(raw, "run.json")))
    fem = [json.loads(l) for l in open(os.path.join(raw, "femtochat_metrics.jsonl")) if l.strip()]
    # nanochat prints its own notes on stdout too; the worker's records are the JSON lines
    nan = [json.loads(l) for l in open(os.path.join(raw, "nanochat.jsonl")) if l.startswith("{")]
    tokens = run["tokens_per_step"]
    info = next((x for x in nan if x.get("kind") == "info"), {})
    f_steps = [x for x in fem if "loss" in x]
    n_steps = [x for x in nan if x.get("kind") == "step"]
    f_tps = median_tok_per_s([x["tok_per_s"] for x in f_steps])
    n_tps = median_tok_per_s([tokens / x["dt"] for x in n_steps])
    flops = info.get("flops_per_token")
    peak = run.get("peak_flops")
    mfu = lambda tps: flops * tps / peak if flops and peak and tps else None  # noqa: E731
    f_mem = run["femtochat"]["maxrss_kib"] / 1024
    mem_note = "peak RSS of each process"
    n_mem = run["nanochat"]["maxrss_kib"] / 1024
    cuda_mem = next((x["peak_bytes"] for x in nan if x.get("kind") == "memory"), None)
    if cuda_mem is not None:
        n_mem, mem_note = cuda_mem / 2**20, "nanochat: torch.cuda.max_memory_allocated"
    f_eval = {x["step"]: x["val_bpb"] for x in fem if "val_bpb" in x}
    n_eval = {x["step"]: x["val_bpb"] for x in nan if x.get("kind") == "eval"}
    evals = [{"step": s, "femtochat": f_eval[s], "nanochat": n_eval[s],
              "ratio": ratio(f_eval[s], n_eval[s])} for s in sorted(set(f_eval) & set(n_eval))]
    f_loss = f_steps[-1]["loss"] if f_steps else None
    n_loss = n_steps[-1]["loss"] if n_steps else None
    return {
        "date": run["date"], "config": run["config"], "machine": run["machine"],
        "femtochat_commit": run["femtochat"]["commit"], "nanochat_commit": run["nanochat"]["sha"],
        "torch": info.get("torch"), "nanochat_device": info.get("device"),
        "nanochat_compile": info.get("compile"), "nanochat_dtype": info.get("dtype"),
        "steps": {"femtochat": len(f_steps), "nanochat": len(n_steps)},
        "params": {"femtochat": run["femtochat"].get("params"), "nanochat": info.get("params")},
        "flops_per_token": flops, "peak_flops": peak,
        "tok_per_s": {"femtochat": f_tps, "nanochat": n_tps, "ratio": ratio(f_tps, n_tps)},
        "mfu": {"femtochat": mfu(f_tps), "nanochat": mfu(n_tps),
                "ratio": ratio(mfu(f_tps), mfu(n_tps))},
        "peak_memory_mib": {"femtochat": f_mem, "nanochat": n_mem, "ratio": ratio(f_mem, n_mem),
                            "what": mem_note},
        "final_train_loss": {"femtochat": f_loss, "nanochat": n_loss,
                             "ratio": ratio(f_loss, n_loss)},
        "val_bpb": evals,
        "wall_s": {"femtochat": run["femtochat"]["wall_s"], "nanochat": run["nanochat"]["wall_s"]},
    }


def fmt(x, spec, suffix=""):
    return "-" if x is None else format(x, spec) + suffix


def markdown(r):
    c = r["config"]
    lines = [
        f"# femtochat vs nanochat ({r['date']})",
        "",
        f"nanochat `{r['nanochat_commit'][:7]}` (its own GPT, MuonAdamW and evaluate_bpb; torch "
        f"{r['torch']}, {r['nanochat_dtype']}, torch.compile {'on' if r['nanochat_compile'] else 'off'}) "
        f"against femtochat `{r['femtochat_commit']}` `train base`, on {r['machine']['device']} with "
        f"{c['threads']} threads, on the same token rows: depth {c['depth']} (d_model "
        f"{c['n_embd']}, {c['n_head']} heads), vocab {c['vocab_size']}, sequence {c['seq_len']}, "
        f"batch {c['batch']}, {c['steps']} steps, window pattern {c['window_pattern']}. "
        f"Machine: {r['machine']['cpu']}; load before: {r['machine']['uptime']}.",
        "",
        "| metric | femtochat | nanochat | femtochat / nanochat |",
        "|---|---:|---:|---:|",
        f"| tokens/s (median, first {WARMUP_STEPS} steps excluded) | "
        f"{fmt(r['tok_per_s']['femtochat'], ',.0f')} | {fmt(r['tok_per_s']['nanochat'], ',.0f')} | "
        f"{fmt(r['tok_per_s']['ratio'], '.2f', 'x')} |",
        f"| MFU | {fmt(r['mfu']['femtochat'], '.2%')} | {fmt(r['mfu']['nanochat'], '.2%')} | "
        f"{fmt(r['mfu']['ratio'], '.2f', 'x')} |",
        f"| peak memory (MiB) | {fmt(r['peak_memory_mib']['femtochat'], ',.0f')} | "
        f"{fmt(r['peak_memory_mib']['nanochat'], ',.0f')} | "
        f"{fmt(r['peak_memory_mib']['ratio'], '.2f', 'x')} |",
        f"| final train loss | {fmt(r['final_train_loss']['femtochat'], '.4f')} | "
        f"{fmt(r['final_train_loss']['nanochat'], '.4f')} | "
        f"{fmt(r['final_train_loss']['ratio'], '.4f')} |",
    ]
    for e in r["val_bpb"]:
        lines.append(f"| val bpb at step {e['step']} | {e['femtochat']:.4f} | {e['nanochat']:.4f} | "
                     f"{fmt(e['ratio'], '.4f')} |")
    lines += [
        "",
        f"Parameters: femtochat {r['params']['femtochat']}, nanochat {r['params']['nanochat']}. "
        f"FLOPs per token (nanochat's estimate_flops, used for both MFUs): "
        f"{fmt(r['flops_per_token'], ',')}; peak FLOP/s: {fmt(r['peak_flops'], '.3g')} "
        f"(no MFU without --peak-flops). Memory: {r['peak_memory_mib']['what']} (RSS includes "
        f"each runtime: the Python interpreter and torch on one side, the Rust binary on the "
        f"other). Both start from their own random initialisation, so the loss and bpb columns "
        f"compare the training recipes, not shared weights.",
        "",
    ]
    return "\n".join(lines)


def write_results(raw, out):
    r = build_results(raw)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(r, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(r))
    return r


# ---------------------------------------------------------------------------------------------

def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="92d63d4", help="pinned nanochat commit")
    ap.add_argument("--nanochat", help="nanochat git checkout or bare cache holding --ref")
    ap.add_argument("--train", default="target/release/train")
    ap.add_argument("--tokenizer", help="tokenizer directory (train tokenizer)")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--total-batch-size", type=int,
                    help="tokens per step (default: one micro-batch, batch x seq-len; train base "
                         "would otherwise pick nanochat's automatic batch size)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--window-pattern", default="L")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--peak-flops", type=float, help="device peak FLOP/s, for MFU")
    ap.add_argument("--no-require-gpu", action="store_true",
                    help="run both on the CPU (default: both on the GPU, CUDA for nanochat)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="torch.compile nanochat's model and optimizer (auto: on for GPU)")
    ap.add_argument("--out", help="results directory (default results/<date>-vs-nanochat)")
    ap.add_argument("--work", default="runs/vs_nanochat", help="scratch directory")
    ap.add_argument("--from-raw", help="rebuild OUT/results.* from a raw/ directory; no training")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return nanochat_worker(a.worker)
    date = datetime.date.today().isoformat()
    out = a.out or os.path.join("results", f"{date}-vs-nanochat")
    if a.from_raw:
        r = write_results(a.from_raw, out)
        print(json.dumps({"out": out, "tok_per_s_ratio": r["tok_per_s"]["ratio"]}))
        return
    if not a.nanochat or not a.tokenizer:
        ap.error("--nanochat and --tokenizer are required (or --from-raw)")
    full = resolve_pinned(a.ref)
    work = os.path.abspath(a.work)
    src = export_nanochat(a.nanochat, full, os.path.join(work, f"nanochat-{full[:7]}"))
    import torch

    gpu = not a.no_require_gpu
    if gpu and not torch.cuda.is_available():
        sys.exit("no CUDA GPU for nanochat; pass --no-require-gpu to compare on the CPU")
    compile_on = {"on": True, "off": False, "auto": gpu}[a.compile]
    raw = os.path.join(out, "raw")
    os.makedirs(raw, exist_ok=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    fem_dir, rows_dir = os.path.join(work, "femtochat"), os.path.join(work, "rows")
    common = ["--tokenizer", a.tokenizer, "--device-batch-size", str(a.batch),
              "--max-seq-len", str(a.seq_len)]
    cmd = [a.train, "--threads", str(a.threads), "base", *common, "--out", fem_dir,
           "--depth", str(a.depth), "--num-iterations", str(a.steps),
           "--total-batch-size", str(a.total_batch_size or a.batch * a.seq_len),
           "--window-pattern", a.window_pattern, "--eval-every", str(a.eval_every),
           "--eval-tokens", str(a.eval_tokens), "--sample-every", "0", "--save-every", "0",
           "--device", "gpu" if gpu else "cpu"]
    if os.path.isdir(fem_dir):
        shutil.rmtree(fem_dir)
    print("+", " ".join(cmd), file=sys.stderr)
    rc, fem_rss, fem_wall = run_measured(cmd, stdout=subprocess.DEVNULL)
    if rc != 0:
        sys.exit(f"femtochat run failed ({rc})")
    latest = json.load(open(os.path.join(fem_dir, "latest.json")))
    state = json.load(open(os.path.join(fem_dir, latest["dir"], "state.json")))
    st = state["settings"]
    shutil.copy(os.path.join(fem_dir, "metrics.jsonl"), os.path.join(raw, "femtochat_metrics.jsonl"))
    subprocess.run([a.train, "batches", *common, "--micro-batches",
                    str(st["num_iterations"] * st["grad_accum_steps"]),
                    "--eval-tokens", str(a.eval_tokens), "--out", rows_dir],
                   check=True, stdout=subprocess.DEVNULL)

    cfg_path = os.path.join(work, "nanochat_cfg.json")
    json.dump({"nanochat_src": src, "rows": rows_dir, "settings": st, "threads": a.threads,
               "device": "cuda" if gpu else "cpu", "compile": compile_on}, open(cfg_path, "w"))
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), NANOCHAT_BASE_DIR=work)
    with open(os.path.join(raw, "nanochat.jsonl"), "w") as f:
        rc, nan_rss, nan_wall = run_measured(
            [sys.executable, os.path.abspath(__file__), "--worker", cfg_path], env=env, stdout=f)
    if rc != 0:
        sys.exit(f"nanochat run failed ({rc})")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    m = st["model"]
    run = {
        "date": date,
        "tokens_per_step": a.batch * a.seq_len * st["grad_accum_steps"],
        "peak_flops": a.peak_flops,
        "config": {"depth": a.depth, "n_embd": m["n_embd"], "n_head": m["n_head"],
                   "vocab_size": m["vocab_size"], "seq_len": a.seq_len, "batch": a.batch,
                   "steps": a.steps, "eval_every": a.eval_every, "eval_tokens": a.eval_tokens,
                   "window_pattern": a.window_pattern, "threads": a.threads},
        "machine": {"cpu": cpu_name(), "uptime": uptime, "device": "GPU" if gpu else "CPU"},
        "femtochat": {"commit": commit, "maxrss_kib": fem_rss, "wall_s": fem_wall,
                      "cmd": cmd,
                      "params": safetensors_numel(os.path.join(fem_dir, latest["dir"],
                                                               "model.safetensors"))},
        "nanochat": {"sha": full, "maxrss_kib": nan_rss, "wall_s": nan_wall},
    }
    with open(os.path.join(raw, "run.json"), "w") as f:
        json.dump(run, f, indent=2)
    r = write_results(raw, out)
    print(json.dumps(r))
    print(markdown(r), file=sys.stderr)


if __name__ == "__main__":
    main()
