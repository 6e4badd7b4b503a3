"""Make the nanochat interop fixtures that ../shared/fixtures/nanochat_checkpoint does not have,
with nanochat's own code (commit 92d63d4, checked out outside this repo) and PyPI's torch and
tiktoken. Not run by CI (torch is a multi-GB install); its outputs are committed under
tests/fixtures/nanochat_checkpoint/.

    python -m venv /tmp/nanoenv && /tmp/nanoenv/bin/pip install torch tiktoken rustbpe filelock numpy
    git -C <nanochat bare repo> archive 92d63d4 | tar x -C /tmp/nanochat
    PYTHONPATH=/tmp/nanochat /tmp/nanoenv/bin/python tools/nanochat_fixtures.py \
        tests/fixtures/nanochat_checkpoint

Writes into FIXTURE_DIR:
- encode.jsonl: {"text", "ids"} = the pickled tiktoken.Encoding's encode_ordinary(text), and
  {"ids", "decoded"} = its decode(ids), for texts that stress the split pattern and the merges.
- bf16/: a NANOCHAT_BASE_DIR holding the fixture model as a torch.compile'd bf16 run saves it:
  every key prefixed `_orig_mod.`, matrices and embeddings in bf16, the scalars kept in fp32, and
  two tensors stored as views (lm_head.weight transposed, i.e. non-contiguous strides;
  smear_lambda at a storage offset) so a reader must honour strides and offsets; written by
  nanochat's save_checkpoint. bf16/expected.json: prompt logits and 60 greedy tokens from
  nanochat's build_model (which strips the prefix and widens bf16 to fp32 on the CPU).
- optim_check.json: every optimizer buffer of optim_000030_rank0.pt under femtochat's name
  (`<param>.exp_avg`, `.momentum_buffer`, ...) as [sum, first, last] and the AdamW `step`,
  found through torch itself: nanochat's setup_optimizer + load_state_dict, then each parameter
  object's state (a Muon group's stacked buffers sliced by member), so the mapping is checked
  against torch's, not re-derived.
"""
import json
import os
import pickle
import shutil
import sys

import torch

FIXTURE = sys.argv[1]

TEXTS = [
    "The ",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.",
    "Hello, world! How's it going? I'm fine; they've gone, we'll see, you're late, she'd know.",
    "  leading spaces, trailing spaces   \n\n\n\ttabs\tand\r\nCRLF lines\r\n",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000 0x1F",
    "unicode: café naïve Ærøskøbing Straße, 日本語のテキスト, 中文文本, 한국어",
    "emoji: 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ — “quotes” ‘single’ … ellipsis",
    "code: fn main() { let x = vec![1, 2, 3]; println!(\"{:?}\", x); } // comment",
    "<|bos|> special token text is ordinary text here <|assistant_end|>",
    "KING RICHARD III:\nNow is the winter of our discontent\nMade glorious summer by this sun of York;",
    "",
    "a",
    "\n",
    "''''''''''''''''''''''''''''''''''''''''''''''''''",
]


def encode_fixture():
    with open(os.path.join(FIXTURE, "tokenizer", "tokenizer.pkl"), "rb") as f:
        enc = pickle.load(f)
    with open(os.path.join(FIXTURE, "encode.jsonl"), "w", encoding="utf-8") as out:
        for text in TEXTS:
            out.write(json.dumps({"text": text, "ids": enc.encode_ordinary(text)}, ensure_ascii=False) + "\n")
        for ids in [[598, 346, 32], list(range(250, 280)), [598, 84, 273, 368, 603, 604]]:
            out.write(json.dumps({"ids": ids, "decoded": enc.decode(ids)}, ensure_ascii=False) + "\n")


def bf16_fixture():
    out = os.path.join(FIXTURE, "bf16")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(os.path.join(FIXTURE, "tokenizer"), os.path.join(out, "tokenizer"))
    os.environ["NANOCHAT_BASE_DIR"] = out
    from nanochat.checkpoint_manager import build_model, save_checkpoint

    src = os.path.join(FIXTURE, "base_checkpoints", "d2")
    model, _, meta = build_model(src, 30, torch.device("cpu"), phase="eval")
    scalars = {"resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"}
    for name, p in model.named_parameters():
        if name not in scalars:
            p.data = p.data.to(torch.bfloat16)
    compiled = torch.compile(model)  # never run: only its state_dict() keys matter
    state = compiled.state_dict()
    assert all(k.startswith("_orig_mod.") for k in state)
    w = state["_orig_mod.lm_head.weight"]
    state["_orig_mod.lm_head.weight"] = w.t().contiguous().t()
    assert not state["_orig_mod.lm_head.weight"].is_contiguous()
    s = state["_orig_mod.smear_lambda"]
    state["_orig_mod.smear_lambda"] = torch.cat([torch.full_like(s, 7.0), s])[1:]
    assert state["_orig_mod.smear_lambda"].storage_offset() == 1
    save_checkpoint(os.path.join(out, "base_checkpoints", "d2"), 30, state, None, meta)

    loaded, tokenizer, _ = build_model(os.path.join(out, "base_checkpoints", "d2"), 30, torch.device("cpu"), phase="eval")
    prompt = [tokenizer.get_bos_token_id()] + tokenizer.encode("The ")
    with torch.no_grad():
        logits = loaded(torch.tensor([prompt]))[0].float().tolist()
        greedy = list(loaded.generate(prompt, max_tokens=60, temperature=0))
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"prompt_ids": prompt, "prompt_logits": logits, "greedy_ids": greedy}, f)


def optim_fixture():
    os.environ["NANOCHAT_BASE_DIR"] = FIXTURE
    from nanochat.checkpoint_manager import build_model

    src = os.path.join(FIXTURE, "base_checkpoints", "d2")
    model, _, _ = build_model(src, 30, torch.device("cpu"), phase="train")
    opt = model.setup_optimizer()
    opt.load_state_dict(torch.load(os.path.join(src, "optim_000030_rank0.pt"), map_location="cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    summary = lambda t: [t.double().sum().item(), t.flatten()[0].item(), t.flatten()[-1].item()]
    for group in opt.param_groups:
        params = group["params"]
        for j, p in enumerate(params):
            name = names[id(p)]
            if group["kind"] == "adamw":
                st = opt.state[p]
                out[name + ".exp_avg"] = summary(st["exp_avg"])
                out[name + ".exp_avg_sq"] = summary(st["exp_avg_sq"])
                out["step"] = st["step"]
            else:
                st = opt.state[params[0]]
                out[name + ".momentum_buffer"] = summary(st["momentum_buffer"][j])
                out[name + ".second_momentum_buffer"] = summary(st["second_momentum_buffer"][j])
    with open(os.path.join(FIXTURE, "optim_check.json"), "w") as f:
        json.dump(out, f, indent=1)


encode_fixture()
optim_fixture()
bf16_fixture()
print("wrote", FIXTURE)
