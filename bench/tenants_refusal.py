"""What a refused request costs the server: CPU per 429 from a key over its quota, beside cheap routes.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.tenants_refusal --requests 400 --rounds 3

Starts a server (the built-in demo model, or --model), makes a tenant key with requests_per_minute=1 (every
request after its first is refused) and one without limits, and sends the same number of requests of each
kind, one at a time, alternated over --rounds; the server process's CPU time (/proc/<pid>/stat utime+stime)
is read around each batch. A refused request is checked in the middleware before the body is read: it
should cost about what a trivial authenticated GET costs, so a tenant hammering past its quota takes little
from the others (bench/load.py --tenants measures that end to end).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import httpx

from bench.load import start_server

ADMIN = "bench-admin-key"


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint (default: the built-in demo model)")
    ap.add_argument("--requests", type=int, default=400, help="requests per kind per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="PATH")
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
            json.dump({"args": vars(args), "server_cpu_ms_per_request": per}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
