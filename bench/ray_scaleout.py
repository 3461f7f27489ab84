"""Ray Serve scale-out (issue 14): the ingress's added latency against the single server, and adapter slot loads
with affinity routing (Serve's model multiplexing) against Ray's default routing.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ray_scaleout.py [--requests 200] [--adapters 16] [--slots 4] \
        [--rows 4:2,32:16] [--skip-latency]

Both parts run on the tiny random llama (tests/tiny.py), so the figures measure routing and transport, not the
model. Latency: one request at a time, alternating the single server (`peftserve serve` in a subprocess) and the
Ray ingress (2 replicas), so load on the machine hits both alike. Slot loads: --adapters LoRAs over 2 replicas x
--slots device slots; the same request sequence (uniform, and Zipf s=1.1 popularity) is sent routed by adapter
and then with the x-peftserve-no-affinity header (Serve's default power-of-two routing), alternating rounds;
loads are the replicas' `peftserve_adapter_loads_total{tier="device"}` deltas from the ingress's merged /metrics.

Load rows (`--rows CLIENTS:MAX_TOKENS,...`): each row is a closed loop of CLIENTS threads sending the sequence
(each request generating MAX_TOKENS tokens). `4:2` is the original shape: 4 requests in flight against 2 x 8
sequence places, so no replica ever queues and every request is an independent cache lookup (for uniform
traffic the ratio's floor is then 0.67: a 50 % vs 75 % LRU miss rate). `32:16` is the loaded shape: 16
requests per replica against 8 sequence places, so replicas hold queues and admission can serve several
requests of an adapter with one load. Per mode: loads, requests/s and latency p50/p99 (the ratio must not be
bought with latency). Serve's multiplexing cache per replica defaults to 2 x --slots (build_app's default).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _metric(c: httpx.Client, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(c.get("/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def _settled(c: httpx.Client, sent: float, timeout: float = 60) -> None:
    """Wait until the merged metrics count every request sent so far (replicas push every second)."""
    deadline = time.monotonic() + timeout
    while _metric(c, "peftserve_http_requests_total", route="/v1/completions") < sent:
        if time.monotonic() > deadline:
            raise RuntimeError("replica metrics did not catch up")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200, help="latency: requests per server")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4, help="device slots per replica")
    ap.add_argument("--load-requests", type=int, default=192, help="slot loads: requests per round")
    ap.add_argument("--rows", default="4:2,32:16",
                    help="slot loads: comma-separated CLIENTS:MAX_TOKENS closed-loop shapes")
    ap.add_argument("--skip-latency", action="store_true", help="skip the ingress latency part")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models-per-replica", type=int, default=None,
                    help="Serve multiplexing's per-replica cache (default: 2 x --slots, as build_app)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args()

    import ray
    from ray import serve

    from server.config import Settings
    from server.ray.app import NO_AFFINITY_HEADER, RayOptions, build_app
    from tests.adapters import make_lora
    from tests.server_utils import free_port as _port
    from tests.tiny import make_tiny_checkpoint

    tmp = tempfile.mkdtemp(prefix="bench-ray-")
    base = make_tiny_checkpoint(tmp)
    dirs = [make_lora(base, os.path.join(tmp, f"a{i}"), r=4, targets=["q_proj", "v_proj"], seed=i)
            for i in range(a.adapters)]
    files = [{n: open(os.path.join(d, n), "rb").read() for n in ("adapter_config.json", "adapter_model.safetensors")}
             for d in dirs]
    common = dict(model=base, kv_cache_blocks=128, max_num_seqs=8, max_adapters=a.slots, served_model_name="tiny")
    body = {"prompt": [10, 20, 30, 40], "max_tokens": 2, "min_tokens": 2, "temperature": 0}

    # --- the single server, in its own process
    sport = _port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.Popen([sys.executable, "-m", "server", "serve", "--model", base, "--port", str(sport),
                               "--kv-cache-blocks", "128", "--max-num-seqs", "8", "--max-adapters", str(a.slots),
                               "--served-model-name", "tiny", "--adapters-dir", os.path.join(tmp, "single"),
                               "--log-level", "warning", "--no-ui"], env=env)
    # --- the Ray cluster
    rport = _port()
    t0 = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": rport})
    serve.run(build_app(Settings(**common, adapters_dir=os.path.join(tmp, "store")),
                        RayOptions(replicas=2, replica_cpus=0.5,
                                   max_models_per_replica=a.models_per_replica or 2 * a.slots)),
              name="peftserve", route_prefix="/")
    startup = time.monotonic() - t0
    out: dict[str, Any] = {"models_per_replica": a.models_per_replica or 2 * a.slots,
                           "loadavg_start": open("/proc/loadavg").read().split()[:3], "ray_startup_s": startup}
    try:
        sc = httpx.Client(base_url=f"http://127.0.0.1:{sport}", timeout=120)
        rc = httpx.Client(base_url=f"http://127.0.0.1:{rport}", timeout=120)
        deadline = time.monotonic() + 120
        while True:
            try:
                if sc.get("/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("single server did not start")
            time.sleep(0.2)
        for _ in range(5):  # warm both
            sc.post("/v1/completions", json=body).raise_for_status()
            rc.post("/v1/completions", json=body).raise_for_status()
        lat: dict[str, list[float]] = {"single": [], "ray": []}
        for _ in range(0 if a.skip_latency else max(1, a.requests)):
            for name, c in (("single", sc), ("ray", rc)):
                t = time.perf_counter()
                c.post("/v1/completions", json=body).raise_for_status()
                lat[name].append(1000 * (time.perf_counter() - t))
        if not a.skip_latency:
            for name, xs in lat.items():
                out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = _pct(xs, 0.5), _pct(xs, 0.99)
            out["added_p50_ms"] = out["ray_p50_ms"] - out["single_p50_ms"]
            out["added_p99_ms"] = out["ray_p99_ms"] - out["single_p99_ms"]
            print(json.dumps({k: out[k] for k in out if "ms" in k}, indent=1), flush=True)

        # --- slot loads: affinity vs default routing
        names = [f"a{i}" for i in range(a.adapters)]
        for n, f in zip(names, files, strict=True):
            rc.post("/v1/adapters", data={"name": n}, files=[("files", (k, v)) for k, v in f.items()]
                    ).raise_for_status()
        rng = random.Random(0)
        zipf_w = [1 / (i + 1) ** 1.1 for i in range(a.adapters)]
        seqs = {"uniform": [rng.choice(names) for _ in range(a.load_requests)],
                "zipf": rng.choices(names, weights=zipf_w, k=a.load_requests)}

        def run(seq: list[str], affinity: bool, clients: int, max_tokens: int) -> list[float]:
            headers = {} if affinity else {NO_AFFINITY_HEADER: "1"}
            req = {**body, "max_tokens": max_tokens, "min_tokens": max_tokens}

            def one(n: str) -> float:
                t = time.perf_counter()
                rc.post("/v1/completions", json={**req, "model": n}, headers=headers).raise_for_status()
                return 1000 * (time.perf_counter() - t)

            with cf.ThreadPoolExecutor(clients) as pool:
                return list(pool.map(one, seq))

        def queued(stop: threading.Event, into: list[float]) -> None:
            """Sample the replicas' waiting sequences (merged gauge, pushed every second) while a run lasts."""
            mc = httpx.Client(base_url=f"http://127.0.0.1:{rport}", timeout=30)
            while not stop.wait(0.5):
                try:
                    into.append(_metric(mc, "peftserve_num_requests_waiting"))
                except httpx.HTTPError:
                    pass

        rows = [tuple(int(x) for x in r.split(":")) for r in a.rows.split(",") if r.strip()]
        sent = _metric(rc, "peftserve_http_requests_total", route="/v1/completions")
        for clients, max_tokens in rows:
            for w, seq in seqs.items():
                m: dict[str, dict[str, list[float]]] = {
                    mode: {"loads": [], "req_per_s": [], "p50_ms": [], "p99_ms": [], "waiting_mean": []}
                    for mode in ("affinity", "default")}
                for r in range(a.rounds):
                    order = ("default", "affinity") if r % 2 == 0 else ("affinity", "default")
                    for mode in order:
                        _settled(rc, sent)
                        before = _metric(rc, "peftserve_adapter_loads_total", tier="device")
                        samples: list[float] = []
                        stop = threading.Event()
                        sampler = threading.Thread(target=queued, args=(stop, samples), daemon=True)
                        sampler.start()
                        t = time.perf_counter()
                        lat_ms = run(seq, mode == "affinity", clients, max_tokens)
                        dt = time.perf_counter() - t
                        stop.set()
                        sampler.join()
                        m[mode]["waiting_mean"].append(statistics.mean(samples) if samples else 0.0)
                        sent += len(seq)
                        _settled(rc, sent)
                        m[mode]["loads"].append(_metric(rc, "peftserve_adapter_loads_total", tier="device") - before)
                        m[mode]["req_per_s"].append(len(seq) / dt)
                        m[mode]["p50_ms"].append(_pct(lat_ms, 0.5))
                        m[mode]["p99_ms"].append(_pct(lat_ms, 0.99))
                aff, dflt = statistics.mean(m["affinity"]["loads"]), statistics.mean(m["default"]["loads"])
                key = f"loads_{w}" if (clients, max_tokens) == (4, 2) else f"loads_{w}_c{clients}_t{max_tokens}"
                out[key] = {"clients": clients, "max_tokens": max_tokens, **m, "ratio": aff / dflt if dflt else None}
                print(json.dumps({key: out[key]}), flush=True)
        out["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        print(json.dumps({k: v for k, v in out.items() if k.startswith("loads") or k.startswith("load")}, indent=1))
        if a.out:
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        single.terminate()
        single.wait(30)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
