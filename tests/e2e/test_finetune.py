"""Fine-tuning through the official `openai` client: upload → job → events → the trained adapter answers.

The dataset teaches a visible style on a tiny random Llama: every answer begins with PHRASE. The adapter is
trained on the server's own resident weights, lands in the store, and is served at once; PEFT loading the
saved adapter over the HF checkpoint gives the same greedy tokens as the server.
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx
import openai
import pytest
import torch

from server.train.dataset import render_chat_ids
from tests.adapters import greedy, greedy_recompute, peft_model
from tests.server_utils import LiveServer, live_server
from tests.tiny import make_tiny_checkpoint
from tests.waits import wait_for

PHRASE = "Aye! "
WORDS = ["sky", "sea", "tree", "rock", "fire", "snow", "leaf", "sand", "rain", "wind", "moon", "star",
         "bird", "fish", "lake", "hill", "road", "door", "lamp", "book", "ship", "bell", "coin", "rose"]
QUESTIONS = ["What about the {}?", "Tell me of the {}.", "Is the {} nice?", "Where is the {}?"]
STEP_TOKENS = 32  # below every sample's length (~45-60 tokens): each is trained in 2 chunks through the KV cache
HELD_OUT = ["What about the cloud?", "Tell me of the pear.", "Is the dog nice?", "Name a fruit."]


def dataset(n: int = 24, words: list[str] = WORDS) -> bytes:
    rows = [{"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)].format(w)},
                          {"role": "assistant", "content": PHRASE + w}]} for i, w in enumerate(words[:n])]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


@pytest.fixture(scope="module")
def server(tiny_root: str, tmp_path_factory: pytest.TempPathFactory):
    base = make_tiny_checkpoint(tiny_root, "llama", seed=5)
    with live_server(model=base, adapters_dir=str(tmp_path_factory.mktemp("ft-store")), max_model_len=128,
                     kv_cache_blocks=64, train_share=0.5, train_max_step_tokens=STEP_TOKENS) as srv:
        yield srv


def client(srv: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=120)


def wait_job(c: openai.OpenAI, job_id: str, timeout: float = 120) -> object:
    """Follow the job's events until it reaches a final state (deadline: a failure, not a hang)."""
    final = ("succeeded", "failed", "cancelled")
    seen: list[str] = []

    def done() -> bool:
        for ev in c.fine_tuning.jobs.list_events(job_id, limit=100).data:
            if ev.id not in seen:
                seen.append(ev.id)
        return c.fine_tuning.jobs.retrieve(job_id).status in final

    wait_for(done, f"job {job_id} to finish", timeout=timeout, poll=0.05)
    return c.fine_tuning.jobs.retrieve(job_id)


def test_openai_client_trains_a_style_and_serves_it(server: LiveServer) -> None:
    c = client(server)
    f = c.files.create(file=("style.jsonl", dataset()), purpose="fine-tune")
    assert f.purpose == "fine-tune" and f.bytes == len(dataset())
    val = c.files.create(file=("val.jsonl", dataset(4, ["cup", "owl", "hat", "egg"])), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        model=server.state.base_name, training_file=f.id, validation_file=val.id, suffix="aye", seed=0,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 5, "batch_size": 1, "learning_rate_multiplier": 3}}})
    assert job.status == "validating_files"
    job = wait_job(c, job.id)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{server.state.base_name}:aye:{job.id[-8:]}"
    assert job.trained_tokens and job.trained_tokens > 0
    events = c.fine_tuning.jobs.list_events(job.id, limit=100).data[::-1]  # oldest first
    messages = [e.message for e in events]
    assert messages[0].startswith("Validating training file") and "Fine-tuning job started" in messages
    losses = [e.data["train_loss"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert len(losses) >= 6 and sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses
    # --train-max-step-tokens held: no micro-step ran more than STEP_TOKENS tokens, so samples were chunked
    started = next(e for e in events if e.message == "Fine-tuning job started")
    assert started.data == {"max_step_tokens": STEP_TOKENS}
    last = [e.data for e in events if e.type == "metrics" and "micro_steps" in e.data][-1]
    assert last["largest_micro_step_tokens"] <= STEP_TOKENS and last["micro_steps"] >= 2 * last["step"], last
    ckpts = c.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [k.step_number for k in ckpts] == [120, 96, 72, 48, 24]  # 24 steps an epoch; the last is the model
    valid = [k.metrics.valid_loss for k in ckpts[::-1]]
    assert valid[-1] < valid[0] and any("validation loss=" in m for m in messages), valid
    ids = {m.id for m in c.models.list().data}
    assert job.fine_tuned_model in ids and all(k.fine_tuned_model_checkpoint in ids for k in ckpts)

    def answer(model: str, q: str) -> tuple[str, list[int]]:
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=10,
                                      temperature=0, extra_body={"return_token_ids": True})
        return r.choices[0].message.content, r.choices[0].model_extra["token_ids"]

    tuned = {q: answer(job.fine_tuned_model, q) for q in HELD_OUT}
    base = {q: answer(server.state.base_name, q) for q in HELD_OUT}
    assert all(t.startswith(PHRASE) for t, _ in tuned.values()), tuned
    assert not any(b.startswith(PHRASE[:3]) for b, _ in base.values()), base

    # the stored adapter is a standard PEFT dir: PeftModel over the HF checkpoint gives the server's tokens
    path = server.state.store.path(job.fine_tuned_model)
    ref = peft_model(os.path.join(server.state.settings.model), str(path))
    tok = server.state.tokenizer
    for q, (_, toks) in tuned.items():
        prompt = render_chat_ids(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
        assert greedy(ref, prompt, len(toks)) == toks, q


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "PREFIX_TUNING"])
def test_prompt_and_prefix_tuning_jobs_train_and_serve_what_peft_computes(server: LiveServer, kind: str) -> None:
    """A prompt- or prefix-tuning job trains PEFT's own virtual tokens over the resident base; the stored adapter
    changes the base's greedy answers, and the server's tokens equal PeftModel's over the saved dir."""
    c = client(server)
    f = c.files.create(file=("pt.jsonl", dataset(8)), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(
        model=server.state.base_name, training_file=f.id, suffix=kind.split("_")[0].lower(), seed=1,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}},
        extra_body={"peft": {"type": kind, "num_virtual_tokens": 6}})
    assert job.model_extra["peft"] == {"type": kind, "num_virtual_tokens": 6}
    job = wait_job(c, job.id)
    assert job.status == "succeeded", job.error
    losses = [e.data["train_loss"] for e in c.fine_tuning.jobs.list_events(job.id, limit=100).data
              if e.type == "metrics" and "train_loss" in e.data][::-1]
    assert len(losses) == 8 and sum(losses[4:]) < sum(losses[:4]), losses  # epoch 2 below epoch 1
    path = server.state.store.path(job.fine_tuned_model)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == kind and cfg["num_virtual_tokens"] == 6
    tok = server.state.tokenizer
    prompts = [render_chat_ids(tok, [{"role": "user", "content": q}], add_generation_prompt=True)
               for q in HELD_OUT[:3]]

    def tokens(model: str, prompt: list[int]) -> list[int]:
        r = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": model, "prompt": prompt, "max_tokens": 8, "min_tokens": 8, "temperature": 0,
            "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    tuned = [tokens(job.fine_tuned_model, p) for p in prompts]
    assert tuned != [tokens(server.state.base_name, p) for p in prompts]  # the virtual tokens steer the model
    ref = peft_model(server.state.settings.model, str(path))  # PEFT's forward over the prompt each step
    for prompt, toks in zip(prompts, tuned, strict=True):
        assert greedy_recompute(ref, prompt, len(toks), eos=tok.eos_token_id) == toks


def test_training_aliases_the_resident_weights(server: LiveServer) -> None:
    """The HF model a job trains is built over the serving decoder's tensors: same storage, no copy."""
    from server.train.resident import build_resident_model, resident_tensor

    runner = server.state.engine.runner
    model = build_resident_model(runner.decoder, runner.hf_config)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert len(params) > 10
    for name, p in params.items():
        assert p.data_ptr() == resident_tensor(runner.decoder, name).data_ptr(), name
    fused = runner.decoder.layers[0].qkv
    assert params["model.layers.0.self_attn.q_proj.weight"].data_ptr() == fused.data_ptr()
    assert params["model.layers.0.self_attn.k_proj.weight"].untyped_storage().data_ptr() == \
        fused.untyped_storage().data_ptr()
    # and the HF model computes what serving computes (same logits for a prompt)
    ids = [5, 17, 99, 3, 42]
    with torch.no_grad():
        hf = model(input_ids=torch.tensor([ids])).logits[0, -1]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ids, "max_tokens": 1, "temperature": 0,
                                                          "logprobs": 1, "return_token_ids": True}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == [int(hf.argmax())]


BAD_FILES = {
    "bad json": (b'{"messages": [}\n', "line 1: not valid JSON"),
    "missing role": (b'{"messages": [{"role": "user", "content": "hi"}, {"content": "x"}]}\n',
                     "line 1: messages[1] has no 'role'"),
    "empty assistant": (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]}\n'
                        b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}\n',
                        "line 2: messages[1]: empty assistant turn"),
    "over-long sample": (json.dumps({"messages": [{"role": "user", "content": "x" * 400},
                                                  {"role": "assistant", "content": "y"}]}).encode(),
                         "line 1: sample is"),
    "no assistant": (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: no assistant turn"),
    "bad weight": (b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", '
                   b'"weight": 2}]}\n', "messages[1].weight 2 must be 0 or 1"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_training_files_are_refused_with_the_line(server: LiveServer, case: str) -> None:
    data, expected = BAD_FILES[case]
    before = sorted(os.listdir(server.state.store.root / "files"))
    r = httpx.post(server.url + "/v1/files", files={"file": ("d.jsonl", data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 400, r.text
    assert expected in r.json()["error"]["message"] and r.json()["error"]["param"] == "file"
    assert sorted(os.listdir(server.state.store.root / "files")) == before  # nothing half-written
    assert not os.listdir(server.state.store.root / "files" / ".tmp")


def test_bad_job_requests(server: LiveServer) -> None:
    c = client(server)
    good = c.files.create(file=("ok.jsonl", dataset(4)), purpose="fine-tune")
    url = server.url
    base = server.state.base_name
    cases = [
        ({"model": base, "training_file": "file-nope"}, 404, "training_file 'file-nope' does not exist"),
        ({"model": "gpt-4o", "training_file": good.id}, 404, "model 'gpt-4o' is not this server's base model"),
        ({"model": base, "training_file": good.id, "suffix": "bad suffix!"}, 400, "suffix 'bad suffix!'"),
        ({"model": base, "training_file": good.id, "method": {"type": "dpo"}}, 400, "method.type 'dpo'"),
        ({"model": base, "training_file": good.id,
          "hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs 0"),
        ({"model": base, "training_file": good.id, "peft": {"r": 4096}}, 400, "peft.r 4096"),
        ({"model": base, "training_file": good.id, "peft": {"type": "PROMPT_TUNING", "num_virtual_tokens": 0}},
         400, "peft.num_virtual_tokens 0"),
        ({"model": base, "training_file": good.id, "peft": {"type": "PREFIX_TUNING", "r": 8}}, 400,
         "field 'r' does not apply to type PREFIX_TUNING"),
        ({"model": base, "training_file": good.id, "peft": {"type": "IA3"}}, 400, "peft.type 'IA3'"),
    ]
    n_jobs = len(c.fine_tuning.jobs.list(limit=100).data)
    for body, status, msg in cases:
        r = httpx.post(url + "/v1/fine_tuning/jobs", json=body)
        assert r.status_code == status and msg in r.json()["error"]["message"], (body, r.text)
    r = httpx.post(url + "/v1/files", files={"file": ("d.jsonl", dataset(2))}, data={"purpose": "assistants"})
    assert r.status_code == 400 and "purpose 'assistants'" in r.json()["error"]["message"]
    assert len(c.fine_tuning.jobs.list(limit=100).data) == n_jobs  # nothing recorded
    assert httpx.get(url + "/v1/files/file-nope").status_code == 404
    assert httpx.post(url + "/v1/fine_tuning/jobs/ftjob-nope/cancel").status_code == 404


def test_cancel_and_queue(server: LiveServer) -> None:
    """One job runs at a time: a second one waits queued; cancelling it (and the running one) works, and
    a finished job cannot be cancelled."""
    c = client(server)
    f = c.files.create(file=("long.jsonl", dataset()), purpose="fine-tune")
    hp = {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}}
    first = c.fine_tuning.jobs.create(model=server.state.base_name, training_file=f.id, suffix="long", **hp)
    wait_for(lambda: c.fine_tuning.jobs.retrieve(first.id).status == "running", "the first job to run")
    second = c.fine_tuning.jobs.create(model=server.state.base_name, training_file=f.id, **hp)
    wait_for(lambda: c.fine_tuning.jobs.retrieve(second.id).status == "queued", "the second job to queue")
    assert c.fine_tuning.jobs.retrieve(first.id).status == "running"
    assert c.fine_tuning.jobs.cancel(second.id).status == "cancelled"
    c.fine_tuning.jobs.cancel(first.id)
    wait_for(lambda: c.fine_tuning.jobs.retrieve(first.id).status == "cancelled", "the running job to cancel")
    assert c.fine_tuning.jobs.retrieve(first.id).fine_tuned_model is None
    r = httpx.post(server.url + f"/v1/fine_tuning/jobs/{first.id}/cancel")
    assert r.status_code == 409 and "already cancelled" in r.json()["error"]["message"]
    page = c.fine_tuning.jobs.list(limit=1)
    assert page.data[0].id == second.id and page.has_more
    assert c.fine_tuning.jobs.list(after=second.id, limit=1).data[0].id == first.id


def test_serving_continues_while_a_job_runs(server: LiveServer) -> None:
    """8 concurrent base streams keep receiving tokens while a job trains; none fails."""
    c = client(server)
    f = c.files.create(file=("long.jsonl", dataset()), purpose="fine-tune")
    job = c.fine_tuning.jobs.create(model=server.state.base_name, training_file=f.id, suffix="busy",
                                    method={"type": "supervised", "supervised": {"hyperparameters": {
                                        "n_epochs": 50, "batch_size": 1}}})
    ft = server.state.finetune
    wait_for(lambda: ft.trainer is not None and ft.trainer.progress.micro > 0, "training to start")
    micro0 = ft.trainer.progress.micro

    async def stream(i: int) -> int:
        n = 0
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as h:
            async with h.stream("POST", "/v1/completions", json={
                    "prompt": f"stream {i}", "max_tokens": 24, "min_tokens": 24, "temperature": 0,
                    "stream": True}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        assert "error" not in json.loads(line[6:]), line
                        n += 1
        return n

    async def all_streams() -> list[int]:
        return await asyncio.gather(*(stream(i) for i in range(8)))

    counts = asyncio.run(all_streams())
    assert counts == [24] * 8
    trainer = ft.trainer
    assert trainer is not None and trainer.progress.micro > micro0  # training went on meanwhile
    c.fine_tuning.jobs.cancel(job.id)
    wait_for(lambda: c.fine_tuning.jobs.retrieve(job.id).status == "cancelled", "the job to cancel")


def test_job_running_at_shutdown_is_marked_failed(tiny_root: str, tmp_path) -> None:
    base = make_tiny_checkpoint(tiny_root, "llama", seed=5)
    store = tmp_path / "store"
    with live_server(model=base, adapters_dir=str(store), max_model_len=128, kv_cache_blocks=64) as srv:
        c = client(srv)
        f = c.files.create(file=("d.jsonl", dataset()), purpose="fine-tune")
        job = c.fine_tuning.jobs.create(model=srv.state.base_name, training_file=f.id,
                                        method={"type": "supervised", "supervised": {"hyperparameters": {
                                            "n_epochs": 50, "batch_size": 1}}})
        wait_for(lambda: c.fine_tuning.jobs.retrieve(job.id).status == "running", "the job to run")
    with live_server(model=base, adapters_dir=str(store), max_model_len=128, kv_cache_blocks=64) as srv:
        got = client(srv).fine_tuning.jobs.retrieve(job.id)
        assert got.status == "failed" and got.error.code == "server_shutdown", got
        assert client(srv).files.retrieve(f.id).bytes == len(dataset())


def test_cli_create_follow_ls_show_events_cancel(server: LiveServer, tmp_path, capsys) -> None:
    from server.cli import main

    data = tmp_path / "d.jsonl"
    data.write_bytes(dataset(4))
    url = ["--url", server.url]
    assert main(["finetune", "create", "--file", str(data), "--suffix", "cli", "--epochs", "2", "--rank", "4",
                 "--follow", *url]) == 0
    out = capsys.readouterr().out
    job_id = out.split()[0]
    assert job_id.startswith("ftjob-") and "Fine-tuning job started" in out
    assert "[" + "#" * 30 + "] 8/8 loss=" in out  # the progress bar reached its end
    assert out.strip().endswith(f"{job_id} succeeded: ft:{server.state.base_name}:cli:{job_id[-8:]}")
    assert main(["finetune", "ls", *url]) == 0 and job_id in capsys.readouterr().out
    assert main(["finetune", "show", job_id, *url]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "succeeded" and shown["peft"]["r"] == 4 and len(shown["checkpoints"]) == 2
    assert main(["finetune", "events", job_id, *url]) == 0 and "The job has successfully completed" in \
        capsys.readouterr().out
    assert main(["finetune", "cancel", job_id, *url]) == 1
    assert f"HTTP 409: job {job_id} has already succeeded" in capsys.readouterr().err
    missing = tmp_path / "nope.jsonl"
    assert main(["finetune", "create", "--file", str(missing), "--suffix", "x", *url]) == 2
    # --type / --virtual-tokens reach the job's peft object (here refused by the server, naming the field)
    assert main(["finetune", "create", "--file", str(data), "--suffix", "pt", "--type", "PROMPT_TUNING",
                 "--virtual-tokens", "0", *url]) == 1
    assert "peft.num_virtual_tokens 0 must be an integer in [1, " in capsys.readouterr().err
