"""`peftserve finetune create|ls|show|events|cancel`: fine-tuning jobs on a running server, over its REST API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from server.client import _client, _fail, add_connection_args, call, list_or_json

FINAL = ("succeeded", "failed", "cancelled")


def _create(ns: argparse.Namespace) -> int:
    if not os.path.isfile(ns.file):
        print(f"peftserve: error: --file {ns.file}: no such file", file=sys.stderr)
        return 2
    hp = {k: v for k, v in (("n_epochs", ns.epochs), ("batch_size", ns.batch_size),
                            ("learning_rate_multiplier", ns.lr_multiplier)) if v is not None}
    peft: dict[str, Any] = {}
    if ns.rank is not None:
        peft["r"] = ns.rank
    if ns.alpha is not None:
        peft["alpha"] = ns.alpha
    if ns.targets:
        peft["targets"] = ns.targets.split(",")
    if ns.dora:
        peft["use_dora"] = True
    if ns.type is not None:
        peft["type"] = ns.type
    if ns.virtual_tokens is not None:
        peft["num_virtual_tokens"] = ns.virtual_tokens
    with _client(ns) as c:
        with open(ns.file, "rb") as f:
            r = c.post("/v1/files", files={"file": (os.path.basename(ns.file), f.read())},
                       data={"purpose": "fine-tune"})
        if r.status_code != 200:
            return _fail(r)
        fid = r.json()["id"]
        model = ns.model or c.get("/v1/models").json()["data"][0]["id"]
        body: dict[str, Any] = {"model": model, "training_file": fid, "suffix": ns.suffix,
                                "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
        if ns.validation_file:
            with open(ns.validation_file, "rb") as f:
                r = c.post("/v1/files", files={"file": (os.path.basename(ns.validation_file), f.read())},
                           data={"purpose": "fine-tune"})
            if r.status_code != 200:
                return _fail(r)
            body["validation_file"] = r.json()["id"]
        if ns.seed is not None:
            body["seed"] = ns.seed
        if peft:
            body["peft"] = peft
        r = c.post("/v1/fine_tuning/jobs", json=body)
        if r.status_code != 200:
            return _fail(r)
        job = r.json()
        print(f"{job['id']} {job['status']} (training file {fid})")
        if ns.follow:
            return _follow(c, job["id"])
    return 0


def _ls(ns: argparse.Namespace) -> int:
    r = call(ns, "GET", "/v1/fine_tuning/jobs", params={"limit": ns.limit})
    if r is None:
        return 1
    return list_or_json(r.json()["data"], ns.json, f"{'JOB':<30} {'STATUS':<16} {'CREATED':<20} MODEL", _job_line)


def _job_line(j: dict[str, Any]) -> str:
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created_at"]))
    return f"{j['id']:<30} {j['status']:<16} {created:<20} {j.get('fine_tuned_model') or '-'}"


def _show(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        r = c.get(f"/v1/fine_tuning/jobs/{ns.job}")
        if r.status_code != 200:
            return _fail(r)
        job = r.json()
        ck = c.get(f"/v1/fine_tuning/jobs/{ns.job}/checkpoints", params={"limit": 100})
    job["checkpoints"] = ck.json()["data"] if ck.status_code == 200 else []
    print(json.dumps(job, indent=2))
    return 0


def _cancel(ns: argparse.Namespace) -> int:
    r = call(ns, "POST", f"/v1/fine_tuning/jobs/{ns.job}/cancel")
    if r is None:
        return 1
    print(f"{ns.job} {r.json()['status']} (a running job stops at its next micro-step)")
    return 0


def _events(ns: argparse.Namespace) -> int:
    with _client(ns) as c:
        if ns.follow:
            return _follow(c, ns.job)
        r = c.get(f"/v1/fine_tuning/jobs/{ns.job}/events", params={"limit": 100})
        if r.status_code != 200:
            return _fail(r)
        for ev in reversed(r.json()["data"]):
            print(_line(ev))
    return 0


def _line(ev: dict[str, Any]) -> str:
    return f"{time.strftime('%H:%M:%S', time.localtime(ev['created_at']))} {ev['level']:<5} {ev['message']}"


def bar(step: int, total: int, loss: float | None, width: int = 30) -> str:
    """`[#####.....] step/total loss=x`, the live progress line of `events --follow`."""
    done = int(width * step / total) if total else 0
    tail = f" loss={loss:.4f}" if loss is not None else ""
    return f"[{'#' * done}{'.' * (width - done)}] {step}/{total}{tail}"


def _follow(c: Any, job_id: str, poll: float = 1.0) -> int:
    """Print new events as they come, with a progress bar redrawn on metrics events; ends with the job."""
    seen: set[str] = set()
    tty = sys.stdout.isatty()
    while True:
        r = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
        if r.status_code != 200:
            return _fail(r)
        for ev in reversed(r.json()["data"]):
            if ev["id"] in seen:
                continue
            seen.add(ev["id"])
            d = ev.get("data") or {}
            if ev["type"] == "metrics" and "total_steps" in d:
                line = bar(d["step"], d["total_steps"], d.get("train_loss"))
                print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            else:
                print(("\n" if tty else "") + _line(ev) if tty else _line(ev), flush=True)
        job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job.get("status") in FINAL:
            if tty:
                print()
            err = job.get("error") or {}
            print(f"{job_id} {job['status']}" + (f": {job.get('fine_tuned_model')}" if job.get("fine_tuned_model")
                                                 else f": {err.get('message')}" if err else ""))
            return 0 if job["status"] == "succeeded" else 1
        time.sleep(poll)


def add_finetune_commands(sub: Any) -> None:
    """Attach `finetune` and its verbs to the top-level `peftserve` parser."""
    p = sub.add_parser("finetune", help="fine-tune adapters on a running server's base model")
    verbs = p.add_subparsers(dest="verb", required=True, parser_class=type(p))

    def common(v: argparse.ArgumentParser) -> None:
        add_connection_args(v, admin_key_first=False)

    create = verbs.add_parser("create", help="upload a JSONL file and start a job")
    create.add_argument("--file", required=True, help="training data (JSONL: chat messages or prompt/completion)")
    create.add_argument("--suffix", required=True, help="part of the model name ft:<base>:<suffix>:<job>")
    create.add_argument("--validation-file")
    create.add_argument("--model", help="base model id (default: the server's base model)")
    create.add_argument("--epochs", type=int)
    create.add_argument("--batch-size", type=int)
    create.add_argument("--lr-multiplier", type=float)
    create.add_argument("--seed", type=int)
    create.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    create.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    create.add_argument("--targets", help="comma-separated modules (default all q/k/v/o/gate/up/down projections)")
    create.add_argument("--dora", action="store_true", help="train DoRA instead of plain LoRA")
    create.add_argument("--type", choices=["LORA", "PROMPT_TUNING", "PREFIX_TUNING"],
                        help="the adapter to train (default LORA)")
    create.add_argument("--virtual-tokens", type=int,
                        help="num_virtual_tokens of a PROMPT_TUNING / PREFIX_TUNING job (default 8)")
    create.add_argument("--follow", action="store_true", help="then follow its events until it ends")
    common(create)
    create.set_defaults(func=_create)
    ls = verbs.add_parser("ls", help="list jobs, newest first")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--json", action="store_true")
    common(ls)
    ls.set_defaults(func=_ls)
    events = verbs.add_parser("events", help="a job's events")
    events.add_argument("job")
    events.add_argument("--follow", action="store_true", help="live progress bar with loss until the job ends")
    common(events)
    events.set_defaults(func=_events)
    for verb, fn, help_ in (("show", _show, "one job, with its checkpoints"), ("cancel", _cancel, "cancel a job")):
        v = verbs.add_parser(verb, help=help_)
        v.add_argument("job")
        common(v)
        v.set_defaults(func=fn)
