"""Load a PEFT adapter directory into CPU fp32 tensors in the layout the model's slots use.

What peft 0.21 saves (`get_peft_model_state_dict` → `BasePromptEncoder._get_adapter_state_dict`):
- LoRA: `base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight` [r, in] and `.lora_B.weight`
  [out, r] per targeted module.
- Prefix / prompt / p-tuning: one tensor `prompt_embeddings`, already passed through any encoder
  (`get_prompt_embedding_to_save` runs the prefix MLP / p-tuning MLP or LSTM; with `inference_mode` the
  encoder-free embedding holds those same outputs). The encoder weights are never saved, so there is
  nothing to run here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters_store.base_info import BaseModelInfo
from adapters_store.errors import AdapterError
from adapters_store.safetensors_check import load_checked, refuse_pickles
from adapters_store.spec import AdapterSpec, LoraSpec, PrefixSpec, load_config, parse_config

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LORA_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)


@dataclass(frozen=True)
class LoraModuleWeights:
    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scaling: float


@dataclass
class LoadedAdapter:
    """A validated adapter, tensors on CPU in fp32. Only the fields of its `kind` are set."""

    spec: AdapterSpec
    kind: str  # "lora" | "prefix" | "prompt"
    lora: dict[tuple[int, str], LoraModuleWeights] = field(default_factory=dict)
    prefix_keys: torch.Tensor | None = None  # [num_layers, P, num_kv_heads, head_dim]
    prefix_values: torch.Tensor | None = None  # [num_layers, P, num_kv_heads, head_dim]
    prompt_embeds: torch.Tensor | None = None  # [P, hidden]

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.kind == "lora" else self.spec.num_virtual_tokens  # type: ignore[union-attr]


def load_adapter(path: str | Path, base: BaseModelInfo, *, max_rank: int) -> LoadedAdapter:
    """Validate the adapter directory at `path` against `base` and load its weights; AdapterError if refused."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory {str(path)!r} does not exist", field="path", status=404)
    refuse_pickles(p.name for p in path.iterdir())
    spec = parse_config(load_config(path / CONFIG_NAME), base, max_rank=max_rank)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterError(f"{WEIGHTS_NAME} is missing from the adapter", field=WEIGHTS_NAME)
    tensors = load_checked(weights, name=WEIGHTS_NAME)
    if isinstance(spec, LoraSpec):
        return LoadedAdapter(spec=spec, kind="lora", lora=lora_weights(spec, tensors, base))
    prompt = _prompt_tensor(tensors, spec)
    if isinstance(spec, PrefixSpec):
        keys, values = prefix_kv(spec, prompt)
        return LoadedAdapter(spec=spec, kind="prefix", prefix_keys=keys, prefix_values=values)
    return LoadedAdapter(spec=spec, kind="prompt", prompt_embeds=prompt.contiguous())


def lora_weights(
    spec: LoraSpec, tensors: dict[str, torch.Tensor], base: BaseModelInfo
) -> dict[tuple[int, str], LoraModuleWeights]:
    """Match PEFT's LoRA tensors to the spec's resolved modules, checking every shape."""
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise AdapterError(
                f"unexpected tensor {key!r}: a LoRA adapter may hold only "
                "base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>.weight",
                field=key, status=422,
            )
        layer, parent, short, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if (layer, short) not in spec.modules or base.module_parent(short) != parent:
            raise AdapterError(
                f"tensor {key!r} is for a module that target_modules/layers_to_transform do not select",
                field=key, status=422,
            )
        found.setdefault((layer, short), {})[ab] = t

    out: dict[tuple[int, str], LoraModuleWeights] = {}
    for (layer, short), mod in spec.modules.items():
        prefix = f"base_model.model.model.layers.{layer}.{base.module_parent(short)}.{short}"
        pair = found.get((layer, short), {})
        in_f, out_f = base.module_shape(short)
        expected = {"A": (mod.rank, in_f), "B": (out_f, mod.rank)}
        for ab in ("A", "B"):
            key = f"{prefix}.lora_{ab}.weight"
            if ab not in pair:
                raise AdapterError(f"tensor {key!r} is missing (the config targets this module)", field=key)
            if tuple(pair[ab].shape) != expected[ab]:
                raise AdapterError(
                    f"tensor {key!r} has shape {list(pair[ab].shape)}, expected {list(expected[ab])} "
                    f"(rank {mod.rank}, {short} is {in_f} -> {out_f})",
                    field=key, status=422,
                )
        out[(layer, short)] = LoraModuleWeights(
            a=pair["A"].contiguous(), b=pair["B"].contiguous(), scaling=mod.scaling
        )
    return out


def _prompt_tensor(tensors: dict[str, torch.Tensor], spec: AdapterSpec) -> torch.Tensor:
    extra = sorted(set(tensors) - {"prompt_embeddings"})
    if extra:
        raise AdapterError(
            f"unexpected tensor {extra[0]!r}: a {spec.peft_type} adapter holds only 'prompt_embeddings'",
            field=extra[0], status=422,
        )
    if "prompt_embeddings" not in tensors:
        raise AdapterError("tensor 'prompt_embeddings' is missing", field="prompt_embeddings")
    t = tensors["prompt_embeddings"]
    p = spec.num_virtual_tokens  # type: ignore[union-attr]
    width = spec.num_layers * 2 * spec.token_dim if isinstance(spec, PrefixSpec) else spec.token_dim
    if tuple(t.shape) != (p, width):
        raise AdapterError(
            f"tensor 'prompt_embeddings' has shape {list(t.shape)}, expected [{p}, {width}] "
            f"(num_virtual_tokens {p}, {spec.peft_type})",
            field="prompt_embeddings", status=422,
        )
    return t


def prefix_kv(spec: PrefixSpec, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `get_prompt` for batch 1, as per-layer keys and values.

    `prompt` [P, L*2*kv*hd] is viewed as [P, 2L, kv, hd]; PEFT permutes to [2L, B, kv, P, hd] and
    splits pairs along 2L, so layer i's key is row 2i and its value row 2i+1. We return the
    [L, P, kv, hd] layout (token-major, like a KV cache block).
    """
    p, layers, kv, hd = spec.num_virtual_tokens, spec.num_layers, spec.num_kv_heads, spec.head_dim
    x = prompt.reshape(p, layers, 2, kv, hd).permute(2, 1, 0, 3, 4)  # [2, L, P, kv, hd]
    return x[0].contiguous(), x[1].contiguous()
