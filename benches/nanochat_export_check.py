"""nanochat's own code on a checkpoint that `train export-nanochat` wrote (run by
benches/nanochat_export_check.sh, not by CI: torch is a multi-GB install).

With NANOCHAT_BASE_DIR set to the export and nanochat (92d63d4) on PYTHONPATH, it loads the model
the way chat_cli, chat_eval and base_eval do (checkpoint_manager.load_model: build_model,
load_state_dict strict), loads the optimizer file the way chat_sft --load-optimizer does
(setup_optimizer + load_state_dict), and writes NANOCHAT_BASE_DIR/expected.json: prompt ids,
prompt logits and 60 greedy tokens, for the Rust side to compare against.
"""
import json
import os

import torch

from nanochat.checkpoint_manager import load_model, load_optimizer_state

base = os.environ["NANOCHAT_BASE_DIR"]
device = torch.device("cpu")
model, tokenizer, meta = load_model("base", device, phase="eval")
prompt = tokenizer.encode("The meaning of life is", prepend="<|bos|>")
with torch.no_grad():
    logits = model(torch.tensor([prompt]))[0].float().tolist()
    greedy = list(model.generate(prompt, max_tokens=60, temperature=0))
opt = model.setup_optimizer()
opt.load_state_dict(load_optimizer_state("base", device, rank=0))
steps = {s["step"] for s in opt.state.values() if "step" in s}
with open(os.path.join(base, "expected.json"), "w") as f:
    json.dump({"prompt_ids": prompt, "prompt_logits": logits, "greedy_ids": greedy}, f)
print(json.dumps({
    "loaded": "model + optimizer", "step": meta["step"], "optimizer_steps": sorted(steps),
    "config": meta["model_config"], "greedy_text": tokenizer.decode(greedy),
}))
