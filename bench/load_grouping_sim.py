"""Adapter loads under affinity vs default routing, without Ray: the engine's real Scheduler/SlotManager on a
fake runner (one token per chunk that wants logits), 2 replicas, C closed-loop clients (issue 14).

    .venv/bin/python -m bench.load_grouping_sim [--clients 4,16,32,64,128] [--tokens 16] [--requests 2000] \
        [--staged [--no-park]]

Why: on this 2-core machine the Ray bench's HTTP path, not the engine, bounds how deep replica queues get, so
it cannot show what admission does as queues deepen. Here the engine step is the only clock. Routing:
*affinity* sends an adapter to its home replica (the first time an adapter is seen, the replica with fewer
homes; Serve's multiplexing with a cache of 2 x slots behaves so once warm); *default* picks two replicas at
random and sends to the one with fewer requests (Serve's power of two choices). Admission: arrival order
(`group_loads=False`) vs load-aware grouping (the default). The same request sequence for every cell; loads
are `SlotManager.loads` summed over replicas. Prints one JSON line per cell and the ratio affinity / default.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from server.engine.block_manager import BlockAllocator  # noqa: E402
from server.engine.scheduler import Scheduler  # noqa: E402
from server.engine.sequence import SamplingParams, SeqStatus, Sequence  # noqa: E402
from server.engine.slots import SlotManager  # noqa: E402


def simulate(seq: list[int], clients: int, tokens: int, affinity: bool, group: bool, slots: int = 4,
             max_num_seqs: int = 8, replicas: int = 2, seed: int = 0, staged: bool = False,
             park: bool = True) -> dict[str, Any]:
    """`staged`: paged adapters (1 page each, a pool of 8 pages per slot as the tiny model's default) load on
    a loader thread and land one step later, parked ones too (`park`), as in the real engine."""
    rng = random.Random(seed)
    scheds = [Scheduler(BlockAllocator(4096, 16), max_num_seqs=max_num_seqs, max_batch_tokens=2048,
                        slots=SlotManager(slots, num_pages=8 * slots if staged else None), group_loads=group,
                        stage_loads=staged, park=park) for _ in range(replicas)]
    landing: list[list[Any]] = [[] for _ in range(replicas)]
    home: dict[int, int] = {}
    homes = [0] * replicas
    inflight = [0] * replicas
    where: dict[int, int] = {}
    it = iter(enumerate(seq))
    waits: list[int] = []
    steps = 0

    def submit() -> bool:
        nxt = next(it, None)
        if nxt is None:
            return False
        i, a = nxt
        if affinity:
            if a not in home:
                r = min(range(replicas), key=lambda x: (homes[x], rng.random()))
                home[a] = r
                homes[r] += 1
            r = home[a]
        else:
            x, y = rng.sample(range(replicas), 2)
            r = x if inflight[x] <= inflight[y] else y
        q = Sequence(request_id=str(i), prompt_ids=[1, 2, 3, 4], params=SamplingParams(max_tokens=tokens),
                     adapter_pages=1 if staged else 0)
        q.adapter_key = a
        scheds[r].add(q)
        inflight[r] += 1
        where[id(q)] = r
        return True

    for _ in range(clients):
        submit()
    done = 0
    while done < len(seq):
        steps += 1
        for r, sched in enumerate(scheds):
            for kind, x in landing[r]:  # loader-thread loads land between steps
                if kind == "slot":
                    sched.slots.loaded(x)
                else:
                    sched.slots.parked_landed(x)
            out = sched.schedule()
            landing[r] = [("slot", slot) for slot, _ in out.stages] + [("park", q.adapter_key) for q in out.parks]
            for c in out.chunks:
                c.seq.num_computed += c.num_tokens
            for c in out.chunks:
                if c.want_logits:
                    c.seq.output_ids.append(7)
                    if len(c.seq.output_ids) >= tokens:
                        sched.finish(c.seq, "length")
                        assert c.seq.status is SeqStatus.FINISHED
                        inflight[r] -= 1
                        done += 1
                        waits.append(c.seq.admit_step - c.seq.arrival_step)
                        submit()  # the client sends its next request
        assert steps < 100 * len(seq) * tokens
    waits.sort()
    return {"loads": sum(s.slots.loads for s in scheds), "steps": steps,
            "wait_p50": waits[len(waits) // 2], "wait_p99": waits[int(0.99 * (len(waits) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="4,16,32,64,128")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--staged", action="store_true", help="paged adapters on a loader thread (+ parking)")
    ap.add_argument("--no-park", action="store_true", help="--staged without parking")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rng = random.Random(0)
    names = list(range(a.adapters))
    seqs = {"uniform": [rng.choice(names) for _ in range(a.requests)],
            "zipf": rng.choices(names, weights=[1 / (i + 1) ** 1.1 for i in names], k=a.requests)}
    rows = []
    for w, seq in seqs.items():
        for c in (int(x) for x in a.clients.split(",")):
            for group in (False, True):
                kw = {"staged": a.staged, "park": not a.no_park}
                aff = simulate(seq, c, a.tokens, True, group, **kw)
                dflt = simulate(seq, c, a.tokens, False, group, **kw)
                row = {"workload": w, "clients": c, "grouping": group, "affinity": aff, "default": dflt,
                       "ratio": aff["loads"] / dflt["loads"] if dflt["loads"] else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
