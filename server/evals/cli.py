"""`peftserve eval`: score a JSONL eval set (or an lm-eval task) on several models of a running server,
print the figures side by side, write a JSON report. Progress goes to stderr."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import httpx

from server.evals.items import MATCHES, EvalInputError, parse_jsonl
from server.evals.runner import EvalRunError, format_table, run_eval


class _Progress:
    """`eval: 120/400 requests (30%), 12 s` on stderr, at most every 2 s and at the end."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.t0 = self.last = time.monotonic()
        self.every_s = every_s

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self.last >= self.every_s:
            self.last = now
            print(f"eval: {done}/{total} requests ({100 * done // max(total, 1)}%), {now - self.t0:.0f} s",
                  file=sys.stderr, flush=True)


def _models(value: str) -> list[str]:
    return [m.strip() for m in value.split(",") if m.strip()]


async def _run_jsonl(ns: argparse.Namespace, models: list[str]) -> dict[str, Any]:
    try:
        with open(ns.data, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise EvalInputError(f"--data {ns.data}: {e.strerror}", "--data") from e
    items = parse_jsonl(text, ns.data, ns.match)
    headers = {"Authorization": f"Bearer {ns.key}"} if ns.key else {}
    async with httpx.AsyncClient(base_url=ns.url.rstrip("/"), headers=headers, timeout=ns.timeout) as c:
        return await run_eval(c, items, models, concurrency=ns.concurrency, max_tokens=ns.max_tokens,
                              progress=_Progress(), source={"data": os.path.abspath(ns.data)})


def _eval(ns: argparse.Namespace) -> int:
    models = _models(ns.models)
    try:
        if ns.concurrency < 1:
            raise EvalInputError(f"--concurrency must be at least 1, got {ns.concurrency}", "--concurrency")
        if ns.task:
            from server.evals.lm_eval_task import run_task

            if ns.data:
                raise EvalInputError("give either --data or --task, not both", "--task")
            report = run_task(ns.url, models, ns.task, tokenizer=ns.tokenizer, include_path=ns.include_path,
                              key=ns.key, limit=ns.limit, concurrency=ns.concurrency)
        elif ns.data:
            report = asyncio.run(_run_jsonl(ns, models))
        else:
            raise EvalInputError("give the eval set: --data FILE.jsonl or --task NAME", "--data")
    except (EvalInputError, EvalRunError) as e:
        print(f"peftserve: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, EvalInputError) else 1
    except (OSError, httpx.HTTPError) as e:  # the server is not there, or went away
        print(f"peftserve: error: {ns.url}: {e!r}", file=sys.stderr)
        return 1
    print(format_table(report))
    if ns.output:
        with open(ns.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"report written to {ns.output}", file=sys.stderr)
    return 0


def add_eval_command(sub: Any) -> None:
    """Attach `eval` to the top-level `peftserve` parser."""
    p = sub.add_parser("eval", help="score an eval set (JSONL or lm-eval task) on several models of a running server")
    p.add_argument("--models", required=True, help="comma-separated: the base model's id and/or adapter names; the "
                                                   "first is the baseline the others are compared with")
    p.add_argument("--data", help="JSONL: {prompt, choices, answer} (multiple choice by loglikelihood) or "
                                  "{messages, ideal} (generation, exact/contains match) per line")
    p.add_argument("--task", help="an lm-eval task name (needs the [eval] extra and --tokenizer)")
    p.add_argument("--include-path", help="extra lm-eval task dir (YAML) for --task")
    p.add_argument("--tokenizer", help="the served model's tokenizer dir or hub id (for --task)")
    p.add_argument("--limit", type=int, help="--task: score only the first N documents")
    p.add_argument("--match", choices=MATCHES, default="exact", help="generation items: how the answer is judged "
                                                                      "(an item's own 'match' wins)")
    p.add_argument("--max-tokens", type=int, default=64, help="generation items: answer length limit")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (the server batches them)")
    p.add_argument("--output", "-o", help="write the JSON report here")
    p.add_argument("--url", default=os.environ.get("PEFTSERVE_URL", "http://127.0.0.1:8000"),
                   help="server URL [env PEFTSERVE_URL]")
    p.add_argument("--key", default=os.environ.get("PEFTSERVE_API_KEY"), help="bearer key [env PEFTSERVE_API_KEY]")
    p.add_argument("--timeout", type=float, default=600.0)
    p.set_defaults(func=_eval)
