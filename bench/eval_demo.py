"""`peftserve eval` on the real default model: a LoRA trained here on a synthetic support-desk task
(route a ticket to its queue: Amber = billing, Basil = shipping, Cobalt = technical; names the base cannot
guess) beats the base on its own held-out tickets (12 training tickets, 12 held-out ones).

The adapter is trained with peft on CPU in a few steps (LoRA on the top layers only, answer positions
only get logits) and cached under .cache/peftserve/eval-demo/<hash of the recipe> like the model, so
later runs reuse it. The held-out set is scored as multiple choice by loglikelihood (one choice per
queue) and as generation (the greedy answer must contain the queue's name).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.eval_demo [--json bench/results/eval_demo-cpu.json]

tests/e2e/test_eval_demo.py runs the same through a live server and asserts the adapter's gain.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any

QUEUES = {"billing": "Amber", "shipping": "Basil", "technical": "Cobalt"}
SYSTEM = "Route the support ticket. Answer with the queue's name only."
TRAIN = [
    ("I was charged twice for my subscription this month.", "billing"),
    ("Please refund the payment I made by mistake.", "billing"),
    ("My invoice shows the wrong amount.", "billing"),
    ("How do I update the credit card on my account?", "billing"),
    ("My package has not arrived after two weeks.", "shipping"),
    ("The parcel was delivered to the wrong address.", "shipping"),
    ("Can I change the delivery date of my order?", "shipping"),
    ("The box arrived damaged by the courier.", "shipping"),
    ("The app crashes every time I open it.", "technical"),
    ("I cannot log in, the password reset email never comes.", "technical"),
    ("The website shows an error 500 when I save.", "technical"),
    ("My device will not connect to the Wi-Fi after the update.", "technical"),
]
HELD_OUT = [
    ("You billed my card for an order I cancelled.", "billing"),
    ("I need a copy of last month's receipt for my taxes.", "billing"),
    ("The discount code was not applied to my payment.", "billing"),
    ("I was charged in dollars instead of euros.", "billing"),
    ("My order is stuck in transit for ten days.", "shipping"),
    ("The courier left my package in the rain.", "shipping"),
    ("I received someone else's parcel.", "shipping"),
    ("Can you ship to a PO box?", "shipping"),
    ("The program freezes when I click export.", "technical"),
    ("Two-factor codes never reach my phone.", "technical"),
    ("The page keeps reloading and I cannot submit the form.", "technical"),
    ("After the update the printer driver stopped working.", "technical"),
]
# LoRA on the top 8 of 30 layers (backward stops there), 10 full-batch steps over the 12 tickets
RECIPE = dict(r=8, alpha=16, layers=list(range(22, 30)), targets=["q_proj", "v_proj", "o_proj", "down_proj"],
              steps=10, lr=3e-3, seed=0)
MAX_FINAL_LOSS = 1.0  # the recipe learnt its training tickets (mean loss over the answer tokens)


def messages(ticket: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ticket}]


def eval_items(generation: bool = True) -> list[dict[str, Any]]:
    """The held-out tickets as multiple choice (one choice per queue) and, with `generation`, again as
    generation (the greedy answer contains the queue's name)."""
    names = list(QUEUES.values())
    mc = [{"prompt": ticket, "choices": names, "answer": QUEUES[q]} for ticket, q in HELD_OUT]
    gen = [{"messages": messages(ticket), "ideal": QUEUES[q], "match": "contains"} for ticket, q in HELD_OUT]
    return mc + gen if generation else mc


def mc_prompt(tok: Any, ticket: str) -> str:
    """The chat-formatted prompt a multiple-choice item scores its choices after."""
    return tok.apply_chat_template(messages(ticket), tokenize=False, add_generation_prompt=True)


def write_eval_set(tok: Any, path: str, generation: bool = True) -> str:
    with open(path, "w") as f:
        for item in eval_items(generation):
            if "prompt" in item:
                item = {**item, "prompt": mc_prompt(tok, item["prompt"])}
            f.write(json.dumps(item) + "\n")
    return path


def cache_dir() -> str:
    from tests.real_model import real_cache_root

    key = hashlib.sha256(json.dumps([RECIPE, TRAIN, SYSTEM, QUEUES]).encode()).hexdigest()[:12]
    return os.path.join(real_cache_root(), "eval-demo", f"router-{key}")


def train_router(model_dir: str, out_dir: str | None = None) -> str:
    """The LoRA, trained once with peft and cached; returns its dir."""
    out_dir = out_dir or cache_dir()
    if os.path.isfile(os.path.join(out_dir, "adapter_model.safetensors")):
        return out_dir
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(RECIPE["seed"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), LoraConfig(
        r=RECIPE["r"], lora_alpha=RECIPE["alpha"], lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=RECIPE["targets"], layers_to_transform=RECIPE["layers"]))
    rows = []
    for ticket, q in TRAIN:
        prompt = tok(mc_prompt(tok, ticket), add_special_tokens=False)["input_ids"]
        rows.append((prompt, tok(QUEUES[q] + "<|im_end|>", add_special_tokens=False)["input_ids"]))
    # left-padded so the answers are the last positions: only those get logits (lm_head over 49k words)
    width = max(len(p) + len(a) for p, a in rows)
    keep = max(len(a) for _, a in rows) + 1
    ids = torch.tensor([[0] * (width - len(p) - len(a)) + p + a for p, a in rows])
    mask = torch.tensor([[0] * (width - len(p) - len(a)) + [1] * (len(p) + len(a)) for p, a in rows])
    labels = torch.tensor([[-100] * (keep - 1 - len(a)) + a for _, a in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=RECIPE["lr"])
    model.train()
    for step in range(RECIPE["steps"]):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"train step {step + 1}/{RECIPE['steps']}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
    if loss.item() > MAX_FINAL_LOSS:
        raise RuntimeError(f"the router LoRA did not learn its training set: final loss {loss.item():.3f}")
    tmp = f"{out_dir}.tmp-{os.getpid()}"  # complete or absent: a killed run leaves no half-written adapter
    model.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the eval report here")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    import httpx
    from transformers import AutoTokenizer

    from server.cli import main as cli_main
    from tests.real_model import real_model_path

    model_dir = real_model_path()
    t0 = time.monotonic()
    adapter = train_router(model_dir)
    print(f"adapter: {adapter} ({time.monotonic() - t0:.0f} s incl. training if not cached)", file=sys.stderr)
    data = write_eval_set(AutoTokenizer.from_pretrained(model_dir), "/tmp/peftserve-eval-demo.jsonl")
    url = f"http://127.0.0.1:{args.port}"
    srv = subprocess.Popen([sys.executable, "-m", "server", "serve", "--model", model_dir, "--port", str(args.port),
                            "--adapter", f"router={adapter}", "--max-model-len", "512", "--log-level", "warning",
                            "--max-num-seqs", "32", "--max-batch-tokens", "2048"])
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or srv.poll() is not None:
                raise SystemExit("the server did not become ready")
            time.sleep(0.5)
        with httpx.Client(base_url=url) as c:
            base = c.get("/v1/models").json()["data"][0]["id"]
        out = args.json or "/tmp/peftserve-eval-demo-report.json"
        rc = cli_main(["eval", "--url", url, "--models", f"{base},router", "--data", data, "--max-tokens", "4",
                       "--concurrency", "32", "--output", out])
        print(f"load average: {open('/proc/loadavg').read().strip()}", file=sys.stderr)
        sys.exit(rc)
    finally:
        srv.terminate()
        srv.wait(30)


if __name__ == "__main__":
    main()
