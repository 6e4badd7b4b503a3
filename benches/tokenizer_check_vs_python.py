#!/usr/bin/env python3
"""Real-data equality check beside the speed bench: on the same documents as
benches/tokenizer_vs_python.py, femtochat's training gives exactly rustbpe's ranks, and encoding
with those ranks gives as many tokens as tiktoken (femtochat's CLI reports counts, not ids;
exact ids are checked by tests/tokenizer_parity.rs on the fixtures).

Usage: python3 benches/tokenizer_check_vs_python.py [CORPUS.jsonl.gz] [MB]
(build first: cargo build --release -p femtochat-train; needs: pip install rustbpe tiktoken).
"""
import base64
import json
import os
import sys
import tempfile

import rustbpe
import tiktoken

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tokenizer_vs_python as bench  # noqa: E402  (shares the corpus cutting and the pattern)


def read_ranks(path):
    ranks = {}
    with open(path) as f:
        for line in f:
            b64, rank = line.split()
            ranks[base64.b64decode(b64)] = int(rank)
    return ranks


def main():
    docs, nbytes = bench.load_docs()
    print(f"{len(docs)} documents, {nbytes / 1e6:.1f} MB")
    tmp = tempfile.mkdtemp()
    data = os.path.join(tmp, "docs.jsonl")
    with open(data, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    ok = True
    for vocab in (8192, 32768):
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(docs), vocab - len(bench.SPECIALS), pattern=bench.PATTERN)
        theirs = {rank: bytes(b) for b, rank in tok.get_mergeable_ranks()}
        out = os.path.join(tmp, f"tok{vocab}")
        bench.ours(["tokenizer", "--input", data, "--vocab-size", str(vocab), "--doc-cap", "10000",
                    "--out", out])
        ranks = read_ranks(os.path.join(out, "tokenizer.tiktoken"))
        ours = {rank: b for b, rank in ranks.items()}
        diff = next((r for r in range(max(len(theirs), len(ours))) if theirs.get(r) != ours.get(r)), None)
        enc = tiktoken.Encoding(f"check{vocab}", pat_str=bench.PATTERN, mergeable_ranks=ranks,
                                special_tokens={})
        want = sum(len(ids) for ids in enc.encode_ordinary_batch(docs, num_threads=2))
        got = bench.ours(["tokenizer-eval", "--json", "--tokenizer", out, data])[-1]["tokens"]
        print(f"vocab {vocab}: {len(ours)} ranks, first rank differing from rustbpe: {diff}; "
              f"tokens tiktoken {want}, femtochat {got}")
        ok &= diff is None and want == got
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
