#!/usr/bin/env python3
"""femtochat's tokenizer vs rustbpe (training) and tiktoken (encoding), same text, same machine.

Usage: python3 benches/tokenizer_vs_python.py [CORPUS.jsonl.gz] [MB]
(build first: cargo build --release -p femtochat-train; needs: pip install rustbpe tiktoken).

Training: ~MB megabytes of documents (default 50) from the corpus (default: the Gutenberg books
of ../shared/data/pretrain), vocab 8192 and 32768; rustbpe gets the same documents through
train_from_iterator, femtochat reads them from a JSONL file (its time includes reading).
Encoding: MB/s of tiktoken.encode_ordinary (1 thread) and encode_ordinary_batch (2 threads) vs
`train tokenizer-eval` with --threads 1 and 2, with the same ranks (femtochat's 32768 tokenizer).
"""
import base64
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import rustbpe
import tiktoken

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "target/release/train")
CORPUS = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "../shared/data/pretrain/gutenberg_en.jsonl.gz")
MB = float(sys.argv[2]) if len(sys.argv) > 2 else 50.0
PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]


def load_docs():
    docs, total = [], 0
    with gzip.open(CORPUS, "rt") as f:
        for line in f:
            text = json.loads(line)["text"]
            # Books are long: cut them into ~10k-character documents, as nanochat's doc_cap does.
            for i in range(0, len(text), 10000):
                docs.append(text[i:i + 10000])
                total += len(docs[-1].encode())
                if total >= MB * 1e6:
                    return docs, total
    return docs, total


def ours(args):
    out = subprocess.run([TRAIN] + args, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    docs, nbytes = load_docs()
    print(f"{len(docs)} documents, {nbytes / 1e6:.1f} MB of UTF-8 from {os.path.basename(CORPUS)}")
    tmp = tempfile.mkdtemp()
    data = os.path.join(tmp, "docs.jsonl")
    with open(data, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")

    print(f"\n{'training':<12} {'vocab':>6} {'rustbpe s':>10} {'femtochat s':>12} {'speedup':>8}")
    for vocab in (8192, 32768):
        t = time.perf_counter()
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), vocab - len(SPECIALS), pattern=PATTERN)
        theirs = time.perf_counter() - t
        out_dir = os.path.join(tmp, f"tok{vocab}")
        line = ours(["tokenizer", "--input", data, "--vocab-size", str(vocab), "--doc-cap", "10000",
                     "--out", out_dir])[-1]
        print(f"{'':<12} {vocab:>6} {theirs:>10.2f} {line['seconds']:>12.2f} {theirs / line['seconds']:>7.2f}x",
              flush=True)

    # Encoding with femtochat's 32768-token ranks in both.
    ranks = {}
    with open(os.path.join(tmp, "tok32768", "tokenizer.tiktoken")) as f:
        for line in f:
            b64, rank = line.split()
            ranks[base64.b64decode(b64)] = int(rank)
    enc = tiktoken.Encoding("femtochat", pat_str=PATTERN, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(SPECIALS)})
    print(f"\n{'encoding':<12} {'threads':>7} {'tiktoken MB/s':>14} {'femtochat MB/s':>15} {'ratio':>6}")
    for threads in (1, 2):
        best = 0.0
        for _ in range(2):
            t = time.perf_counter()
            if threads == 1:
                for d in docs:
                    enc.encode_ordinary(d)
            else:
                enc.encode_ordinary_batch(docs, num_threads=threads)
            best = max(best, nbytes / 1e6 / (time.perf_counter() - t))
        mine = max(ours(["--threads", str(threads), "tokenizer-eval", "--json", "--tokenizer",
                         os.path.join(tmp, "tok32768"), data])[-1]["mb_per_s"] for _ in range(2))
        print(f"{'':<12} {threads:>7} {best:>14.2f} {mine:>15.2f} {mine / best:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
