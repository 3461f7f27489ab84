"""Run eval items against several served models through the OpenAI-compatible routes and build the report.

Multiple choice, scored as lm-eval's local-completions scores it: the context alone is tokenized once
(`echo`, `max_tokens: 0`, `return_token_ids`) to learn its length n; then context + choice is scored with
`echo`, `logprobs: 0`, `max_tokens: 0`, and the choice's loglikelihood is the sum of the token logprobs
from position n on (whitespace that ends the context moves to the choice first, as lm-eval does). The
prediction is the choice with the highest loglikelihood. Generation: a greedy chat answer (temperature 0),
right when it matches an ideal answer (`exact` or `contains`).

The client is any httpx.AsyncClient on the server: a socket for the CLI, the app itself for /v1/evals.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from server.evals.items import EvalInputError, GenItem, Item, MCItem, is_correct
from server.evals.stats import CI_METHODS, mean_ci, paired_bootstrap, wilson

Progress = Callable[[int, int], None]  # (requests done, total)
MAX_RETRIES = 20  # 429 (queue full): wait Retry-After and try again
MAX_CONNECTION_RETRIES = 3


class UnknownModelError(EvalInputError):
    """A model the server does not serve."""


class EvalRunError(RuntimeError):
    """The server refused or failed a request; the message says which model and item."""


async def served_models(client: httpx.AsyncClient) -> list[str]:
    r = await client.get("/v1/models")
    if r.status_code != 200:
        raise EvalRunError(f"GET /v1/models: HTTP {r.status_code}: {_message(r)}")
    return [m["id"] for m in r.json()["data"]]


async def check_models(client: httpx.AsyncClient, models: list[str], param: str = "--models") -> None:
    """Every model is served (the base or an adapter); an unknown one is named with what is."""
    if not models:
        raise EvalInputError(f"{param}: name at least one model", param)
    dup = sorted({m for m in models if models.count(m) > 1})
    if dup:
        raise EvalInputError(f"{param}: model {dup[0]!r} is listed twice", param)
    served = await served_models(client)
    for m in models:
        if m not in served:
            raise UnknownModelError(f"{param}: unknown model {m!r}; the server serves: {', '.join(served)}", param)


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:500]


class _Runner:
    def __init__(self, client: httpx.AsyncClient, concurrency: int, total: int, progress: Progress | None,
                 max_tokens: int) -> None:
        self.client = client
        self.sem = asyncio.Semaphore(concurrency)
        self.done, self.total, self.progress = 0, total, progress
        self.max_tokens = max_tokens

    async def post(self, path: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        async with self.sem:
            for attempt in range(MAX_RETRIES):
                try:
                    r = await self.client.post(path, json=body)
                except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as e:
                    # a pooled keep-alive connection the server closed as we reused it: scoring and greedy
                    # answers have no side effects, so send it again on a fresh connection
                    if attempt >= MAX_CONNECTION_RETRIES:
                        raise EvalRunError(f"{what}: POST {path} for model {body.get('model')!r}: {e!r}") from e
                    continue
                if r.status_code != 429:
                    break
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
            if r.status_code != 200:
                raise EvalRunError(f"{what}: POST {path} for model {body.get('model')!r}: HTTP {r.status_code}: "
                                   f"{_message(r)}")
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
        return r.json()

    async def context_len(self, item: MCItem, model: str) -> tuple[str, int]:
        ctx, _ = split_pair(item.prompt, item.choices[0])
        out = await self.post("/v1/completions", {"model": model, "prompt": ctx, "echo": True, "max_tokens": 0,
                                                  "return_token_ids": True}, item.where)
        return ctx, len(out["prompt_token_ids"])

    async def choice_ll(self, item: MCItem, model: str, n_ctx: int, choice: str) -> float:
        ctx, cont = split_pair(item.prompt, choice)
        out = await self.post("/v1/completions", {"model": model, "prompt": ctx + cont, "echo": True, "logprobs": 0,
                                                  "max_tokens": 0, "return_token_ids": True}, item.where)
        lps = out["choices"][0]["logprobs"]["token_logprobs"]
        if len(lps) <= n_ctx:
            raise EvalRunError(f"{item.where}: choice {choice!r} adds no token to the prompt")
        return float(sum(lps[n_ctx:]))

    async def mc(self, item: MCItem, model: str, n_ctx: int) -> dict[str, Any]:
        lls = await asyncio.gather(*(self.choice_ll(item, model, n_ctx, c) for c in item.choices))
        pred = max(range(len(lls)), key=lambda i: lls[i])
        return {"ll": lls, "pred": pred, "correct": pred == item.answer}

    async def gen(self, item: GenItem, model: str) -> dict[str, Any]:
        out = await self.post("/v1/chat/completions", {"model": model, "messages": list(item.messages),
                                                       "max_tokens": self.max_tokens, "temperature": 0}, item.where)
        text = out["choices"][0]["message"]["content"]
        return {"output": text, "correct": is_correct(item, text)}


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's convention: whitespace ending the context belongs to the continuation."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def request_count(items: list[Item], models: list[str]) -> int:
    mc = [i for i in items if isinstance(i, MCItem)]
    return len(mc) + len(models) * (sum(len(i.choices) for i in mc) + len(items) - len(mc))


async def run_eval(client: httpx.AsyncClient, items: list[Item], models: list[str], *, concurrency: int = 8,
                   max_tokens: int = 64, progress: Progress | None = None,
                   source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every item on every model (the server batches the concurrent requests) and build the report."""
    await check_models(client, models)
    t0 = time.monotonic()
    run = _Runner(client, concurrency, request_count(items, models), progress, max_tokens)

    async def one(item: Item) -> dict[str, Any]:
        if isinstance(item, MCItem):
            _, n_ctx = await run.context_len(item, models[0])  # the tokenizer is the base's for every model
            per = await asyncio.gather(*(run.mc(item, m, n_ctx) for m in models))
            return {"where": item.where, "kind": "mc", "answer": item.answer, "models": dict(zip(models, per,
                                                                                                strict=True))}
        per = await asyncio.gather(*(run.gen(item, m) for m in models))
        return {"where": item.where, "kind": "gen", "ideal": list(item.ideal), "match": item.match,
                "models": dict(zip(models, per, strict=True))}

    rows = await asyncio.gather(*(one(i) for i in items))
    return build_report(rows, models, time.monotonic() - t0, source or {})


def build_report(rows: list[dict[str, Any]], models: list[str], seconds: float, source: dict[str, Any]
                 ) -> dict[str, Any]:
    results: dict[str, Any] = {}
    first = [r["models"][models[0]]["correct"] for r in rows]
    for m in models:
        correct = [r["models"][m]["correct"] for r in rows]
        k, n = sum(correct), len(correct)
        res: dict[str, Any] = {"n": n, "correct": k, "accuracy": k / n, "accuracy_ci": list(wilson(k, n))}
        mc = [r for r in rows if r["kind"] == "mc"]
        if mc:
            lls = [r["models"][m]["ll"][r["answer"]] for r in mc]
            ci = mean_ci(lls)
            mk = sum(r["models"][m]["correct"] for r in mc)
            res["mc"] = {"n": len(mc), "accuracy": mk / len(mc), "accuracy_ci": list(wilson(mk, len(mc))),
                         "mean_loglikelihood": sum(lls) / len(lls),
                         "mean_loglikelihood_ci": list(ci) if ci else None}
        gen = [r for r in rows if r["kind"] == "gen"]
        if gen:
            gk = sum(r["models"][m]["correct"] for r in gen)
            res["gen"] = {"n": len(gen), "accuracy": gk / len(gen), "accuracy_ci": list(wilson(gk, len(gen)))}
        if m != models[0]:
            res["delta_accuracy"] = res["accuracy"] - sum(first) / n
            res["delta_accuracy_ci"] = list(paired_bootstrap(first, correct))
        results[m] = res
    return {"object": "eval.report", "created": int(time.time()), "source": source, "models": models,
            "n_items": len(rows), "seconds": round(seconds, 3), "baseline": models[0],
            "confidence_intervals": CI_METHODS, "results": results, "items": rows}


def format_table(report: dict[str, Any]) -> str:
    """The per-model figures side by side, one row per model."""
    def pct(x: float) -> str:
        return f"{100 * x:5.1f}"

    lines = [f"{'MODEL':<28} {'N':>5} {'ACC %':>6} {'95% CI (Wilson)':>16} {'DELTA vs ' + report['baseline']:>24} "
             f"{'MEAN LL':>9} {'95% CI':>19}"]
    for m in report["models"]:
        r = report["results"][m]
        if "accuracy" not in r:  # an lm-eval task without per-item choices: its own metrics (+- stderr)
            lines.append(f"{m:<28} " + ", ".join(f"{k} {v['value']:.4f}" + (f" +- {v['stderr']:.4f}" if isinstance(
                v["stderr"], float) else "") for k, v in r.get("lm_eval", {}).items()))
            continue
        lo, hi = r["accuracy_ci"]
        delta = ""
        if "delta_accuracy" in r:
            dlo, dhi = r["delta_accuracy_ci"]
            delta = f"{100 * r['delta_accuracy']:+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}]"
        ll, llci = "", ""
        if "mc" in r:
            ll = f"{r['mc']['mean_loglikelihood']:.3f}"
            ci = r["mc"]["mean_loglikelihood_ci"]
            llci = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        lines.append(f"{m:<28} {r['n']:>5} {pct(r['accuracy']):>6} {f'[{pct(lo)}, {pct(hi)}]':>16} {delta:>24} "
                     f"{ll:>9} {llci:>19}")
    return "\n".join(lines)
