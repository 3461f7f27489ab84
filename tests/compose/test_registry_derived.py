"""Derived adapters in the registry: CPU tier only, evicted like any adapter, gone with a replaced source."""

from __future__ import annotations

from server.engine.registry import AdapterRegistry
from server.families import LORA, Adapter
from server.families.base import AdapterSpec


def _adapter() -> Adapter:
    return Adapter(family=LORA, spec=AdapterSpec(peft_type="LORA", base_model_name_or_path=None))


def test_derived_entries_follow_their_sources_and_the_cpu_lru():
    reg = AdapterRegistry(max_cpu=3)
    stale: list = []
    reg.on_stale = stale.append
    a, b = reg.put("a", _adapter()), reg.put("b", _adapter())
    d1 = reg.put_derived("compose:1", _adapter(), (a.key, b.key), {"method": "cat"})
    assert "compose:1" in reg and reg.in_cpu(d1.key)
    assert reg.names() == ["a", "b"] and reg.derived_names() == ["compose:1"]
    reg.release(d1)
    assert d1.key not in stale  # still catalogued: cached for the next request

    # the CPU LRU (3) holds a, b, compose:1; a fourth entry evicts the oldest, a: a source stays catalogued
    # (its files are on disk); a derived one evicted next leaves the catalogue, and the engine is told
    reg.put("c", _adapter())
    assert "a" in reg and not reg.in_cpu(a.key)
    reg.put("e", _adapter())
    assert not reg.in_cpu(b.key)
    reg.put("f", _adapter())
    assert "compose:1" not in reg and d1.key in stale

    # a source replaced: its derived entries leave the catalogue, in-flight users keep their tensors
    reg2 = AdapterRegistry(max_cpu=8)
    x, y = reg2.put("x", _adapter()), reg2.put("y", _adapter())
    d2 = reg2.put_derived("compose:2", _adapter(), (x.key, y.key), {"method": "cat"})
    reg2.put("x", _adapter(), version=2)
    assert "compose:2" not in reg2 and d2.adapter is not None
    reg2.release(d2)
    assert not reg2.in_cpu(d2.key)

    # computed from a version replaced meanwhile: served to its request, never catalogued
    d3 = reg2.put_derived("compose:3", _adapter(), (x.key, y.key), {"method": "cat"})
    assert d3.held and "compose:3" not in reg2
    reg2.release(d3)
    assert reg2.in_flight("compose:3") == 0
