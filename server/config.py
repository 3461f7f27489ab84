"""Server settings: one validated object, from CLI flags or PEFTSERVE_* environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class Settings:
    model: str | None = None  # local HF checkpoint dir; None = the embedded demo model
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_batch_tokens: int = 2048
    kv_cache_blocks: int | None = None
    kv_cache_fraction: float = 0.5
    block_size: int = 16
    max_adapters: int = 8
    max_rank: int = 64
    adapter: list[str] = field(default_factory=list)  # NAME=PATH, repeatable
    adapters_dir: str | None = None  # None: $PEFTSERVE_CACHE_DIR/adapters, else ~/.cache/peftserve/adapters
    max_cpu_adapters: int = 64
    allowed_adapter_dir: list[str] = field(default_factory=list)
    max_upload_mb: int = 200
    api_key: str | None = None
    admin_key: str | None = None
    max_queue: int = 256
    max_tokens_limit: int = 4096
    max_n: int = 8
    max_stop: int = 8
    max_body_mb: int = 4
    metrics_max_adapters: int = 20
    metrics_require_key: bool = False
    shutdown_timeout: float = 30.0
    ready_step_timeout: float = 60.0
    log_level: str = "info"

    def validate(self) -> Settings:
        """Refuse values that cannot work, naming the flag."""
        def bad(flag: str, value: Any, allowed: str) -> None:
            raise SettingsError(f"--{flag}: invalid value {value!r} ({allowed})")

        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", self.device, "choose auto, cpu or cuda")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            bad("dtype", self.dtype, "choose auto, float32, float16 or bfloat16")
        if not 0 < self.port < 65536:
            bad("port", self.port, "must be 1-65535")
        for name in ("max_num_seqs", "max_batch_tokens", "block_size", "max_adapters", "max_rank",
                     "max_cpu_adapters", "max_upload_mb", "max_queue", "max_tokens_limit", "max_n",
                     "max_stop", "max_body_mb", "metrics_max_adapters"):
            if getattr(self, name) < 1:
                bad(name.replace("_", "-"), getattr(self, name), "must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            bad("max-model-len", self.max_model_len, "must be >= 2")
        if self.kv_cache_blocks is not None and self.kv_cache_blocks < 1:
            bad("kv-cache-blocks", self.kv_cache_blocks, "must be >= 1")
        if not 0 < self.kv_cache_fraction <= 0.95:
            bad("kv-cache-fraction", self.kv_cache_fraction, "must be in (0, 0.95]")
        if self.max_batch_tokens < self.max_num_seqs:
            bad("max-batch-tokens", self.max_batch_tokens, f"must be >= --max-num-seqs {self.max_num_seqs}")
        if self.shutdown_timeout < 0:
            bad("shutdown-timeout", self.shutdown_timeout, "must be >= 0")
        if not self.ready_step_timeout > 0:
            bad("ready-step-timeout", self.ready_step_timeout, "must be > 0")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            bad("log-level", self.log_level, "choose debug, info, warning or error")
        for item in self.adapter:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                bad("adapter", item, "expected NAME=PATH")
        return self

    def adapter_pairs(self) -> list[tuple[str, str]]:
        return [tuple(a.split("=", 1)) for a in self.adapter]  # type: ignore[misc]


class SettingsError(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"peftserve: error: {message}\n")


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(v)


HELP = {
    "model": "local HF checkpoint dir (Llama, Mistral or Qwen2); default: the embedded demo model",
    "served_model_name": "model id clients use for the base model (default: the checkpoint dir's name)",
    "host": "address to listen on",
    "port": "port to listen on",
    "device": "auto | cpu | cuda",
    "dtype": "auto | float32 | float16 | bfloat16 (auto: the checkpoint's dtype on CUDA, float32 on CPU)",
    "max_model_len": "longest prompt + output in tokens, virtual tokens included (default: the model's limit)",
    "max_num_seqs": "sequences decoded together in one step",
    "max_batch_tokens": "token budget of one engine step (prefill chunks + decodes)",
    "kv_cache_blocks": "KV cache size in blocks (default: --kv-cache-fraction of free memory)",
    "kv_cache_fraction": "share of free device memory for the KV cache when --kv-cache-blocks is not set",
    "block_size": "tokens per KV block",
    "max_adapters": "adapters resident on the device at once (slots)",
    "max_rank": "largest LoRA rank accepted",
    "adapter": "NAME=PATH of a local PEFT adapter dir to serve; repeatable",
    "adapters_dir": "where uploaded adapters are stored (default $PEFTSERVE_CACHE_DIR/adapters or "
                    "~/.cache/peftserve/adapters)",
    "max_cpu_adapters": "adapters kept loaded in CPU memory (LRU)",
    "allowed_adapter_dir": "directories /v1/load_lora_adapter may read from; repeatable",
    "max_upload_mb": "largest adapter upload (413 beyond)",
    "api_key": "Bearer key required on every /v1 route",
    "admin_key": "Bearer key required for adapter writes (also accepted where --api-key is)",
    "max_queue": "waiting requests beyond which new ones get 429",
    "max_tokens_limit": "largest max_tokens a request may ask for",
    "max_n": "largest n (choices per request)",
    "max_stop": "most stop strings per request",
    "max_body_mb": "largest request body of non-upload routes (413 beyond)",
    "metrics_max_adapters": "adapters with their own metrics label; the rest are folded into 'other'",
    "metrics_require_key": "require --api-key on /metrics (true/false)",
    "shutdown_timeout": "seconds in-flight requests may take to finish on SIGTERM",
    "ready_step_timeout": "/ready answers 503 while one engine step has run longer than this many seconds "
                          "with requests waiting (a hung device)",
    "log_level": "debug | info | warning | error",
}


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field; the default of each comes from PEFTSERVE_<FIELD> when set."""
    defaults = Settings()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = "PEFTSERVE_" + f.name.upper()
        default = getattr(defaults, f.name)
        typ: Any = type(default) if default is not None else str
        if f.name in ("max_model_len", "kv_cache_blocks"):
            typ = int
        help_ = HELP[f.name] + (f" (default {default})" if default not in (None, []) else "") + f" [env {env}]"
        if isinstance(default, list):
            env_val = os.environ.get(env)
            p.add_argument(flag, action="append", default=env_val.split(",") if env_val else [], help=help_)
            continue
        if typ is bool:
            typ = _bool
        env_val = os.environ.get(env)
        if env_val is not None:
            try:
                default = typ(env_val)
            except ValueError:
                p.error(f"{env}: invalid value {env_val!r} for {flag}")
        p.add_argument(flag, type=typ, default=default, help=help_)


def settings_from_args(ns: argparse.Namespace) -> Settings:
    s = Settings(**{f.name: getattr(ns, f.name) for f in fields(Settings)})
    return s.validate()
