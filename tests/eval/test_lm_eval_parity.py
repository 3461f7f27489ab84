"""lm-evaluation-harness through the server: `local-completions` (echo + logprobs on /v1/completions) on a
local multiple-choice task gives the same per-item loglikelihoods and accuracy as lm-eval's `hf` backend
(with `peft=` for the adapter), for the base model and a LoRA adapter."""

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
WORDS = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird"]


def write_task(d: str) -> str:
    """A 10-item multiple-choice task read from a local JSONL (no hub)."""
    rng = random.Random(0)
    items = os.path.join(d, "items.jsonl")
    with open(items, "w") as f:
        for i in range(10):
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


def run_lm_eval(model: str, runs: dict[str, str], tasks: str, home: str) -> dict:
    env = {**os.environ, "HF_HOME": home, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    spec = json.dumps({"model": model, "runs": runs, "tasks": tasks})
    p = subprocess.run([sys.executable, "-m", "tests.eval.lm_eval_run", spec], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.slow
def test_lm_eval_local_completions_equals_hf_backend(tiny_root: str, tmp_path) -> None:
    base = make_tiny_checkpoint(tiny_root, "llama", seed=31)
    lora = make_lora(base, os.path.join(tiny_root, "lmeval-lora"), r=8, targets=["q_proj", "v_proj", "down_proj"],
                     seed=3)
    tasks = write_task(str(tmp_path))
    home = str(tmp_path / "hf-home")
    ref = run_lm_eval("hf", {"base": f"pretrained={base},dtype=float32,device=cpu",
                             "lora": f"pretrained={base},peft={lora},dtype=float32,device=cpu"}, tasks, home)
    # the adapter changes the items' loglikelihoods, so agreeing on it means something
    assert max(abs(a - b) for k in ref["base"]["ll"] for a, b in zip(ref["base"]["ll"][k], ref["lora"]["ll"][k],
                                                                     strict=True)) > 0.1
    with live_server(model=base, adapter=[f"lora={lora}"], max_model_len=128, kv_cache_blocks=256) as srv:
        url = f"{srv.url}/v1/completions"
        args = f"base_url={url},tokenizer_backend=huggingface,tokenizer={base}"
        got = run_lm_eval("local-completions", {"base": f"model={srv.state.base_name},{args}",
                                                "lora": f"model=lora,{args}"}, tasks, home)
    for name in ("base", "lora"):
        assert got[name]["ll"].keys() == ref[name]["ll"].keys() and len(got[name]["ll"]) == 10
        for k, want in ref[name]["ll"].items():
            assert max(abs(a - b) for a, b in zip(got[name]["ll"][k], want, strict=True)) < 1e-3, (name, k)
        assert abs(got[name]["acc"] - ref[name]["acc"]) < 1e-9
