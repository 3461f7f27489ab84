"""Parked loads through HTTP: with a slot cap tighter than adapter memory, adapters' weights are written into
free pages while every slot is busy and activated when a slot frees — and every answer is still PEFT's."""

from __future__ import annotations

import asyncio
import random

from tests.e2e.test_adapter_pages import _settings
from tests.e2e.test_adapter_pages import built as built  # noqa: F401 - the module fixture, shared
from tests.e2e.test_lora_serving import fire
from tests.server_utils import live_server


def test_parked_adapters_activate_token_exact(built):  # noqa: F811
    base, adapters, prompts, ref = built
    rng = random.Random(5)
    names = [None, "qv-r4", "all-r8", "mlp-r16", "rslora-r32"]  # 8 pages of the 12: room to park beside 2 slots
    for n in names[1:]:  # each adapter changes the output of some prompt (else matching proves nothing)
        assert any(ref[(n, i)][0] != ref[(None, i)][0] for i in range(len(prompts))), n
    jobs = [(names[k % len(names)], prompts[k % len(prompts)]) for k in range(30)]
    rng.shuffle(jobs)
    with live_server(**_settings(base, adapters, max_adapters=2)) as srv:
        resps = asyncio.run(fire(srv.url, jobs))
        sm = srv.state.engine.slots
        assert sm.activations > 0  # some adapter went from parked pages to a slot without a second write
        assert sm.loads > 2  # and the 2 slots really were short
        sm.check()
    for (name, p), r in zip(jobs, resps, strict=True):
        assert r.status_code == 200, r.text
        want, _ = ref[(name, prompts.index(p))]
        assert r.json()["choices"][0]["token_ids"] == want, name
