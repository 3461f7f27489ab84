"""Child process for tests/eval: run one lm-eval backend on the local task for several models and print
per-model accuracy and per-item loglikelihoods as JSON (lm-eval and transformers stay out of the test
process, whose engine thread owns the OpenMP team)."""

from __future__ import annotations

import json
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])  # {"model": "hf"|"local-completions", "runs": {name: model_args}, "tasks": dir}
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=spec["tasks"])
    out = {}
    for name, model_args in spec["runs"].items():
        res = lm_eval.simple_evaluate(model=spec["model"], model_args=model_args, tasks=["peftserve_tiny_mc"],
                                      task_manager=tm, log_samples=True, batch_size=1)
        samples = res["samples"]["peftserve_tiny_mc"]
        out[name] = {
            "acc": res["results"]["peftserve_tiny_mc"]["acc,none"],
            "ll": {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples},
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
