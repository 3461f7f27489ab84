"""The compute share: after a micro-step of d seconds, training yields d * (1 - s) / s while requests wait."""

from __future__ import annotations

import threading

import pytest

from server.train.trainer import ShareGovernor


class _Engine:
    def __init__(self, waiting: int) -> None:
        self.num_requests = waiting


@pytest.mark.parametrize("share, owed", [(0.5, 0.02), (0.25, 0.06), (1.0, 0.0)])
def test_yields_its_share_while_requests_wait(share: float, owed: float) -> None:
    g = ShareGovernor(_Engine(3), share, threading.Event())
    g.after(0.02)
    assert g.waited >= owed - 1e-9 and (owed > 0 or g.waited == 0)


def test_an_idle_engine_or_a_stop_is_not_waited_for() -> None:
    g = ShareGovernor(_Engine(0), 0.25, threading.Event())
    g.after(10.0)
    assert g.waited == 0
    stop = threading.Event()
    stop.set()
    g = ShareGovernor(_Engine(5), 0.25, stop)
    g.after(10.0)
    assert g.waited == 0
