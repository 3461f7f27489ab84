"""Llama-family decoder over a ragged batch and a paged KV cache: Llama 2/3, Mistral, Qwen2, Qwen3 (q/k
norms), Gemma 2/3 text (GeGLU, (1 + w) sandwich norms, scaled embeddings, sliding/global layers,
soft-capping) and Phi-3 (qkv / gate_up fused in the checkpoint). Each quirk is a ModelSpec field.

Plain tensors, no nn.Module: nothing here trains, and hooks/parameters only cost time per call.
q/k/v are fused into one matmul for the base weights (adapter hooks see each sub-module's column slice
of the fused output). Adapters act only through `server.model.hooks`: the decoder names no family.
gate/up are not fused: on the CPU MKL runs the two [inter, hidden]
matmuls faster than one [2 * inter, hidden] (measured 111 vs 125 ms for 2048 tokens at hidden 1024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.model.attention import paged_attention
from server.model.batch import StepBatch
from server.model.hooks import NO_HOOKS, ActiveHooks
from server.model.kv_cache import PagedKVCache
from server.model.rope import apply_rope, rope_cos_sin, rope_inv_freq
from server.model.spec import ModelSpec


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q + 2 * kv, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, q]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [hidden]
    gate: torch.Tensor  # [inter, hidden]
    gate_bias: torch.Tensor | None
    up: torch.Tensor  # [inter, hidden]
    up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, inter]
    down_bias: torch.Tensor | None
    q_norm: torch.Tensor | None = None  # [head_dim] (Qwen3, Gemma 3)
    k_norm: torch.Tensor | None = None
    pre_ff_norm: torch.Tensor | None = None  # [hidden] (Gemma: post_norm then norms the attention output)
    post_ff_norm: torch.Tensor | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as HF does, then scaled in the model dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm_plus_one(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: scaled by (1 + w) in fp32, then cast. `weight` is already 1 + w in fp32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight).to(x.dtype)


QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")
_ACT = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class Decoder:
    """Owns the base weights; `forward` runs one step of a StepBatch."""

    def __init__(self, spec: ModelSpec, state: dict[str, torch.Tensor], max_model_len: int) -> None:
        self.spec = spec
        self.scale = spec.attn_scale if spec.attn_scale is not None else spec.head_dim ** -0.5
        self.q_size = spec.num_heads * spec.head_dim
        self.kv_size = spec.num_kv_heads * spec.head_dim
        self._norm = rms_norm_plus_one if spec.norm_plus_one else rms_norm
        self._act = _ACT[spec.hidden_act]
        device = state["model.embed_tokens.weight"].device
        # one inverse-frequency table per distinct RoPE (Gemma 3: local for sliding layers, global for full)
        ropes = list(spec.layer_ropes) if spec.layer_ropes else [spec.rope] * spec.num_layers
        distinct: list[dict] = []
        for r in ropes:
            if r not in distinct:
                distinct.append(r)
        self.inv_freqs = [rope_inv_freq(spec, max_model_len, r).to(device) for r in distinct]
        self.layer_rope = [distinct.index(r) for r in ropes]
        self.embed = state.pop("model.embed_tokens.weight")
        self.norm = self._norm_weight(state.pop("model.norm.weight"))
        lm_head = state.pop("lm_head.weight", None)
        if lm_head is None:
            if not spec.tie_word_embeddings:
                raise ValueError("checkpoint has no lm_head.weight and tie_word_embeddings is false")
            lm_head = self.embed
        self.lm_head = lm_head
        self.layers = [self._take_layer(state, i) for i in range(spec.num_layers)]
        if state:
            raise ValueError(f"unexpected tensors in checkpoint: {sorted(state)[:5]}")

    def _norm_weight(self, w: torch.Tensor | None) -> torch.Tensor | None:
        """A norm's weight as the norm function takes it (Gemma: 1 + w, precomputed in fp32)."""
        return 1.0 + w.float() if w is not None and self.spec.norm_plus_one else w

    def _take_layer(self, state: dict[str, torch.Tensor], i: int) -> LayerWeights:
        pre = f"model.layers.{i}."
        s = self.spec
        if s.fused_checkpoint:  # Phi-3: split the fused tensors into the names used below
            qkv = state.pop(pre + "self_attn.qkv_proj.weight", None)
            gate_up = state.pop(pre + "mlp.gate_up_proj.weight", None)
            if qkv is None or gate_up is None:
                raise ValueError(f"checkpoint is missing {pre}self_attn.qkv_proj / mlp.gate_up_proj")
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size])
            state[pre + "self_attn.q_proj.weight"], state[pre + "self_attn.k_proj.weight"] = q, k
            state[pre + "self_attn.v_proj.weight"] = v
            gate, up = gate_up.chunk(2)
            state[pre + "mlp.gate_proj.weight"], state[pre + "mlp.up_proj.weight"] = gate, up

        def take(name: str, required: bool = True) -> torch.Tensor | None:
            t = state.pop(pre + name, None)
            if t is None and required:
                raise ValueError(f"checkpoint is missing {pre + name}")
            return t

        def fuse(names: list[str], bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            w = torch.cat([take(n + ".weight") for n in names])
            b = torch.cat([take(n + ".bias") for n in names]) if bias else None
            return w, b

        qkv, qkv_b = fuse(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], s.qkv_bias)
        nw = self._norm_weight
        return LayerWeights(
            input_norm=nw(take("input_layernorm.weight")),
            qkv=qkv,
            qkv_bias=qkv_b,
            o=take("self_attn.o_proj.weight"),
            o_bias=take("self_attn.o_proj.bias", s.o_bias),
            post_norm=nw(take("post_attention_layernorm.weight")),
            gate=take("mlp.gate_proj.weight"),
            gate_bias=take("mlp.gate_proj.bias", s.mlp_bias),
            up=take("mlp.up_proj.weight"),
            up_bias=take("mlp.up_proj.bias", s.mlp_bias),
            down=take("mlp.down_proj.weight"),
            down_bias=take("mlp.down_proj.bias", s.mlp_bias),
            q_norm=nw(take("self_attn.q_norm.weight", s.qk_norm)),
            k_norm=nw(take("self_attn.k_norm.weight", s.qk_norm)),
            pre_ff_norm=nw(take("pre_feedforward_layernorm.weight", s.sandwich_norm)),
            post_ff_norm=nw(take("post_feedforward_layernorm.weight", s.sandwich_norm)),
        )

    def base_weight(self, layer: int, name: str) -> torch.Tensor:
        """The frozen weight [out, in] of one projection (q/k/v: a row slice of the fused qkv)."""
        w = self.layers[layer]
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        fused = {"q_proj": w.qkv[:q_end], "k_proj": w.qkv[q_end:k_end], "v_proj": w.qkv[k_end:]}
        if name in fused:
            return fused[name]
        return {"o_proj": w.o, "gate_proj": w.gate, "up_proj": w.up, "down_proj": w.down}[name]

    def base_bias(self, layer: int, name: str) -> torch.Tensor | None:
        """The frozen bias [out] of one projection, or None (q/k/v: a slice of the fused qkv bias)."""
        w = self.layers[layer]
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        if name in ("q_proj", "k_proj", "v_proj"):
            if w.qkv_bias is None:
                return None
            return {"q_proj": w.qkv_bias[:q_end], "k_proj": w.qkv_bias[q_end:k_end], "v_proj": w.qkv_bias[k_end:]}[name]
        return {"o_proj": w.o_bias, "gate_proj": w.gate_bias, "up_proj": w.up_bias, "down_proj": w.down_bias}[name]

    @staticmethod
    def _proj(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, layer: int, name: str,
              batch: StepBatch, hooks: ActiveHooks) -> torch.Tensor:
        """One unfused projection with its adapter hooks: input hooks, the base matmul, output hooks."""
        for f in hooks.project_input:
            x = f(layer, name, x, batch)
        y = F.linear(x, w, bias)
        for f in hooks.project_output:
            f(layer, name, x, y, batch)
        return y

    def forward(self, batch: StepBatch, cache: PagedKVCache, hooks: ActiveHooks = NO_HOOKS) -> torch.Tensor:
        """Run all layers over the flat batch; returns fp32 logits [N, vocab] of batch.logits_rows.

        `hooks`: the adapter families' contributions for this step (the runner's choice).
        """
        s = self.spec
        norm, eps = self._norm, s.rms_norm_eps
        if batch.segments is None:
            hooks = NO_HOOKS
        group_hooks, block_hooks = hooks.project_outputs, hooks.block_output
        h = F.embedding(batch.token_ids, self.embed)
        if s.embed_scale is not None:  # as HF's scaled embedding module: given inputs_embeds are not scaled
            h = h * torch.tensor(s.embed_scale, dtype=h.dtype)
        for row, e in batch.embeds:
            h[row:row + e.shape[0]] = e.to(device=h.device, dtype=h.dtype)
        rope = [rope_cos_sin(inv, batch.positions, h.dtype) for inv in self.inv_freqs]
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        for i, w in enumerate(self.layers):
            cos, sin = rope[self.layer_rope[i]]
            x = norm(h, w.input_norm, eps)
            qkv = F.linear(x, w.qkv, w.qkv_bias)
            for f in group_hooks:  # q/k/v share x: a family may run them together into the fused output's slices
                f(i, QKV, x, (qkv[:, :q_end], qkv[:, q_end:k_end], qkv[:, k_end:]), batch)
            q = qkv[:, :q_end].view(-1, s.num_heads, s.head_dim)
            k = qkv[:, q_end:k_end].view(-1, s.num_kv_heads, s.head_dim)
            if s.qk_norm:
                q, k = norm(q, w.q_norm, eps), norm(k, w.k_norm, eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            v = qkv[:, k_end:].reshape(-1, s.num_kv_heads, s.head_dim)
            cache.write(i, batch.write_slots, k, v)
            attn = paged_attention(q, k, v, cache.k_flat[i], cache.v_flat[i], batch, s.layer_windows[i],
                                   self.scale, s.attn_softcap)
            o = self._proj(attn, w.o, w.o_bias, i, "o_proj", batch, hooks)
            if s.sandwich_norm:
                o = norm(o, w.post_norm, eps)
            # hooks see the residual entering the block and its output as added to it (after Gemma's norm)
            for f in block_hooks:
                o = f(i, "attn", h, o, batch)
            h = h + o
            x = norm(h, w.pre_ff_norm if s.sandwich_norm else w.post_norm, eps)
            if hooks.project_input:  # an input hook may give gate and up different inputs
                gate = self._proj(x, w.gate, w.gate_bias, i, "gate_proj", batch, hooks)
                up = self._proj(x, w.up, w.up_bias, i, "up_proj", batch, hooks)
            else:  # gate/up share x: their output hooks run together (LoRA: one fused launch)
                gate, up = F.linear(x, w.gate, w.gate_bias), F.linear(x, w.up, w.up_bias)
                for f in group_hooks:
                    f(i, GATE_UP, x, (gate, up), batch)
            act = self._act(gate).mul_(up)
            d = self._proj(act, w.down, w.down_bias, i, "down_proj", batch, hooks)
            if s.sandwich_norm:
                d = norm(d, w.post_ff_norm, eps)
            for f in block_hooks:
                d = f(i, "mlp", h, d, batch)
            h = h + d
        last = norm(h.index_select(0, batch.logits_rows), self.norm, eps)
        logits = F.linear(last, self.lm_head)
        if s.final_softcap is not None:
            logits = torch.tanh(logits / s.final_softcap) * s.final_softcap
        return logits.float()
