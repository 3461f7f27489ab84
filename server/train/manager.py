"""Fine-tuning jobs: validation, the one-at-a-time queue, training on the resident base, landing the adapter.

States: validating_files → queued → running → succeeded | failed | cancelled. One worker thread runs the
queue; a job's micro-steps (at most `--train-max-step-tokens` tokens each, validation included) run on the
engine thread (`server.train.trainer`). The adapter is LoRA/DoRA, or PEFT's prompt or prefix tuning.
The result, and a checkpoint at the end of every epoch but the last, go through `AdapterStore.add` (the same
validation as an upload) and are served at once as `ft:<base>:<suffix>:<job>` (checkpoints: `...:ckpt-step-N`).

Shutdown and crashes: a job running when the server stops is marked failed (code `server_shutdown`); one found
`running` at start-up (the process was killed) is marked failed (code `server_restarted`). Its checkpoints stay
servable. Queued jobs survive a restart and run.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from adapters_store import AdapterError
from adapters_store.files import FileStore
from server.train.dataset import DatasetError, Example, encode_file, parse_jsonl
from server.train.jobs_db import FINAL, JobStore
from server.train.trainer import (
    BASE_LEARNING_RATES,
    DEFAULT_MAX_STEP_TOKENS,
    EngineStopped,
    Hyper,
    ShareGovernor,
    Trainer,
    run_on_engine,
)

log = logging.getLogger("peftserve.train")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_SUFFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,17}$")


class JobError(ValueError):
    """A request about jobs was refused: HTTP `status`, the offending `param`."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


class _Stop(Exception):
    def __init__(self, status: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


PROMPT_TYPES = ("PROMPT_TUNING", "PREFIX_TUNING")


@dataclass(frozen=True)
class PeftParams:
    """The `peft` extension object, resolved."""

    type: str = "LORA"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(LORA_TARGETS)
    use_dora: bool = False
    num_virtual_tokens: int = 0  # PROMPT_TUNING / PREFIX_TUNING

    def to_dict(self) -> dict[str, Any]:
        if self.type in PROMPT_TYPES:
            return {"type": self.type, "num_virtual_tokens": self.num_virtual_tokens}
        return {"type": self.type, "r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "targets": list(self.targets), "use_dora": self.use_dora}


def parse_peft(obj: Any, max_rank: int, max_virtual_tokens: int = 64) -> PeftParams:
    if obj is None:
        return PeftParams()
    if not isinstance(obj, dict):
        raise JobError("'peft' must be an object", param="peft")
    kind = str(obj.get("type", "LORA")).upper()
    if kind in PROMPT_TYPES:
        unknown = set(obj) - {"type", "num_virtual_tokens"}
        if unknown:
            raise JobError(f"peft: field {sorted(unknown)[0]!r} does not apply to type {kind}; it takes "
                           "num_virtual_tokens", param="peft")
        n = obj.get("num_virtual_tokens", 8)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_virtual_tokens:
            raise JobError(f"peft.num_virtual_tokens {n!r} must be an integer in [1, {max_virtual_tokens}]",
                           param="peft.num_virtual_tokens")
        return PeftParams(kind, num_virtual_tokens=n)
    if kind not in ("LORA", "DORA"):
        raise JobError(f"peft.type {obj.get('type')!r} is not supported for training; supported: LORA "
                       "(with use_dora for DoRA), PROMPT_TUNING, PREFIX_TUNING", param="peft.type")
    unknown = set(obj) - {"type", "r", "alpha", "lora_alpha", "dropout", "targets", "target_modules", "use_dora"}
    if unknown:
        raise JobError(f"peft: unknown field {sorted(unknown)[0]!r}", param="peft")
    r = obj.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= max_rank:
        raise JobError(f"peft.r {r!r} must be an integer in [1, {max_rank}] (--max-rank)", param="peft.r")
    alpha = obj.get("alpha", obj.get("lora_alpha", 2 * r))
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise JobError(f"peft.alpha {alpha!r} must be a number > 0", param="peft.alpha")
    dropout = obj.get("dropout", 0.0)
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise JobError(f"peft.dropout {dropout!r} must be in [0, 1)", param="peft.dropout")
    targets = obj.get("targets", obj.get("target_modules", LORA_TARGETS))
    if not isinstance(targets, list) or not targets or any(t not in LORA_TARGETS for t in targets):
        raise JobError(f"peft.targets {targets!r} must be a non-empty list of {', '.join(LORA_TARGETS)}",
                       param="peft.targets")
    dora = bool(obj.get("use_dora", kind == "DORA"))
    return PeftParams("LORA", r, float(alpha), float(dropout), tuple(targets), dora)


def _auto(hp: dict[str, Any], key: str, check: Any, what: str) -> Any:
    v = hp.get(key, "auto")
    if v == "auto":
        return "auto"
    if not check(v):
        raise JobError(f"hyperparameters.{key} {v!r} must be {what} or \"auto\"", param=f"hyperparameters.{key}")
    return v


def parse_hyperparameters(body: dict[str, Any]) -> dict[str, Any]:
    """`method.supervised.hyperparameters` (or the legacy top-level `hyperparameters`), "auto" kept."""
    method = body.get("method")
    hp: Any = body.get("hyperparameters") or {}
    if method is not None:
        if not isinstance(method, dict) or method.get("type", "supervised") != "supervised":
            kind = method.get("type") if isinstance(method, dict) else method
            raise JobError(f"method.type {kind!r} is not supported; only \"supervised\"", param="method.type")
        hp = (method.get("supervised") or {}).get("hyperparameters") or hp
    if not isinstance(hp, dict):
        raise JobError("hyperparameters must be an object", param="hyperparameters")
    unknown = set(hp) - {"n_epochs", "batch_size", "learning_rate_multiplier"}
    if unknown:
        raise JobError(f"unknown hyperparameter {sorted(unknown)[0]!r}", param="hyperparameters")
    is_int = lambda lo, hi: lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi  # noqa: E731
    return {
        "n_epochs": _auto(hp, "n_epochs", is_int(1, 50), "an integer in [1, 50]"),
        "batch_size": _auto(hp, "batch_size", is_int(1, 256), "an integer in [1, 256]"),
        "learning_rate_multiplier": _auto(hp, "learning_rate_multiplier",
                                          lambda v: isinstance(v, int | float) and not isinstance(v, bool)
                                          and 0 < v <= 100, "a number in (0, 100]"),
    }


def resolve_auto(hp: dict[str, Any], num_samples: int) -> dict[str, Any]:
    """The values "auto" stands for, from the dataset's size (reported back on the job)."""
    out = dict(hp)
    if out["n_epochs"] == "auto":
        out["n_epochs"] = max(1, min(10, math.ceil(100 / num_samples)))
    if out["batch_size"] == "auto":
        out["batch_size"] = max(1, min(8, num_samples // 16))
    if out["learning_rate_multiplier"] == "auto":
        out["learning_rate_multiplier"] = 1.0
    return out


def adapter_name(base: str, suffix: str | None, job_suffix: str, step: int | None = None) -> str:
    """`ft:<base>:<suffix>:<job>` (`:ckpt-step-N` for a checkpoint), within the store's 64 characters."""
    tail = (f":{suffix}" if suffix else "") + f":{job_suffix}" + (f":ckpt-step-{step}" if step is not None else "")
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", base).strip("-.") or "base"
    return "ft:" + safe[:max(1, 64 - 3 - len(tail))] + tail


def public(job: dict[str, Any]) -> dict[str, Any]:
    """The job as the API shows it (private keys dropped)."""
    return {k: v for k, v in job.items() if not k.startswith("_")}


class FineTuning:
    """Files, jobs and the training worker of one server."""

    def __init__(self, *, store: Any, registry: Any, engine: Any, base_name: str, train_share: float,
                 max_file_lines: int, max_model_len: int, max_rank: int,
                 max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS) -> None:
        self.store = store
        self.registry = registry
        self.engine = engine
        self.base_name = base_name
        self.train_share = train_share
        self.max_file_lines = max_file_lines
        self.max_model_len = max_model_len
        self.max_rank = max_rank
        self.max_step_tokens = max_step_tokens
        self.files = FileStore(store.root)
        self.jobs = JobStore(store.root)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cancel: set[str] = set()
        self._prepared: dict[str, tuple[list[Example], list[Example]]] = {}
        self._validating: set[str] = set()
        self._validating_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._shutdown_reason = "the server shut down while the job was running"
        self.running: str | None = None
        self.trainer: Trainer | None = None  # the running job's (benchmarks read its progress)
        self._recover()

    # ---- lifecycle ------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Whatever a killed process left `running` is failed; its files and checkpoints stay consistent."""
        dropped = self.jobs.drop_checkpoints_without(lambda name: name in self.registry)
        if dropped:
            log.warning("dropped %d checkpoint rows whose adapter is gone", dropped)
        for job in self.jobs.with_status("running"):
            target = job.get("_target")
            if target and target in self.registry:  # killed between storing the adapter and recording it
                self._finish(job["id"], "succeeded", fine_tuned_model=target)
                continue
            msg = ("the server stopped while the job was running (killed or crashed); its checkpoints, if any, "
                   "are servable; create a new job to train again")
            self._finish(job["id"], "failed", error={"code": "server_restarted", "param": None, "message": msg})
            self.jobs.event(job["id"], msg, level="error")

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._worker, name="peftserve-finetune", daemon=True)
            self._thread.start()
            self._wake.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop between micro-steps; the running job is marked failed (server_shutdown)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.files.close()
        self.jobs.close()

    # ---- requests -------------------------------------------------------------------------------
    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Check a job request (4xx JobError naming the field), record it as validating_files."""
        model = body.get("model")
        if model != self.base_name:
            raise JobError(f"model {model!r} is not this server's base model; fine-tuning trains on "
                           f"{self.base_name!r}", param="model", status=404 if isinstance(model, str) else 400,
                           code="model_not_found")
        from server.train.resident import check_trainable

        try:
            check_trainable(self.engine.runner.decoder)
        except ValueError as e:
            raise JobError(str(e), param="model", code="model_not_trainable") from None
        files = {}
        for key in ("training_file", "validation_file"):
            fid = body.get(key)
            if fid is None and key == "validation_file":
                continue
            if not isinstance(fid, str):
                raise JobError(f"'{key}' must be a file id from POST /v1/files", param=key)
            try:
                rec = self.files.get(fid)
            except AdapterError:
                raise JobError(f"{key} {fid!r} does not exist; upload it with POST /v1/files", param=key,
                               status=404, code="file_not_found") from None
            if rec.purpose != "fine-tune":
                raise JobError(f"{key} {fid!r} has purpose {rec.purpose!r}; a training file needs purpose "
                               "'fine-tune'", param=key, code="invalid_purpose")
            files[key] = fid
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX_RE.match(suffix)):
            raise JobError(f"suffix {suffix!r} must be 1-18 characters from A-Z a-z 0-9 . _ -, starting with a "
                           "letter or digit", param="suffix")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
            raise JobError(f"seed {seed!r} must be an integer in [0, 2147483647]", param="seed")
        hp = parse_hyperparameters(body)
        peft = parse_peft(body.get("peft"), self.max_rank, max_virtual_tokens=min(64, self.max_model_len // 2))
        jid = "ftjob-" + uuid.uuid4().hex[:24]
        seed = seed if seed is not None else int(uuid.uuid4().int % 2**31)
        job = {
            "object": "fine_tuning.job", "id": jid, "created_at": int(time.time()), "finished_at": None,
            "model": self.base_name, "fine_tuned_model": None, "organization_id": "peftserve",
            "status": "validating_files", "training_file": files["training_file"],
            "validation_file": files.get("validation_file"), "hyperparameters": hp,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            "result_files": [], "trained_tokens": None, "error": None, "seed": seed, "suffix": suffix,
            "user_provided_suffix": suffix, "estimated_finish": None, "integrations": [],
            "metadata": body.get("metadata"), "peft": peft.to_dict(),
            "_target": adapter_name(self.base_name, suffix, jid[-8:]),
        }
        self.jobs.insert(job)
        self.jobs.event(jid, f"Validating training file: {files['training_file']}")
        # validation runs beside the worker: a job waits queued (not validating) while another one trains
        threading.Thread(target=self._validate_once, args=(jid,), name="peftserve-ft-validate", daemon=True).start()
        return public(job)

    def get(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobError(f"fine-tuning job {job_id!r} does not exist", param="fine_tuning_job_id", status=404,
                           code="job_not_found")
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if job["status"] in FINAL:
            raise JobError(f"job {job_id} has already {job['status']}; only a job that is validating_files, queued "
                           "or running can be cancelled", param="fine_tuning_job_id", status=409,
                           code="job_finished")
        self._cancel.add(job_id)
        done = self.jobs.update(job_id, expect=("validating_files", "queued"), status="cancelled",
                                finished_at=int(time.time()))
        if done is not None:
            job = done
            self.jobs.event(job_id, "Fine-tuning job cancelled")
        self._wake.set()
        return public(self.jobs.get(job_id) or job)

    # ---- the worker -----------------------------------------------------------------------------
    def _worker(self) -> None:
        from server.threads import single_threaded

        single_threaded()
        while not self._stop.is_set():
            for job in self.jobs.with_status("validating_files"):  # left by a restart
                self._validate_once(job["id"])
            queued = self.jobs.with_status("queued")
            if not queued:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._run(queued[0])

    def _validate_once(self, jid: str) -> None:
        with self._validating_lock:
            if jid in self._validating:
                return
            self._validating.add(jid)
        try:
            job = self.jobs.get(jid)
            if job is not None and job["status"] == "validating_files":
                self._validate(job)
        finally:
            with self._validating_lock:
                self._validating.discard(jid)
            self._wake.set()

    def _validate(self, job: dict[str, Any]) -> None:
        """Parse and tokenize the files (they were checked at upload; the tokenizer or limits may differ)."""
        jid = job["id"]
        try:
            sets = []
            for key in ("training_file", "validation_file"):
                if job.get(key) is None:
                    sets.append([])
                    continue
                parsed = parse_jsonl(self.files.content(job[key]), max_lines=self.max_file_lines)
                # the virtual tokens of prompt/prefix tuning take positions of the model's length
                room = self.max_model_len - job["peft"].get("num_virtual_tokens", 0)
                sets.append(encode_file(self.engine.tokenizer, parsed, room))
        except (DatasetError, AdapterError, OSError) as e:
            if self.jobs.update(jid, expect=("validating_files",), status="failed", finished_at=int(time.time()),
                                error={"code": "invalid_training_file", "param": "training_file",
                                       "message": f"{job['training_file']}: {e}"}) is not None:
                self.jobs.event(jid, f"Validation failed: {e}", level="error")
            return
        train, val = sets
        self._prepared[jid] = (train, val)
        hp = resolve_auto(job["hyperparameters"], len(train))
        if self.jobs.update(jid, expect=("validating_files",), status="queued", hyperparameters=hp,
                            method={"type": "supervised", "supervised": {"hyperparameters": hp}}) is None:
            self._prepared.pop(jid, None)  # cancelled meanwhile
            return
        self.jobs.event(jid, "Files validated, moving job to queued state")

    def _run(self, job: dict[str, Any]) -> None:
        jid = job["id"]
        if jid not in self._prepared:  # queued before a restart: tokenize again
            self.jobs.update(jid, expect=("queued",), status="validating_files")
            self._validate_once(jid)
            return
        train, val = self._prepared.pop(jid)
        if self.jobs.update(jid, expect=("queued",), status="running") is None:  # cancelled meanwhile
            return
        self.running = jid
        work = tempfile.mkdtemp(prefix="peftserve-ft-")
        try:
            self.jobs.event(jid, "Fine-tuning job started", data={"max_step_tokens": self.max_step_tokens})
            self._train(job, train, val, work)
        except _Stop as s:
            self._finish(jid, s.status, error=None if s.status == "cancelled" else
                         {"code": s.code, "message": s.message, "param": None})
            self.jobs.event(jid, s.message, level="info" if s.status == "cancelled" else "error")
        except (AdapterError, ValueError, RuntimeError, OSError) as e:
            log.exception("fine-tuning job %s failed", jid)
            self._finish(jid, "failed", error={"code": "training_error", "param": None,
                                               "message": f"{type(e).__name__}: {e}"})
            self.jobs.event(jid, f"Training failed: {e}", level="error")
        finally:
            self.running = None
            self.trainer = None
            self._cancel.discard(jid)
            shutil.rmtree(work, ignore_errors=True)

    def _check(self, jid: str) -> None:
        if jid in self._cancel:
            raise _Stop("cancelled", "cancelled", "Fine-tuning job cancelled")
        if self._stop.is_set():
            raise _Stop("failed", "server_shutdown", self._shutdown_reason)

    def _train(self, job: dict[str, Any], train: list[Example], val: list[Example], work: str) -> None:
        jid, hp, kind = job["id"], job["hyperparameters"], job["peft"]["type"]
        model = self._peft_model(job)
        hyper = Hyper(hp["n_epochs"], hp["batch_size"], hp["learning_rate_multiplier"], job["seed"],
                      BASE_LEARNING_RATES.get(kind, BASE_LEARNING_RATES["LORA"]))
        trainer = self.trainer = Trainer(
            model, train, hyper, max_step_tokens=self.max_step_tokens,
            virtual_tokens=job["peft"]["num_virtual_tokens"] if kind == "PROMPT_TUNING" else 0,
            can_split=kind not in PROMPT_TYPES)
        p = trainer.progress
        every = max(1, p.total_steps // 20)
        governor = ShareGovernor(self.engine, self.train_share, self._stop)

        def on_engine(fn: Any) -> Any:
            """fn as one micro-step on the engine thread, then the engine's share of time while it is busy."""
            box: dict[str, float] = {}

            def run() -> Any:
                t0 = time.monotonic()
                try:
                    return fn()
                finally:
                    box["seconds"] = time.monotonic() - t0  # its own time, not its wait for the engine

            try:
                out = run_on_engine(self.engine, run)
            except EngineStopped:
                raise _Stop("failed", "server_shutdown", self._shutdown_reason) from None
            governor.after(box.get("seconds", 0.0))
            return out

        def validate() -> float:
            ev = trainer.evaluation(val)
            while not ev.done:
                self._check(jid)
                on_engine(ev.step)
            return ev.mean

        while not trainer.done:
            self._check(jid)
            loss = on_engine(trainer.micro_step)
            if loss is None:
                continue
            if p.step == 1 or p.step % every == 0 or trainer.done:
                self.jobs.event(jid, f"Step {p.step}/{p.total_steps}: training loss={loss:.4f}", kind="metrics",
                                data={"step": p.step, "train_loss": loss, "total_steps": p.total_steps,
                                      "trained_tokens": p.trained_tokens, "micro_steps": p.micro,
                                      "largest_micro_step_tokens": p.largest_micro_tokens})
            if p.step % trainer.steps_per_epoch == 0 and not trainer.done:
                metrics = {"step": p.step, "train_loss": loss}
                if val:
                    metrics["valid_loss"] = validate()
                self._checkpoint(job, model, work, p.step, metrics)
        self._check(jid)
        final = {"step": p.step, "train_loss": p.losses[-1]}
        if val:
            final["valid_loss"] = vl = validate()
            self.jobs.event(jid, f"Step {p.step}/{p.total_steps}: validation loss={vl:.4f}", kind="metrics",
                            data={"step": p.step, "valid_loss": vl})
        name = self._save(model, work, job["_target"])
        self.jobs.add_checkpoint(jid, p.step, name, final)
        self._finish(jid, "succeeded", fine_tuned_model=name, trained_tokens=p.trained_tokens)
        self.jobs.event(jid, f"New fine-tuned model created: {name}", data={"fine_tuned_model": name})
        self.jobs.event(jid, "The job has successfully completed")

    def _peft_model(self, job: dict[str, Any]) -> Any:
        import torch
        from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

        from server.train.resident import build_resident_model

        runner = self.engine.runner
        base = build_resident_model(runner.decoder, runner.hf_config)
        pp = job["peft"]
        if pp["type"] == "PROMPT_TUNING":  # virtual tokens start as embeddings of random vocabulary tokens
            cfg: Any = PromptTuningConfig(num_virtual_tokens=pp["num_virtual_tokens"], task_type="CAUSAL_LM",
                                          prompt_tuning_init="SAMPLE_VOCAB")
        elif pp["type"] == "PREFIX_TUNING":
            cfg = PrefixTuningConfig(num_virtual_tokens=pp["num_virtual_tokens"], task_type="CAUSAL_LM")
        else:
            cfg = LoraConfig(r=pp["r"], lora_alpha=pp["alpha"], lora_dropout=pp["dropout"],
                             target_modules=list(pp["targets"]), use_dora=pp["use_dora"], task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job["seed"])
            return get_peft_model(base, cfg)

    def _save(self, model: Any, work: str, name: str) -> str:
        """Write the standard PEFT dir, store it (validated like an upload) and serve it."""
        out = f"{work}/{name.replace(':', '_')}"
        model.save_pretrained(out)
        rec = self.store.add(name, out, self.engine.info.shapes, self.max_rank)
        self.registry.register(rec.name, rec.version, rec.path, rec.to_dict())
        log.info("fine-tuned adapter %s v%d stored", rec.name, rec.version)
        return rec.name

    def _checkpoint(self, job: dict[str, Any], model: Any, work: str, step: int, metrics: dict[str, Any]) -> None:
        name = adapter_name(self.base_name, job.get("suffix"), job["id"][-8:], step)
        self._save(model, work, name)
        self.jobs.add_checkpoint(job["id"], step, name, metrics)
        self.jobs.event(job["id"], f"Checkpoint created at step {step}: {name}", data={"checkpoint": name, **metrics})

    def _finish(self, jid: str, status: str, **fields: Any) -> dict[str, Any]:
        job = self.jobs.update(jid, status=status, finished_at=int(time.time()), **fields)
        assert job is not None
        return job
