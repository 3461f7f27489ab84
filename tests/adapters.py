"""Tiny PEFT adapters made with `peft` itself, with weights that change the base model's output."""

from __future__ import annotations

import os
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM


def load_base(base_dir: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def make_lora(base_dir: str, out_dir: str, *, r: int, targets: list[str] | str, seed: int = 0,
              alpha: int | None = None, **cfg: Any) -> str:
    """A LoRA adapter with random A and B (init_lora_weights=False), saved as PEFT saves it."""
    if os.path.isfile(os.path.join(out_dir, "adapter_config.json")):
        return out_dir
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), LoraConfig(
        r=r, lora_alpha=alpha if alpha is not None else 2 * r, target_modules=targets, init_lora_weights=False,
        lora_dropout=0.0, task_type="CAUSAL_LM", **cfg))
    model.save_pretrained(out_dir)
    return out_dir


def peft_model(base_dir: str, adapter_dir: str | None) -> Any:
    base = load_base(base_dir)
    return base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()


def greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """What `generate` gives for one prompt alone, with a fixed output length (EOS suppressed)."""
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


def greedy_recompute(model: Any, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """Greedy decoding by full recomputation: argmax of the last logits each step (EOS masked)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            if eos is not None:
                logits[eos] = float("-inf")
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def token_logprobs(model: Any, prompt: list[int], out: list[int]) -> list[float]:
    """Log-probabilities of `out` after `prompt`, indexed from the end (prompt tuning prepends positions)."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + out])).logits[0].float()
    lp = torch.log_softmax(logits[-len(out) - 1:-1], -1)
    return [lp[i, t].item() for i, t in enumerate(out)]


def make_prompt_learning(base_dir: str, out_dir: str, kind: str, *, num_virtual_tokens: int = 5, seed: int = 0,
                         **cfg: Any) -> str:
    """A prefix-tuning ("prefix"), prompt-tuning ("prompt") or p-tuning ("ptuning") adapter with random weights."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    if os.path.isfile(os.path.join(out_dir, "adapter_config.json")):
        return out_dir
    config_cls = {"prefix": PrefixTuningConfig, "prompt": PromptTuningConfig, "ptuning": PromptEncoderConfig}[kind]
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), config_cls(task_type="CAUSAL_LM",
                                                           num_virtual_tokens=num_virtual_tokens, **cfg))
    with torch.no_grad():  # large random weights, so the adapter visibly steers the output
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 1.0 if "embedding" in name else 0.5)
    model.save_pretrained(out_dir)
    return out_dir


def make_ia3(base_dir: str, out_dir: str, *, seed: int = 0, **cfg: Any) -> str:
    """An IA3 adapter with random vectors (init_ia3_weights=False: N(0, 1) instead of ones), saved by peft."""
    from peft import IA3Config

    if os.path.isfile(os.path.join(out_dir, "adapter_config.json")):
        return out_dir
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False, **cfg))
    with torch.no_grad():  # around 1 with a large spread: visibly steers, never collapses the activations
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1.0 + 0.8 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return out_dir


def make_dora(base_dir: str, out_dir: str, *, r: int, targets: list[str] | str, seed: int = 0, **cfg: Any) -> str:
    """A DoRA adapter (use_dora=True) with random A/B and a magnitude scaled away from the initial column norms."""
    if os.path.isfile(os.path.join(out_dir, "adapter_config.json")):
        return out_dir
    torch.manual_seed(seed)
    model = get_peft_model(load_base(base_dir), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, use_dora=True, lora_dropout=0.0,
        task_type="CAUSAL_LM", **cfg))
    with torch.no_grad():  # at init m = ||W + sBA|| (DoRA == LoRA): move it so the magnitude matters
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(0.5 + torch.rand_like(p))
    model.save_pretrained(out_dir)
    return out_dir
