"""lm-evaluation-harness through the server: `local-completions` (echo + logprobs on /v1/completions) on a
local multiple-choice task gives the same per-item loglikelihoods and accuracy as lm-eval's `hf` backend
(with `peft=` for each adapter), for the base model and two adapters (two LoRA versions of one
"assistant", as a team compares them before a release).

`peftserve eval --task` (server/evals/lm_eval_task.py) runs the same task for the three models and its
report must carry the same per-item loglikelihoods and accuracies.

Cost: one lm-eval child process runs all the evaluations (three models x two backends, then the CLI's
path) on one task index, while the server (started first, serving both adapters) answers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from tests.adapters import make_lora
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint

pytest.importorskip("lm_eval", reason="lm-eval is the optional [eval] extra; make test installs it")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_ITEMS = 10  # x 3 choices x 3 models: 90 scored continuations per backend
WORDS = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird"]


def write_task(d: str) -> str:
    """An N_ITEMS multiple-choice task read from a local JSONL (no hub)."""
    rng = random.Random(0)
    items = os.path.join(d, "items.jsonl")
    with open(items, "w") as f:
        for i in range(N_ITEMS):
            ch = rng.sample(WORDS, 3)
            f.write(json.dumps({"prompt": f"Q{i}: pick {ch[rng.randrange(3)]}. A:", "choices": [" " + c for c in ch],
                                "answer": rng.randrange(3)}) + "\n")
    tasks = os.path.join(d, "tasks")
    os.makedirs(tasks, exist_ok=True)
    with open(os.path.join(tasks, "peftserve_tiny_mc.yaml"), "w") as f:
        f.write(f"""task: peftserve_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {items}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return tasks


def run_lm_eval(runs: dict[str, tuple[str, str]], tasks: str, home: str, peftserve: dict | None = None) -> dict:
    """label -> (lm-eval backend, model_args), plus `peftserve eval --task`'s run_task, in one child process."""
    env = {**os.environ, "HF_HOME": home, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    spec = json.dumps({"runs": runs, "tasks": tasks, **({"peftserve": peftserve} if peftserve else {})})
    p = subprocess.run([sys.executable, "-m", "tests.eval.lm_eval_run", spec], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.slow
def test_lm_eval_local_completions_equals_hf_backend(tiny_root: str, tmp_path) -> None:
    base = make_tiny_checkpoint(tiny_root, "llama", seed=31)
    adapters = {
        "v1": make_lora(base, os.path.join(tiny_root, "lmeval-v1"), r=8, targets=["q_proj", "v_proj", "down_proj"],
                        seed=3),
        "v2": make_lora(base, os.path.join(tiny_root, "lmeval-v2"), r=4, targets=["k_proj", "o_proj", "up_proj"],
                        seed=4),
    }
    tasks = write_task(str(tmp_path))
    home = str(tmp_path / "hf-home")
    hf = "dtype=float32,device=cpu"
    with live_server(model=base, adapter=[f"{n}={d}" for n, d in adapters.items()], max_model_len=128,
                     kv_cache_blocks=256) as srv:
        args = f"base_url={srv.url}/v1/completions,tokenizer_backend=huggingface,tokenizer={base}"
        runs = {"hf:base": ("hf", f"pretrained={base},{hf}"),
                **{f"hf:{n}": ("hf", f"pretrained={base},peft={d},{hf}") for n, d in adapters.items()},
                "server:base": ("local-completions", f"model={srv.state.base_name},{args}"),
                **{f"server:{n}": ("local-completions", f"model={n},{args}") for n in adapters}}
        names = [srv.state.base_name, *adapters]  # and once more through `peftserve eval --task`'s code
        got = run_lm_eval(runs, tasks, home, {"url": srv.url, "models": names, "tokenizer": base,
                                              "labels": [f"cli:{n}" for n in ("base", *adapters)]})
    ll = {k: v["ll"] for k, v in got.items()}
    # each adapter changes the items' loglikelihoods (and the two differ), so agreeing on them means something
    for a, b in (("base", "v1"), ("base", "v2"), ("v1", "v2")):
        assert max(abs(x - y) for k in ll[f"hf:{a}"] for x, y in zip(ll[f"hf:{a}"][k], ll[f"hf:{b}"][k],
                                                                       strict=True)) > 0.1, (a, b)
    for name in ("base", *adapters):
        want, have = got[f"hf:{name}"], got[f"server:{name}"]
        assert have["ll"].keys() == want["ll"].keys() and len(have["ll"]) == N_ITEMS
        for k, w in want["ll"].items():
            assert max(abs(a - b) for a, b in zip(have["ll"][k], w, strict=True)) < 1e-3, (name, k)
        assert abs(have["acc"] - want["acc"]) < 1e-9, name
        cli = got[f"cli:{name}"]  # the CLI's report: same loglikelihoods, same accuracy
        assert cli["ll"].keys() == {str(k) for k in want["ll"]}
        for k, w in want["ll"].items():
            assert max(abs(a - b) for a, b in zip(cli["ll"][str(k)], w, strict=True)) < 1e-3, (name, k)
        assert abs(cli["acc"] - want["acc"]) < 1e-9 and abs(cli["report_acc"] - want["acc"]) < 1e-9, name
