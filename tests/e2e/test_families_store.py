"""IA3, DoRA and AdapterHub bottleneck adapters through the store, the REST API, the CLI, /v1/models and metrics.

Uploads as files, as an archive and with `peftserve adapters push`; listings carry each family's type; a replace
serves the new version; a delete answers 404; bad uploads of the new formats are refused with the field named
and leave the store unchanged. Served tokens are compared with the references (peft; the adapters library's
fixtures) so an upload that loaded the wrong thing cannot pass.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile

import httpx
import pytest

from tests.adapters import greedy_recompute, make_dora, make_ia3, peft_model
from tests.e2e.test_adapter_store_api import multipart, snapshot, upload
from tests.families.bottleneck_fixtures import adapter_dir, base_copy, expected
from tests.server_utils import live_server

EXP = expected()["archs"]["llama"]
N = EXP["n_tokens"]


def _files(d: str) -> dict[str, bytes]:
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def _tar(files: dict[str, bytes], folder: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for n, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{n}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tokens(c: httpx.Client, model: str, i: int) -> list[int]:
    r = c.post("/v1/completions", json={"model": model, "prompt": EXP["prompts"][i], "max_tokens": N, "min_tokens": N,
                                        "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _metric(text: str, name: str, adapter: str) -> float:
    m = re.search(rf'^{name}\{{adapter="{re.escape(adapter)}"\}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def setup(tiny_root: str) -> dict[str, str]:
    base = base_copy(tiny_root, "llama")
    return {"base": base, "ia3": make_ia3(base, os.path.join(tiny_root, "store-ia3"), seed=21),
            "dora": make_dora(base, os.path.join(tiny_root, "store-dora"), r=8, targets=["q_proj", "o_proj", "up_proj"],
                              seed=22)}


def test_new_families_upload_list_replace_delete(setup: dict[str, str], tmp_path) -> None:
    base = setup["base"]
    ref = {k: [greedy_recompute(peft_model(base, setup[k]), p, N, eos=EXP["eos_token_id"]) for p in EXP["prompts"]]
           for k in ("ia3", "dora")}
    with live_server(model=base, adapters_dir=str(tmp_path / "s"), max_model_len=128, kv_cache_blocks=128,
                     max_adapters=4) as srv, srv.client() as c:
        assert upload(c, "my-ia3", _files(setup["ia3"])).status_code == 201
        r = upload(c, "my-dora", _files(setup["dora"]))
        assert r.status_code == 201 and r.json()["type"] == "dora" and r.json()["rank"] == 8
        bn_files = _files(adapter_dir("llama", "seqbn-r16"))  # with head_config.json + model_head.safetensors
        assert {"head_config.json", "model_head.safetensors", "adapter.safetensors"} <= set(bn_files)
        r = upload(c, "my-bn", bn_files)
        assert r.status_code == 201, r.text
        assert r.json()["type"] == "bottleneck" and r.json()["peft_type"] == "BOTTLENECK" and r.json()["rank"] == 4
        archive = {"dseqbn.tar.gz": _tar(_files(adapter_dir("llama", "dseqbn-r8")), "dseqbn-r8")}
        assert upload(c, "my-dseqbn", archive, field="archive").status_code == 201
        cli = subprocess.run([sys.executable, "-m", "server", "adapters", "push", adapter_dir("llama", "parbn-r2"),
                              "--name", "my-parbn", "--url", srv.url], capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0 and "my-parbn v1 BOTTLENECK rank=32" in cli.stdout, cli.stderr

        listed = {a["name"]: a for a in c.get("/v1/adapters").json()["data"]}
        assert {n: a["type"] for n, a in listed.items()} == {
            "my-ia3": "ia3", "my-dora": "dora", "my-bn": "bottleneck", "my-dseqbn": "bottleneck",
            "my-parbn": "bottleneck"}
        assert listed["my-dseqbn"]["target_modules"] == ["attn", "mlp"] and listed["my-bn"]["target_modules"] == ["mlp"]
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["my-parbn"]["adapter_type"] == "bottleneck" and models["my-ia3"]["adapter_type"] == "ia3"

        before = c.get("/metrics").text
        for i in range(2):
            assert _tokens(c, "my-ia3", i) == ref["ia3"][i]
            assert _tokens(c, "my-dora", i) == ref["dora"][i]
            assert _tokens(c, "my-bn", i) == EXP["seqbn-r16"][i][0]
            assert _tokens(c, "my-dseqbn", i) == EXP["dseqbn-r8"][i][0]
            assert _tokens(c, "my-parbn", i) == EXP["parbn-r2"][i][0]
        after = c.get("/metrics").text
        for name in ("my-ia3", "my-dora", "my-bn"):
            gained = (_metric(after, "peftserve_generation_tokens_total", name)
                      - _metric(before, "peftserve_generation_tokens_total", name))
            assert gained == 2 * N, name

        # replace: a SeqBn with another config (different width, leave_out, gelu): the new version serves
        r = upload(c, "my-bn", _files(adapter_dir("llama", "seqbn-r4-leave0-gelu")), method="PUT")
        assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["rank"] == 16
        assert _tokens(c, "my-bn", 0) == EXP["seqbn-r4-leave0-gelu"][0][0] != EXP["seqbn-r16"][0][0]
        assert c.delete("/v1/adapters/my-bn").status_code == 204
        assert c.post("/v1/completions", json={"model": "my-bn", "prompt": [1, 2], "max_tokens": 2}).status_code == 404
        assert "my-bn" not in {a["name"] for a in c.get("/v1/adapters").json()["data"]}


BAD = {
    # case: (files builder from the SeqBn fixture, HTTP status, message fragment)
    "pickled": (lambda f: {"adapter_config.json": f["adapter_config.json"], "pytorch_adapter.bin": b"\x80\x04K."},
                422, "use_safetensors=True"),
    "phm": (lambda f: {**f, "adapter_config.json": f["adapter_config.json"].replace(b'"phm_layer": false',
                                                                                   b'"phm_layer": true')},
            422, "config.phm_layer"),
    "gating": (lambda f: {**f, "adapter_config.json": f["adapter_config.json"].replace(b'"use_gating": false',
                                                                                      b'"use_gating": true')},
               422, "config.use_gating"),
    "head": (lambda f: {**f, "head_config.json": b'{"config": {"head_type": "tagging"}, "model_class": "X"}'},
             422, "head_config.json config"),
    "no-weights": (lambda f: {"adapter_config.json": f["adapter_config.json"]}, 400, "adapter_model.safetensors"),
}


def test_bad_new_family_uploads_refused(setup: dict[str, str], tmp_path) -> None:
    store = str(tmp_path / "s")
    f = _files(adapter_dir("llama", "seqbn-r16"))
    with live_server(model=setup["base"], adapters_dir=store, max_model_len=128, kv_cache_blocks=64) as srv, \
            srv.client() as c:
        assert upload(c, "good", f).status_code == 201
        before = snapshot(store)
        for case, (build, status, fragment) in BAD.items():
            r = c.post("/v1/adapters", data={"name": f"bad-{case}"}, files=multipart(build(f)))
            assert r.status_code == status, (case, r.text)
            assert fragment in r.json()["error"]["message"], (case, r.text)
            assert snapshot(store) == before, case
