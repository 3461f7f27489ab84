"""Child process for tests/eval: run lm-eval on the local task for several (backend, model) pairs and print
per-run accuracy and per-item loglikelihoods as JSON (lm-eval and transformers stay out of the test
process, whose engine thread owns the OpenMP team). One process, one task index and one task load serve every run."""

from __future__ import annotations

import json
import sys
import time

TASK = "peftserve_tiny_mc"


def main() -> None:
    # {"tasks": dir, "runs": {label: [backend, model_args]}, "peftserve": {url, models, labels, tokenizer}?}
    spec = json.loads(sys.argv[1])
    import lm_eval
    from lm_eval.tasks import TaskManager

    # only the test's task dir: indexing lm-eval's ~30k bundled task YAMLs costs more than all the scoring
    tm = TaskManager(include_path=spec["tasks"], include_defaults=False)
    task = tm.load_task_or_group([TASK])[TASK]  # loaded once, reused by every run
    out = {}
    for label, (backend, model_args) in spec["runs"].items():
        t0 = time.process_time()
        res = lm_eval.simple_evaluate(model=backend, model_args=model_args, tasks=[task], task_manager=tm,
                                      log_samples=True, batch_size=1)
        samples = res["samples"][TASK]
        out[label] = {
            "acc": res["results"][TASK]["acc,none"],
            "ll": {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples},
        }
        print(f"lm_eval_run: {label} took {time.process_time() - t0:.1f} s CPU", file=sys.stderr)
    if "peftserve" in spec:  # `peftserve eval --task`'s code path, every model in one call
        from server.evals.lm_eval_task import run_task

        ps = spec["peftserve"]
        report = run_task(ps["url"], ps["models"], TASK, tokenizer=ps["tokenizer"], include_path=spec["tasks"],
                          concurrency=1)
        for m, label in zip(ps["models"], ps["labels"], strict=True):
            out[label] = {"acc": report["results"][m]["lm_eval"]["acc"]["value"],
                          "report_acc": report["results"][m]["accuracy"],
                          "ll": {r["where"].rsplit(" ", 1)[-1]: r["models"][m]["ll"] for r in report["items"]}}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
