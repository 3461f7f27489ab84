"""Per-request adapter composition over HTTP (issue 15): every method serves peft's tokens in a mixed batch.

One server for the file. References: `PeftModel.add_weighted_adapter` with the same arguments (seeded with
`torch.manual_seed(seed)` right before the call), a float64 dense sum for `cat`, peft with its scaling
multiplied for `lora_scale`.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tests.adapters import greedy, load_base, make_dora, make_lora, make_prompt_learning
from tests.server_utils import live_server
from tests.tiny import make_tiny_checkpoint
from tests.waits import hold_first_step_until

N = 8
PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 11, 64, 128, 9, 33, 71, 2, 150]]
SEED = 7
W = [0.7, 1.3]
METHODS = {  # name -> (method, weights, merge options)
    "cat": ("cat", W, {}),
    "linear": ("linear", [1.0, -0.5], {}),
    "ties": ("ties", W, {"density": 0.5}),
    "ties-freq": ("ties", [1.0, 1.0], {"density": 0.3, "majority_sign_method": "frequency"}),
    "dare_linear": ("dare_linear", W, {"density": 0.6}),
    "dare_ties": ("dare_ties", W, {"density": 0.6}),
    "magnitude_prune": ("magnitude_prune", W, {"density": 0.4}),
    "svd": ("svd", W, {"rank": 6}),
    "ties_svd": ("ties_svd", W, {"density": 0.5}),
    "dare_linear_svd": ("dare_linear_svd", W, {"density": 0.6, "rank": 4}),
    "dare_ties_svd": ("dare_ties_svd", W, {"density": 0.6}),
    "magnitude_prune_svd": ("magnitude_prune_svd", W, {"density": 0.4, "svd_clamp": 0.9}),
}
FILES = ("adapter_config.json", "adapter_model.safetensors")


def _peft_kwargs(opts: dict) -> dict:
    return {{"rank": "svd_rank"}.get(k, k): v for k, v in opts.items() if k != "seed"}


@pytest.fixture(scope="module")
def world(tiny_root, tmp_path_factory):
    base = make_tiny_checkpoint(tiny_root, "llama", seed=3)
    d = {
        "s1": make_lora(base, os.path.join(tiny_root, "compose-s1"), r=8,
                        targets=["q_proj", "v_proj", "o_proj", "down_proj"], seed=31),
        "s2": make_lora(base, os.path.join(tiny_root, "compose-s2"), r=8,
                        targets=["q_proj", "k_proj", "gate_proj", "up_proj"], seed=32, use_rslora=True),
        "s3": make_lora(base, os.path.join(tiny_root, "compose-s3"), r=4, targets=["v_proj", "down_proj"], seed=33),
        "big": make_lora(base, os.path.join(tiny_root, "compose-big"), r=32, targets=["q_proj", "v_proj"], seed=34),
        "d8": make_lora(base, os.path.join(tiny_root, "compose-d8"), r=8,
                        targets=["q_proj", "v_proj", "o_proj", "down_proj"], seed=35),
        "pfx": make_prompt_learning(base, os.path.join(tiny_root, "compose-pfx"), "prefix", seed=36),
        "dora": make_dora(base, os.path.join(tiny_root, "compose-dora"), r=8, targets=["q_proj", "v_proj"], seed=37),
    }
    ref = _references(base, d)
    store = str(tmp_path_factory.mktemp("compose-store"))
    served = [f"{n}={d[n]}" for n in ("s1", "s2", "s3", "big", "pfx", "dora")]
    with live_server(model=base, adapter=served, adapters_dir=store, max_rank=32, max_adapters=24, max_num_seqs=48,
                     max_model_len=128, kv_cache_blocks=512, block_size=8) as srv:
        yield srv, d, ref


def _references(base: str, d: dict[str, str]) -> dict:
    """Greedy tokens per (what, prompt index), every reference built once."""
    ref: dict = {}
    model = PeftModel.from_pretrained(load_base(base), d["s1"], adapter_name="s1").eval()
    model.load_adapter(d["s2"], adapter_name="s2")
    model.load_adapter(d["d8"], adapter_name="d8")
    with model.disable_adapter():
        ref["base"] = [greedy(model, p, N) for p in PROMPTS]
    for name in ("s1", "s2"):
        model.set_adapter(name)
        ref[name] = [greedy(model, p, N) for p in PROMPTS]
    for name, (method, weights, opts) in METHODS.items():
        torch.manual_seed(SEED)
        model.add_weighted_adapter(["s1", "s2"], weights, f"m-{name}", combination_type=method, **_peft_kwargs(opts))
        model.set_adapter(f"m-{name}")
        ref[name] = [greedy(model, p, N) for p in PROMPTS]
    model.add_weighted_adapter(["d8", "s2"], W, "m-cat-d8", combination_type="cat")
    model.set_adapter("m-cat-d8")
    ref["cat-d8"] = [greedy(model, p, N) for p in PROMPTS]
    for src, scale in (("s1", 2.0), ("s1", 0.5), ("dora", 1.0), ("dora", 2.0)):  # peft, every scaling multiplied
        scaled = PeftModel.from_pretrained(load_base(base), d[src]).eval()
        for mod in scaled.modules():
            if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
                mod.scaling["default"] *= scale
        ref[f"scale-{scale}" if src == "s1" else f"{src}-{scale}"] = [greedy(scaled, p, N) for p in PROMPTS]
    ref["cat-f64"] = _float64_cat(base, [d["s1"], d["s2"]], W)
    return ref


def _float64_cat(base: str, dirs: list[str], weights: list[float]) -> list[list[int]]:
    """cat's meaning, computed independently: W + sum_i w_i c_i B_i A_i merged into a float64 model."""
    model = load_base(base).double()
    mods = dict(model.named_modules())
    for path, w in zip(dirs, weights, strict=True):
        cfg = json.load(open(os.path.join(path, "adapter_config.json")))
        r = cfg["r"]
        c = cfg["lora_alpha"] / (r ** 0.5 if cfg.get("use_rslora") else r)
        t = load_file(os.path.join(path, "adapter_model.safetensors"))
        for key, a in t.items():
            if ".lora_A." not in key:
                continue
            b = t[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            with torch.no_grad():
                mods[name].weight += w * c * (b.double() @ a.double())
    return [greedy(model, p, N) for p in PROMPTS]


def _body(p: list[int], **extra) -> dict:
    return {"prompt": p, "max_tokens": N, "min_tokens": N, "temperature": 0, "return_token_ids": True, **extra}


def _compose(method: str, weights: list[float], opts: dict, names=("s1", "s2")) -> dict:
    return {"adapters": [{"name": n, "weight": w} for n, w in zip(names, weights, strict=True)],
            "merge": {"method": method, **opts, "seed": SEED}}


async def _fire(url: str, bodies: list[dict]) -> list:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))


def test_every_method_serves_peft_tokens_in_a_mixed_batch(world):
    srv, _, ref = world
    for name in METHODS:  # each composition changes the output: it differs from each source and the base
        for src in ("s1", "s2", "base"):
            assert ref[name] != ref[src], (name, src)
    assert ref["cat-f64"] != ref["s1"] and ref["cat-f64"] != ref["s2"]
    assert ref["scale-2.0"] != ref["s1"] and ref["scale-0.5"] != ref["s1"] and ref["dora-2.0"] != ref["dora-1.0"]
    jobs: list[tuple[str, int, dict]] = []
    for i, p in enumerate(PROMPTS):
        for name, (method, weights, opts) in METHODS.items():
            jobs.append((name, i, _body(p, **_compose(method, weights, opts))))
        jobs += [("s1", i, _body(p, model="s1")), ("s2", i, _body(p, model="s2")), ("base", i, _body(p)),
                 ("scale-2.0", i, _body(p, model="s1", lora_scale=2.0)),
                 ("scale-0.5", i, _body(p, model="s1", lora_scale=0.5)),
                 ("base", i, _body(p, model="s1", lora_scale=0.0)),
                 ("dora-2.0", i, _body(p, model="dora", lora_scale=2.0)), ("dora-1.0", i, _body(p, model="dora")),
                 ("cat-f64", i, _body(p, adapters=[{"name": "s1", "weight": W[0]}, {"name": "s2", "weight": W[1]}]))]
    eng = srv.state.engine
    hold_first_step_until(eng, lambda: eng.in_flight == len(jobs), f"all {len(jobs)} requests in the engine")
    before = srv.state.composer.computed
    resps = asyncio.run(_fire(srv.url, [b for _, _, b in jobs]))
    for (name, i, _), r in zip(jobs, resps, strict=True):
        assert r.status_code == 200, (name, r.text)
        assert r.json()["choices"][0]["token_ids"] == ref[name][i], (name, i)
    # 12 methods + 3 lora_scale values on s1 + 1 on dora; "cat-f64" is the same composition as "cat"
    assert srv.state.composer.computed - before == len(METHODS) + 4


def test_cache_hits_single_flight_listing_and_metrics(world):
    srv, _, ref = world
    comp = _compose("ties", [0.9, 0.4], {"density": 0.7})
    c0, h0 = srv.state.composer.computed, srv.state.composer.hits
    resps = asyncio.run(_fire(srv.url, [_body(PROMPTS[0], **comp) for _ in range(4)]))
    assert all(r.status_code == 200 for r in resps)
    assert len({tuple(r.json()["choices"][0]["token_ids"]) for r in resps}) == 1
    assert srv.state.composer.computed == c0 + 1  # four concurrent requests, one computation
    assert srv.state.composer.hits == h0 + 3
    with srv.client() as c:
        listed = [a for a in c.get("/v1/adapters").json()["data"] if a.get("derived")]
        mine = [a for a in listed if a["derived"]["method"] == "ties"
                and a["derived"]["merge"]["density"] == 0.7]
        assert len(mine) == 1 and mine[0]["type"] == "lora" and mine[0]["residency"] in ("cpu", "device")
        assert [(s["name"], s["weight"]) for s in mine[0]["derived"]["sources"]] == [("s1", 0.9), ("s2", 0.4)]
        assert all(not m["id"].startswith("compose:") for m in c.get("/v1/models").json()["data"])
        text = c.get("/metrics").text
    assert f"peftserve_compositions_computed_total {float(srv.state.composer.computed)}" in text
    assert f"peftserve_composition_cache_hits_total {float(srv.state.composer.hits)}" in text


def test_a_replaced_source_never_serves_a_stale_merge(world):
    srv, d, ref = world
    with srv.client() as c:
        for name, src in (("u1", "s1"), ("u2", "s2")):
            files = [("files", (f, open(os.path.join(d[src], f), "rb").read())) for f in FILES]
            assert c.post("/v1/adapters", data={"name": name}, files=files).status_code == 201, name
        body = _body(PROMPTS[0], adapters=[{"name": "u1", "weight": W[0]}, {"name": "u2", "weight": W[1]}])
        r1 = c.post("/v1/completions", json=body)
        assert r1.json()["choices"][0]["token_ids"] == ref["cat"][0]
        old = [a["name"] for a in c.get("/v1/adapters").json()["data"]
               if a.get("derived") and a["derived"]["sources"][0]["name"] == "u1"]
        assert len(old) == 1
        files = [("files", (f, open(os.path.join(d["d8"], f), "rb").read())) for f in FILES]
        assert c.put("/v1/adapters/u1", files=files).status_code == 200
        assert ref["cat-d8"][0] != ref["cat"][0]
        computed = srv.state.composer.computed
        r2 = c.post("/v1/completions", json=body)
        assert r2.json()["choices"][0]["token_ids"] == ref["cat-d8"][0]  # the new version's merge
        assert srv.state.composer.computed == computed + 1
        ids = [a["name"] for a in c.get("/v1/adapters").json()["data"] if a.get("derived")]
        assert old[0] not in ids  # the stale merge left the catalogue with its source version
        new = [a for a in c.get("/v1/adapters").json()["data"]
               if a.get("derived") and a["derived"]["sources"][0]["name"] == "u1"]
        assert [s["version"] for s in new[0]["derived"]["sources"]] == [2, 1]
        for name in ("u1", "u2"):
            assert c.delete(f"/v1/adapters/{name}").status_code == 204
        assert not [a for a in c.get("/v1/adapters").json()["data"]
                    if a.get("derived") and a["derived"]["sources"][0]["name"] == "u1"]


def _items(*pairs):
    return [{"name": n, "weight": w} for n, w in pairs]


BAD = [  # (body fields, status, param[, what the message must say])
    ({"adapters": _items(("s1", 1.0), ("nope", 1.0))}, 404, "adapters[1].name"),
    ({"adapters": _items(("s1", 1.0), ("pfx", 1.0)), "merge": {"method": "ties", "density": 0.5}}, 422,
     "adapters[1].name"),
    ({"adapters": _items(("big", 1.0), ("s1", 1.0))}, 400, "adapters", "--max-rank 32"),  # cat rank 40
    ({"adapters": _items(*[("s3", 0.2)] * 5)}, 400, "adapters", "--max-compose"),  # rank 20 fits: 5 > 4
    ({"adapters": _items(("s1", 1.0), ("s2", 1.0)), "merge": {"method": "svd", "rank": 33}}, 400, "merge.rank"),
    ({"adapters": _items(("s1", 1.0), ("s2", 1.0)), "merge": {"method": "ties"}}, 400, "merge.density"),
    ({"adapters": _items(("s1", 1.0), ("s2", 1.0)), "merge": {"method": "dare_ties", "density": 0.5}}, 400,
     "merge.seed"),
    ({"adapters": _items(("s1", 1.0), ("s3", 1.0)), "merge": {"method": "linear"}}, 422, "adapters"),
    ({"adapters": _items(("s1", 1.0), ("s2", 1.0)), "merge": {"method": "mean"}}, 400, "merge.method"),
    ({"adapters": _items(("s1", 1.0)), "merge": {"method": "cat", "densty": 0.5}}, 400, "merge.densty"),
    ({"adapters": []}, 400, "adapters"),
    ({"lora_scale": 2.0}, 400, "model"),
    ({"model": "pfx", "lora_scale": 2.0}, 400, "lora_scale"),
    ({"model": "s1", "adapters": _items(("s2", 1.0))}, 400, "model"),
    ({"model": "s1", "lora_scale": 2.0, "adapters": _items(("s2", 1.0))}, 400, "lora_scale"),
    ({"merge": {"method": "cat"}}, 400, "merge"),
]


def test_bad_compositions_are_refused_naming_the_field(world):
    srv, _, _ = world
    with srv.client() as c:
        for fields, status, param, *says in BAD:
            r = c.post("/v1/completions", json=_body(PROMPTS[0], **fields))
            assert (r.status_code, r.json()["error"]["param"]) == (status, param), (fields, r.text)
            assert all(x in r.json()["error"]["message"] for x in says), (fields, r.text)
        for raw in ("NaN", "Infinity", "-Infinity", "1e999"):  # json.loads accepts these: still refused
            body = json.dumps(_body(PROMPTS[0], adapters=_items(("s1", 1.0), ("s2", 2.0))))
            body = body.replace('"weight": 2.0', f'"weight": {raw}')
            r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert (r.status_code, r.json()["error"]["param"]) == (400, "adapters.1.weight"), (raw, r.text)
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                 "adapters": _items(("s1", 1.0), ("nope", 1.0))})
        assert (r.status_code, r.json()["error"]["param"]) == (404, "adapters[1].name")
    assert srv.state.engine.num_requests == 0
