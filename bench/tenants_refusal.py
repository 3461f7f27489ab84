"""What a refused request costs the server: CPU per 429 from a key over its quota, beside cheap routes.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.tenants_refusal --requests 400 --rounds 3

Starts a server (the built-in demo model, or --model), makes a tenant key with requests_per_minute=1 (every
request after its first is refused) and one without limits, and sends the same number of requests of each
kind, one at a time, alternated over --rounds; the server process's CPU time (/proc/<pid>/stat utime+stime)
is read around each batch. A refused request is checked in the middleware before the body is read: it
should cost about what a trivial authenticated GET costs, so a tenant hammering past its quota takes little
from the others (bench/load.py --tenants measures that end to end).

`--spam-seconds S` then asks whether what a hammering neighbour costs is the refusal or any HTTP request:
per round, a victim key's 2 clients run alone, then beside 4 clients sending refused completions, then
beside 4 clients sending GET /health, each spam client pausing 50 ms between requests; the victim's
p50/p99 per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time
from typing import Any

import httpx

from bench.load import _load_in_process, pct, start_server

ADMIN = "bench-admin-key"


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _spam(url: str, method: str, path: str, key: str | None, body: Any, clients: int, seconds: float) -> int:
    sent = 0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 headers={"Authorization": f"Bearer {key}"} if key else {}) as ac:
        async def one() -> None:
            nonlocal sent
            while time.monotonic() < stop:
                await ac.request(method, path, json=body)
                sent += 1
                await asyncio.sleep(0.05)

        await asyncio.gather(*(one() for _ in range(clients)))
    return sent


def _spam_in_process(*a: Any) -> int:
    return asyncio.run(_spam(*a))


def spam_phases(url: str, victim: str, refused: str, model: str, seconds: float, rounds: int) -> dict:
    """The victim's latency alone, beside refused spam, beside /health spam (alternated per round)."""
    phases: dict[str, dict[str, Any]] = {p: {"lat": [], "spam": 0} for p in ("alone", "refused spam", "/health spam")}
    spam = {"refused spam": ("POST", "/v1/completions", refused, {"prompt": "hi", "max_tokens": 1}),
            "/health spam": ("GET", "/health", None, None)}
    ctx = multiprocessing.get_context("spawn")
    for r in range(rounds):
        for phase in phases:
            with ctx.Pool(3) as pool:
                v = pool.apply_async(_load_in_process, (url, [model], 2, seconds, 8, victim, 100_000, r))
                s = [pool.apply_async(_spam_in_process, (url, *spam[phase], 2, seconds)) for _ in range(2)] \
                    if phase in spam else []
                phases[phase]["lat"] += v.get()[0]
                phases[phase]["spam"] += sum(x.get() for x in s)
    out = {p: {"victim_ok": len(d["lat"]), "p50_s": pct(d["lat"], 50), "p99_s": pct(d["lat"], 99),
               "spam_per_s": d["spam"] / (seconds * rounds)} for p, d in phases.items()}
    base = out["alone"]
    print(f"{'victim phase':<16} {'victim 200':>10} {'p50 ms':>8} {'p99 ms':>8} {'p50 / alone':>11} {'spam req/s':>10}")
    for p, d in out.items():
        print(f"{p:<16} {d['victim_ok']:>10} {d['p50_s'] * 1000:>8.0f} {d['p99_s'] * 1000:>8.0f} "
              f"{d['p50_s'] / base['p50_s']:>11.2f} {d['spam_per_s']:>10.1f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: the built-in demo model)")
    ap.add_argument("--requests", type=int, default=400, help="requests per kind per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--spam-seconds", type=float, default=0, help="seconds per phase of the spam comparison (0: none)")
    args = ap.parse_args()
    from server.model.default_model import ensure_demo_model

    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(args.model or ensure_demo_model(), os.path.join(tmp, "store"), ["--admin-key", ADMIN])
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                def key(limits: dict) -> str:
                    r = c.post("/v1/keys", headers={"Authorization": f"Bearer {ADMIN}"},
                               json={"tenant": "bench", "scopes": ["infer"], "limits": limits})
                    r.raise_for_status()
                    return r.json()["key"]

                refused, free = key({"requests_per_minute": 1}), key({})
                body = {"prompt": "hello", "max_tokens": 1}
                kinds = {
                    "GET /health (no key)": ("GET", "/health", None, None, 200),
                    "GET /v1/models, bootstrap admin key": ("GET", "/v1/models", ADMIN, None, 200),
                    "GET /v1/models, tenant key": ("GET", "/v1/models", free, None, 200),
                    "POST /v1/completions, tenant key over its quota (429)": ("POST", "/v1/completions", refused,
                                                                              body, 429),
                }
                for _, (m, path, k, b, _) in kinds.items():  # warm: the scrypt check of each key happens here
                    c.request(m, path, json=b, headers={"Authorization": f"Bearer {k}"} if k else {})
                spent = {name: 0.0 for name in kinds}
                for _ in range(args.rounds):
                    for name, (m, path, k, b, want) in kinds.items():
                        h = {"Authorization": f"Bearer {k}"} if k else {}
                        t0 = cpu_seconds(proc.pid)
                        for _ in range(args.requests):
                            r = c.request(m, path, json=b, headers=h)
                            assert r.status_code == want, (name, r.status_code, r.text)
                        spent[name] += cpu_seconds(proc.pid) - t0
                spammed = None
                if args.spam_seconds:
                    victim = key({})
                    base = c.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}).json()["data"][0]["id"]
                    spammed = spam_phases(url, victim, refused, base, args.spam_seconds, args.rounds)
        finally:
            proc.terminate()
            proc.wait(60)
    n = args.requests * args.rounds
    print(f"loadavg: {open('/proc/loadavg').read().split()[:3]}  {n} requests per kind, {args.rounds} rounds")
    print(f"{'request':<58} {'server CPU ms/request':>22}")
    per = {name: 1000 * s / n for name, s in spent.items()}
    for name, ms in per.items():
        print(f"{name:<58} {ms:>22.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "server_cpu_ms_per_request": per, "spam": spammed}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
