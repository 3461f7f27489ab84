"""Load test: N clients on loopback for T seconds over a random mix of adapters; stops by itself.

    .venv/bin/python -m bench.load --clients 8 --seconds 20 --adapters 4

Without --url it starts its own server (the built-in demo model, or --model) on a free loopback
port, uploads LoRA, prefix-tuning and prompt-tuning adapters made with `peft`, runs the load, and
stops the server. It prints throughput, latency percentiles, error counts by status, and the KV
cache / adapter state (from /metrics) before and after.

Tenants (issue 21): `--tenants "alpha:rpm=30,bravo:tpm=2000,charlie"` gives each tenant its own key (with
those quotas; `conc=N` and `storage=N` too) and `--clients` clients of its own, in a process of its own. The
last tenant runs alone (the paired baseline), then all tenants at once, then all at once on twin keys without
quotas, alternated --rounds times; it prints requests, 200s, 429s and p50/p99 per tenant, and the last
tenant's p50/p99 over alone, with and without the others' quotas. Refused
clients pause 50 ms and send again (they do not wait for Retry-After: the adversarial case).

    .venv/bin/python -m bench.load --tenants "alpha:rpm=20,bravo:tpm=600,charlie" --clients 2 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter

import httpx

STATE_METRICS = ("peftserve_kv_blocks_used", "peftserve_kv_blocks_total", "peftserve_adapter_slots_in_use",
                 "peftserve_num_requests_running", "peftserve_num_requests_waiting", "peftserve_adapters_resident")


def scrape(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(peftserve_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$", line)
        if m and m.group(1) in STATE_METRICS:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def make_adapters(model_dir: str, out: str, k: int) -> dict[str, str]:
    """k adapters cycling LoRA / prefix / prompt tuning, random weights (so they change the output)."""
    import torch
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = {}
    for i in range(k):
        kind = ("lora", "prefix", "prompt")[i % 3]
        cfg = {"lora": LoraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
               "prefix": PrefixTuningConfig(num_virtual_tokens=8),
               "prompt": PromptTuningConfig(num_virtual_tokens=8)}[kind]
        cfg.task_type = "CAUSAL_LM"
        torch.manual_seed(i)
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), cfg)
        d = os.path.join(out, f"{kind}-{i}")
        m.save_pretrained(d)
        dirs[f"{kind}-{i}"] = d
    return dirs


def start_server(model: str | None, adapters_dir: str, extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server", "serve", "--port", str(port), "--adapters-dir", adapters_dir,
           "--max-model-len", "512", "--log-level", "warning"] + (["--model", model] if model else []) + (extra or [])
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready in 300 s")


async def run_load(url: str, models: list[str], clients: int, seconds: float, max_tokens: int, key: str | None,
                   max_requests: int, seed: int) -> tuple[list[float], Counter, int, float]:
    rng = random.Random(seed)
    latencies: list[float] = []
    statuses: Counter = Counter()
    tokens = 0
    sent = 0
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    stop_at = time.monotonic() + seconds

    async def client(ac: httpx.AsyncClient) -> None:
        nonlocal tokens, sent
        while time.monotonic() < stop_at and sent < max_requests:
            sent += 1
            model = rng.choice(models)
            body = {"model": model, "prompt": [rng.randrange(256) for _ in range(rng.randint(4, 64))],
                    "max_tokens": rng.randint(1, max_tokens), "temperature": 0.7, "seed": rng.randrange(1 << 30)}
            t0 = time.monotonic()
            try:
                r = await ac.post("/v1/completions", json=body)
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    tokens += r.json()["usage"]["completion_tokens"]
                    latencies.append(time.monotonic() - t0)
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1
                continue
            if r.status_code == 429:
                await asyncio.sleep(0.05)

    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as ac:
        await asyncio.gather(*(client(ac) for _ in range(clients)))
    return latencies, statuses, tokens, time.monotonic() - t0


def _load_in_process(*a: object) -> tuple:
    return asyncio.run(run_load(*a))  # type: ignore[arg-type]


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


LIMIT_KEYS = {"rpm": "requests_per_minute", "tpm": "tokens_per_minute", "conc": "concurrent_requests",
              "storage": "storage_bytes"}
TENANT_ADMIN = "bench-admin-key"


def parse_tenants(spec: str) -> list[tuple[str, dict[str, int]]]:
    """"alpha:rpm=30:tpm=900,bravo" -> [("alpha", {"requests_per_minute": 30, ...}), ("bravo", {})]."""
    out = []
    for item in spec.split(","):
        name, *limits = item.strip().split(":")
        lim = {}
        for x in limits:
            k, _, v = x.partition("=")
            if k not in LIMIT_KEYS or not v.isdigit():
                raise SystemExit(f"--tenants {spec!r}: {x!r} is not one of {', '.join(f'{k}=N' for k in LIMIT_KEYS)}")
            lim[LIMIT_KEYS[k]] = int(v)
        out.append((name, lim))
    return out


def run_tenants(url: str, admin_key: str, tenants: list[tuple[str, dict[str, int]]], args: argparse.Namespace) -> dict:
    """Keys per tenant; per round: the last tenant alone (baseline), every tenant at once with its quotas, and
    every tenant at once on a twin key without quotas (the counterfactual); figures per tenant."""
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {admin_key}"}) as c:
        keys, free = {}, {}
        for name, lim in tenants:
            for into, limits in ((keys, lim), (free, {})):
                r = c.post("/v1/keys", json={"tenant": name, "scopes": ["infer"], "adapters": ["*"], "limits": limits})
                r.raise_for_status()
                into[name] = r.json()["key"]
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]

    def load_all(names: list[str], keys: dict[str, str] = keys) -> list[tuple]:
        """Each tenant's clients in a process of their own: one tenant's refused requests must not queue on the
        event loop that times another tenant's requests."""
        jobs = [(url, models, args.clients, args.seconds, args.max_tokens, keys[n], args.max_requests, args.seed + i)
                for i, n in enumerate(names)]
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            return pool.starmap(_load_in_process, jobs)

    def row(res: tuple) -> dict:
        lat, st, tok, dt = res
        return {"requests": sum(st.values()), "ok": st.get(200, 0), "refused_429": st.get(429, 0),
                "other": sum(v for k, v in st.items() if k not in (200, 429)), "p50_s": pct(lat, 50),
                "p99_s": pct(lat, 99), "generated_tok_per_s": tok / dt}

    def pool(parts: list[tuple]) -> tuple:
        lat = [x for p in parts for x in p[0]]
        st: Counter = sum((p[1] for p in parts), Counter())
        return lat, st, sum(p[2] for p in parts), sum(p[3] for p in parts)

    last, names = tenants[-1][0], [n for n, _ in tenants]
    alone_parts: list[tuple] = []
    together_parts: list[list[tuple]] = []
    unlimited_parts: list[list[tuple]] = []
    for _ in range(args.rounds):  # alternated, so a change of the machine's load hits every phase alike
        alone_parts.append(load_all([last])[0])
        together_parts.append(load_all(names))
        unlimited_parts.append(load_all(names, free))
    alone = row(pool(alone_parts))
    rows = {n: row(pool([p[i] for p in together_parts])) for i, n in enumerate(names)}
    unlimited = {n: row(pool([p[i] for p in unlimited_parts])) for i, n in enumerate(names)}
    print(f"loadavg: {open('/proc/loadavg').read().split()[:3]}  clients per tenant: {args.clients}, "
          f"{args.rounds} rounds of {args.seconds:g} s alone / together / together without quotas, "
          f"max_tokens <= {args.max_tokens}")
    print(f"{'tenant':<10} {'limits':<34} {'requests':>8} {'200':>5} {'429':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for n, lim in tenants:
        r = rows[n]
        lims = ",".join(f"{k}={v}" for k, v in lim.items()) or "none"
        print(f"{n:<10} {lims:<34} {r['requests']:>8} {r['ok']:>5} {r['refused_429']:>6} {r['p50_s'] * 1000:>8.0f} "
              f"{r['p99_s'] * 1000:>8.0f}")
    print(f"{last + ' alone':<10} {'(paired baseline)':<34} {alone['requests']:>8} {alone['ok']:>5} "
          f"{alone['refused_429']:>6} {alone['p50_s'] * 1000:>8.0f} {alone['p99_s'] * 1000:>8.0f}")
    for n, _ in tenants:
        r = unlimited[n]
        print(f"{n:<10} {'(twin key, no quotas)':<34} {r['requests']:>8} {r['ok']:>5} {r['refused_429']:>6} "
              f"{r['p50_s'] * 1000:>8.0f} {r['p99_s'] * 1000:>8.0f}")
    ratio50, ratio99 = rows[last]["p50_s"] / alone["p50_s"], rows[last]["p99_s"] / alone["p99_s"]
    free50, free99 = unlimited[last]["p50_s"] / alone["p50_s"], unlimited[last]["p99_s"] / alone["p99_s"]
    print(f"{last}: with quotas / alone  p50 {ratio50:.2f}  p99 {ratio99:.2f};  "
          f"without quotas / alone  p50 {free50:.2f}  p99 {free99:.2f}")
    return {"tenants": {n: {"limits": lim, **rows[n]} for n, lim in tenants}, "alone": {last: alone},
            "unlimited": unlimited, "ratio_p50": ratio50, "ratio_p99": ratio99, "unlimited_ratio_p50": free50,
            "unlimited_ratio_p99": free99, "models": models}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one here)")
    ap.add_argument("--model", help="checkpoint for the self-started server (default: built-in demo model)")
    ap.add_argument("--key", help="API key (admin key to upload adapters)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-requests", type=int, default=100_000, help="hard bound on requests sent")
    ap.add_argument("--adapters", type=int, default=6, help="adapters to upload to a self-started server")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the figures here as JSON")
    ap.add_argument("--tenants", help="NAME[:rpm=N][:tpm=N][:conc=N],...: one key per tenant (see above)")
    ap.add_argument("--rounds", type=int, default=3, help="--tenants: alone/together phases, alternated")
    args = ap.parse_args()
    tenants = parse_tenants(args.tenants) if args.tenants else None
    if args.url and not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise SystemExit("--url must be a loopback address: this tool only loads servers on this machine")

    proc = None
    tmp = tempfile.TemporaryDirectory()
    try:
        if args.url:
            url = args.url
        else:
            from server.model.default_model import ensure_demo_model

            model = args.model or ensure_demo_model()
            extra = ["--admin-key", TENANT_ADMIN] if tenants else []
            proc, url = start_server(model, os.path.join(tmp.name, "store"), extra)
            with httpx.Client(base_url=url, timeout=120,
                              headers={"Authorization": f"Bearer {TENANT_ADMIN}"} if tenants else {}) as c:
                for name, d in make_adapters(model, tmp.name, args.adapters).items():
                    files = [("files", (f, open(os.path.join(d, f), "rb").read()))
                             for f in ("adapter_config.json", "adapter_model.safetensors")]
                    r = c.post("/v1/adapters", data={"name": name}, files=files)
                    r.raise_for_status()
        if tenants:
            figures = run_tenants(url, args.key or TENANT_ADMIN, tenants, args)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"args": vars(args), **figures}, f, indent=2)
            return 0
        with httpx.Client(base_url=url, timeout=60,
                          headers={"Authorization": f"Bearer {args.key}"} if args.key else {}) as c:
            models = [m["id"] for m in c.get("/v1/models").json()["data"]]
            before = scrape(c)
            lat, statuses, tokens, dt = asyncio.run(run_load(url, models, args.clients, args.seconds,
                                                             args.max_tokens, args.key, args.max_requests, args.seed))
            deadline = time.time() + 30
            after = scrape(c)
            while time.time() < deadline and (after.get("peftserve_num_requests_running", 0)
                                              or after.get("peftserve_kv_blocks_used", 0)):
                time.sleep(0.2)
                after = scrape(c)
        n = sum(statuses.values())
        print(f"models: {len(models)} ({', '.join(models)})")
        print(f"clients={args.clients} seconds={dt:.1f} requests={n} ok={statuses.get(200, 0)}")
        print(f"throughput: {n / dt:.2f} req/s, {tokens / dt:.1f} generated tok/s")
        print(f"latency (ok requests): p50 {pct(lat, 50) * 1000:.0f} ms, p95 {pct(lat, 95) * 1000:.0f} ms")
        print("status counts: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)))
        for label, snap in (("before", before), ("after", after)):
            shown = ", ".join(f"{k.removeprefix('peftserve_')}={v:g}" for k, v in sorted(snap.items()))
            print(f"state {label}: {shown}")
        errors = n - statuses.get(200, 0)
        print(f"unintended failures: {errors}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "models": models, "seconds": dt, "requests": n,
                           "req_per_s": n / dt, "generated_tok_per_s": tokens / dt,
                           "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95),
                           "statuses": {str(k): v for k, v in statuses.items()}, "state_before": before,
                           "state_after": after, "unintended_failures": errors}, f, indent=2)
        return 1 if errors else 0
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
