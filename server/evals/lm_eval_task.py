"""`peftserve eval --task`: an lm-evaluation-harness task through the server's /v1/completions (lm-eval's
`local-completions` backend: echo + logprobs), once per model, gathered into one report.

Multiple-choice tasks give per-item loglikelihoods and the same report as a JSONL eval (Wilson intervals,
paired bootstrap against the first model); every task also reports lm-eval's own metrics with its stderr."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from server.evals.items import EvalInputError
from server.evals.runner import build_report, check_models


def _check(url: str, models: list[str], key: str | None) -> None:
    import httpx

    async def go() -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=60) as c:
            await check_models(c, models)

    asyncio.run(go())


def run_task(url: str, models: list[str], task: str, *, tokenizer: str | None, include_path: str | None = None,
             key: str | None = None, limit: int | None = None, concurrency: int = 8) -> dict[str, Any]:
    """Evaluate `task` on every model through the server at `url`; lm-eval's progress bars go to stderr."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvalInputError("--task needs lm-eval: pip install 'peftserve[eval]'", "--task") from e
    if not tokenizer:
        raise EvalInputError("--task needs --tokenizer (the served model's tokenizer dir or hub id): lm-eval "
                             "tokenizes contexts and continuations itself", "--tokenizer")
    _check(url, models, key)
    # a task in --include-path needs no index of lm-eval's ~30k bundled YAMLs (minutes of CPU): try that first
    tm = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if tm is None or task not in tm.all_tasks:
        tm = TaskManager(include_path=include_path)  # built once, handed to every run
    if task not in tm.all_tasks:
        raise EvalInputError(f"--task: unknown lm-eval task {task!r} (add its YAML dir with --include-path)", "--task")
    loaded = tm.load_task_or_group([task])[task]  # loaded once for every model
    if key:
        os.environ["OPENAI_API_KEY"] = key  # local-completions sends it as the bearer key
    t0 = time.monotonic()
    base_url = url.rstrip("/") + "/v1/completions"
    per_model: dict[str, Any] = {}
    for m in models:
        res = lm_eval.simple_evaluate(
            model="local-completions", tasks=[loaded], task_manager=tm, log_samples=True, limit=limit,
            model_args=f"model={m},base_url={base_url},tokenizer_backend=huggingface,tokenizer={tokenizer},"
                       f"num_concurrent={concurrency}")
        per_model[m] = (res["results"][task], res["samples"][task])
    return _report(task, models, per_model, time.monotonic() - t0)


def _report(task: str, models: list[str], per_model: dict[str, Any], seconds: float) -> dict[str, Any]:
    metrics = {m: {k.split(",")[0]: v for k, v in r.items() if "," in k and "_stderr" not in k}
               for m, (r, _) in per_model.items()}
    stderr = {m: {k.split(",")[0].removesuffix("_stderr"): v for k, v in r.items() if "_stderr," in k}
              for m, (r, _) in per_model.items()}
    samples = {m: sorted(s, key=lambda x: x["doc_id"]) for m, (_, s) in per_model.items()}
    first = samples[models[0]]
    rows: list[dict[str, Any]] = []
    if first and "acc" in first[0] and "target" in first[0]:  # multiple choice: one loglikelihood per choice
        for k, doc in enumerate(first):
            row = {"where": f"{task} doc {doc['doc_id']}", "kind": "mc", "answer": int(doc["target"]), "models": {}}
            for m in models:
                s = samples[m][k]
                lls = [float(r[0][0]) for r in s["resps"]]
                row["models"][m] = {"ll": lls, "pred": max(range(len(lls)), key=lambda i: lls[i]),
                                    "correct": bool(s["acc"])}
            rows.append(row)
    if rows:
        report = build_report(rows, models, seconds, {"task": task})
    else:
        report = {"object": "eval.report", "created": int(time.time()), "source": {"task": task}, "models": models,
                  "baseline": models[0], "seconds": round(seconds, 3), "results": {m: {} for m in models}, "items": []}
    for m in models:
        report["results"][m]["lm_eval"] = {k: {"value": v, "stderr": stderr[m].get(k)}
                                           for k, v in metrics[m].items() if isinstance(v, int | float)}
    return report
