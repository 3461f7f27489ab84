"""`peftserve eval` and `POST /v1/evals` through a live server on the tiny model, base + two LoRA versions.

The report's per-model multiple-choice accuracy and per-choice loglikelihoods equal an independent
computation with transformers/peft on the same items (whole-string tokenization split at the context's
length, as lm-eval does); generation items are judged by exact match against answers whose owner is known;
the API job gives the same figures as the CLI. Bad inputs fail with messages naming the field or line.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import pytest
import torch

from server.cli import main as cli_main
from tests.adapters import make_lora, peft_model
from tests.server_utils import LiveServer, live_server
from tests.tiny import make_tiny_checkpoint, tiny_tokenizer

WORDS = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish", "lamp"]
N_MC, N_GEN = 12, 3
API_KEY, ADMIN_KEY = "user-key", "admin-key"


def mc_items() -> list[dict[str, Any]]:
    rng = random.Random(7)
    out = []
    for i in range(N_MC):
        ch = rng.sample(WORDS, 3 + i % 2)
        # a trailing space on some prompts: it moves to the choices, as lm-eval does
        out.append({"prompt": f"Q{i}: pick {ch[rng.randrange(len(ch))]}.{' A:' if i % 3 else ' A: '}",
                    "choices": [c if i % 3 == 0 else " " + c for c in ch], "answer": rng.randrange(len(ch))})
    out[1]["answer"] = out[1]["choices"][2]  # an answer given as the choice's text
    return out


def reference_ll(model: Any, tok: Any, prompt: str, choice: str) -> float:
    """Sum of the choice's token logprobs after the prompt, from one transformers/peft forward."""
    n = len(prompt) - len(prompt.rstrip())
    ctx, cont = (prompt[:-n], prompt[-n:] + choice) if n else (prompt, choice)
    n_ctx = len(tok(ctx)["input_ids"])
    whole = tok(ctx + cont)["input_ids"]
    with torch.inference_mode():
        lp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
    return sum(lp[j - 1, whole[j]].item() for j in range(n_ctx, len(whole)))


@pytest.fixture(scope="module")
def setup(tiny_root: str) -> tuple[str, dict[str, str]]:
    base = make_tiny_checkpoint(tiny_root, "llama", seed=31)
    adapters = {  # the lm-eval parity test's two adapters (same dirs: built once per session)
        "v1": make_lora(base, os.path.join(tiny_root, "lmeval-v1"), r=8, targets=["q_proj", "v_proj", "down_proj"],
                        seed=3),
        "v2": make_lora(base, os.path.join(tiny_root, "lmeval-v2"), r=4, targets=["k_proj", "o_proj", "up_proj"],
                        seed=4),
    }
    return base, adapters


@pytest.fixture(scope="module")
def server(setup: tuple[str, dict[str, str]]) -> Any:
    base, adapters = setup
    with live_server(model=base, adapter=[f"{n}={d}" for n, d in adapters.items()], max_model_len=128,
                     kv_cache_blocks=256, max_num_seqs=16, api_key=API_KEY, admin_key=ADMIN_KEY) as srv:
        yield srv


def chat(srv: LiveServer, model: str, content: str) -> str:
    with srv.client(headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        r = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": content}],
                                                  "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_cli_report_equals_reference_and_api_job_agrees(setup: tuple[str, dict[str, str]], server: LiveServer,
                                                        tmp_path: Any, capsys: Any) -> None:
    base, adapters = setup
    srv = server
    models = [srv.state.base_name, "v1", "v2"]
    items = mc_items()
    # generation items: the ideal is v1's own greedy answer, so v1 is right on all of them under exact match;
    # the base answers differently on at least one (the adapter changes its output)
    gen = []
    for k in range(N_GEN):
        q = f"Say {WORDS[k]}"
        gen.append({"messages": [{"role": "user", "content": q}], "ideal": chat(srv, "v1", q)})
    assert any(chat(srv, models[0], g["messages"][0]["content"]).strip() != g["ideal"].strip() for g in gen)
    data = tmp_path / "set.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in [*items, *gen]) + "\n\n")
    out = tmp_path / "report.json"
    rc = cli_main(["eval", "--url", srv.url, "--key", API_KEY, "--models", ",".join(models), "--data", str(data),
                   "--max-tokens", "6", "--output", str(out), "--concurrency", "6"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    report = json.loads(out.read_text())
    total = N_MC + len(models) * (sum(len(x["choices"]) for x in items) + N_GEN)
    assert f"eval: {total}/{total} requests (100%)" in cap.err  # progress on stderr
    for m in models:  # side by side on stdout
        assert any(line.startswith(m) for line in cap.out.splitlines())

    tok = tiny_tokenizer()
    ref: dict[str, list[list[float]]] = {}
    for m in models:
        model = peft_model(base, adapters.get(m))
        ref[m] = [[reference_ll(model, tok, x["prompt"], c) for c in x["choices"]] for x in items]
    answers = [x["choices"].index(x["answer"]) if isinstance(x["answer"], str) else x["answer"] for x in items]
    preds = {m: [max(range(len(r)), key=r.__getitem__) for r in ref[m]] for m in models}
    # the adapters change the predictions, so equal accuracies are not a coincidence of identical models
    assert preds[models[0]] != preds["v1"] and preds[models[0]] != preds["v2"]
    rows = report["items"]
    assert len(rows) == N_MC + N_GEN and [r["kind"] for r in rows] == ["mc"] * N_MC + ["gen"] * N_GEN
    for m in models:
        for k in range(N_MC):
            got = rows[k]["models"][m]["ll"]
            assert max(abs(a - b) for a, b in zip(got, ref[m][k], strict=True)) < 1e-3, (m, k)
        want_mc = sum(p == a for p, a in zip(preds[m], answers, strict=True))
        res = report["results"][m]
        assert res["mc"]["accuracy"] == pytest.approx(want_mc / N_MC)
        want_gen = sum(r["models"][m]["output"].strip() == r["ideal"][0].strip() for r in rows[N_MC:])
        assert res["gen"]["accuracy"] == pytest.approx(want_gen / N_GEN)
        assert res["accuracy"] == pytest.approx((want_mc + want_gen) / (N_MC + N_GEN))
        lo, hi = res["accuracy_ci"]
        assert lo <= res["accuracy"] <= hi and 0 < hi - lo < 1
        want_ll = sum(ref[m][k][answers[k]] for k in range(N_MC)) / N_MC
        assert abs(res["mc"]["mean_loglikelihood"] - want_ll) < 1e-3
    assert report["results"]["v1"]["gen"]["accuracy"] == 1.0
    assert report["results"][models[0]]["gen"]["accuracy"] < 1.0

    # the same set through POST /v1/evals (admin): a job, polled until it ends; same figures as the CLI
    body = {"models": models, "data": data.read_text(), "max_tokens": 6}
    with srv.client(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as c:
        r = c.post("/v1/evals", json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "running" and job["progress"]["total"] == total
        deadline = time.monotonic() + 300
        while job["status"] == "running":
            assert time.monotonic() < deadline, job["progress"]
            time.sleep(0.2)
            job = c.get(f"/v1/evals/{job['id']}").json()
    assert job["status"] == "succeeded", job
    assert job["progress"]["done"] == total
    for m in models:
        api, cli = job["report"]["results"][m], report["results"][m]
        assert api["accuracy"] == cli["accuracy"] and api["correct"] == cli["correct"]
        assert abs(api["mc"]["mean_loglikelihood"] - cli["mc"]["mean_loglikelihood"]) < 1e-4


@pytest.mark.parametrize("lines, needle", [
    (['{"prompt": "a", "choices": ["x", "y"], "answer": 0}', '{"prompt": "b", "choices": ["x", "y"]'],
     "line 2: malformed JSON"),
    (['{"prompt": "a", "choices": ["x", "y"], "answer": 5}'], "line 1: 'answer' must be an index"),
    (['{"prompt": "a", "choices": ["x"], "answer": 0}'], "line 1: 'choices' must be a list of at least 2"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "line 1: generation item is missing 'ideal'"),
    (['{"messages": [{"role": "robot", "content": "hi"}], "ideal": "x"}'], "line 1: messages[0] must be"),
    (['{"question": "a"}'], "line 1: an item needs either"),
    (["", "  "], "no items (the eval set is empty)"),
])
def test_cli_bad_jsonl_names_the_line_and_field(server: LiveServer, tmp_path: Any, capsys: Any, lines: list[str],
                                                needle: str) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines))
    rc = cli_main(["eval", "--url", server.url, "--key", API_KEY, "--models", "v1", "--data", str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and str(data) in err, err


def test_cli_and_api_refuse_unknown_models_and_bad_keys(server: LiveServer, tmp_path: Any, capsys: Any) -> None:
    data = tmp_path / "ok.jsonl"
    data.write_text('{"prompt": "a", "choices": ["x", "y"], "answer": 0}\n')
    rc = cli_main(["eval", "--url", server.url, "--key", API_KEY, "--models", "v1,nope", "--data", str(data)])
    err = capsys.readouterr().err
    assert rc == 2 and "--models: unknown model 'nope'" in err and "v1" in err, err
    with server.client() as c:
        ok = {"models": ["v1"], "items": [{"prompt": "a", "choices": ["x", "y"], "answer": 0}]}
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        assert c.post("/v1/evals", json=ok).status_code == 401
        r = c.post("/v1/evals", json=ok, headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 403 and "admin key" in r.json()["error"]["message"]
        r = c.post("/v1/evals", json={**ok, "models": ["v1", "nope"]}, headers=admin)
        assert r.status_code == 404 and r.json()["error"]["param"] == "models" and "'nope'" in r.text
        bad = {"models": ["v1"], "items": [ok["items"][0], {"prompt": "b", "choices": ["x", "y"], "answer": "z"}]}
        r = c.post("/v1/evals", json=bad, headers=admin)
        assert r.status_code == 400 and r.json()["error"]["param"] == "items[1].answer", r.text
        r = c.post("/v1/evals", json={"models": ["v1"], "items": []}, headers=admin)
        assert r.status_code == 400 and "empty" in r.json()["error"]["message"]
        line = json.dumps({"prompt": 1, "choices": ["x", "y"], "answer": 0})
        r = c.post("/v1/evals", json={"models": ["v1"], "data": line + "\n"}, headers=admin)
        assert r.status_code == 400 and "data: line 1: 'prompt'" in r.json()["error"]["message"], r.text
        assert c.get("/v1/evals/eval-missing", headers=admin).status_code == 404
