"""Ops-test fixtures: one tiny checkpoint and one LoRA adapter per session; helpers to read /metrics."""

from __future__ import annotations

import os
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import waits
from tests.tiny import make_tiny_checkpoint

# Small and fast: a 64-block KV cache of 16-token blocks, short contexts.
SERVER = dict(max_model_len=256, kv_cache_blocks=64)


@pytest.fixture(scope="session")
def tiny_model(tiny_root: str) -> str:
    return make_tiny_checkpoint(tiny_root)


@pytest.fixture(scope="session")
def lora_dir(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from tests.adapters import make_lora

    return make_lora(tiny_model, os.path.join(str(tmp_path_factory.mktemp("ops-lora")), "qv-r4"), r=4,
                     targets=["q_proj", "v_proj"], seed=3)


def scrape(client: httpx.Client, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset], float]:
    """/metrics as {(sample name, frozenset(labels.items())): value}."""
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: dict[tuple[str, frozenset], float], name: str) -> list[dict[str, str]]:
    """The label sets of every sample called `name`."""
    return [dict(labels) for (n, labels) in samples if n == name]


def wait_for(cond: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """tests.waits.wait_for with this module's argument order (kept for its callers)."""
    waits.wait_for(cond, what, timeout)
