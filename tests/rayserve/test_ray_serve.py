"""Scale-out on Ray Serve (server/ray): one local Ray cluster for the whole module, 2 CPU replicas of the tiny
model behind the ingress, against the single-process server as the reference.

Proves: the same tokens as the single-process server for the base and every adapter family (plain and SSE);
adapter affinity through Serve's model multiplexing (>= 90 % of an adapter's requests on one replica, flat slot
loads); one writer with versioned, hash-checked fetches (upload answered on both replicas, no old-version
answer after a replace returns, 404 on both after a delete); metrics merged with a replica label; killing a
replica under load ends every request (success, retried, or a clear error) and Ray brings it back.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
from collections import Counter
from typing import Any

import httpx
import pytest
import ray  # the ray extra: make test installs it (no skip without it)
from ray import serve

from server.config import Settings
from server.ray.app import NO_AFFINITY_HEADER, REPLICA_HEADER, RayOptions, build_app
from tests.adapters import make_dora, make_ia3, make_lora, make_prompt_learning
from tests.e2e.test_adapter_store_api import upload
from tests.families.bottleneck_fixtures import adapter_dir, base_copy
from tests.server_utils import free_port, live_server
from tests.waits import wait_for

APP = "peftserve"
ADMIN = "ray-admin-key"  # the cluster's --admin-key: the module's client sends it (tenant keys need one)
PROMPT = [10, 20, 30, 40, 50, 60, 70]
N = 6


def _files(d: str) -> dict[str, bytes]:
    return {n: open(os.path.join(d, n), "rb").read() for n in os.listdir(d)
            if n.endswith((".json", ".safetensors")) and n != "head_config.json"}


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def complete(c: httpx.Client, model: str | None, n: int = N, affinity: bool = True, **kw: Any) -> httpx.Response:
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": n, "min_tokens": n, "temperature": 0,
                            "return_token_ids": True, **kw}
    if model is not None:
        body["model"] = model
    headers = {} if affinity else {NO_AFFINITY_HEADER: "1"}
    return c.post("/v1/completions", json=body, headers=headers)


def tokens(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One base (the bottleneck fixtures' tiny llama) and an adapter of every family on it."""
    root = str(tmp_path_factory.mktemp("ray-adapters"))
    base = base_copy(root, "llama")
    d = lambda n: os.path.join(root, n)
    dirs = {
        "lora": make_lora(base, d("lora"), r=4, targets=["q_proj", "v_proj", "down_proj"], seed=1),
        "dora": make_dora(base, d("dora"), r=4, targets=["q_proj", "o_proj"], seed=2),
        "ia3": make_ia3(base, d("ia3"), seed=3),
        "prefix": make_prompt_learning(base, d("prefix"), "prefix", seed=4),
        "prompt": make_prompt_learning(base, d("prompt"), "prompt", seed=5),
        "bottleneck": adapter_dir("llama", "seqbn-r4-leave0-gelu"),
    }
    for i in range(4):  # affinity: four LoRAs
        dirs[f"aff{i}"] = make_lora(base, d(f"aff{i}"), r=2, targets=["q_proj", "v_proj"], seed=10 + i)
    dirs["ver1"] = make_lora(base, d("ver1"), r=2, targets=["q_proj", "v_proj"], seed=20)
    dirs["ver2"] = make_lora(base, d("ver2"), r=2, targets=["q_proj", "v_proj"], seed=21)
    return {"base": base, "root": root, "dirs": dirs}


PROBE_DEADLINES = {"RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "5.0",
                   "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "10.0"}


@ray.remote(num_cpus=0)
def _worker_env(names: list[str]) -> dict[str, str | None]:
    return {n: os.environ.get(n) for n in names}


@pytest.fixture(scope="module")
def cluster(adapters: dict[str, Any]) -> Any:
    """A local Ray cluster (2 CPUs), Serve on a free port, the app with 2 replicas x 2 slots; torn down after."""
    port = free_port()
    settings = Settings(model=adapters["base"], adapters_dir=os.path.join(adapters["root"], "store"),
                        kv_cache_blocks=96, max_num_seqs=8, max_adapters=2, served_model_name="tiny",
                        admin_key=ADMIN)
    # Serve's router (ray/serve/_private/request_router) routes a multiplexed request to the replicas holding its
    # model id only if one of them answers a queue-length probe within RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S
    # (default 0.1 s, doubled per retry up to RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S, default 1 s); one
    # missed probe and the next attempt goes to the replicas with the fewest models: a spill, which evicts one of
    # that replica's adapters, whose next request spills in turn. A probe is sent whenever the router's cached
    # queue length of the home replica is older than 10 s (e.g. after the wait for the metrics push), and a
    # replica busy generating on an overloaded 2-core CI box can take over a second to answer it. Never "full"
    # here: max_ongoing_requests is 64 and the test has 4 requests in flight. So give the probe a deadline only a
    # hung replica misses (a dead one fails it at once). Workers inherit the driver's environment (checked below).
    saved = {k: os.environ.get(k) for k in PROBE_DEADLINES}
    os.environ.update(PROBE_DEADLINES)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        env = ray.get(_worker_env.remote(list(PROBE_DEADLINES)), timeout=120)
        assert env == PROBE_DEADLINES, env
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # autoscaling bounds of 2..2: two replicas, and the settings must reach Serve's controller
        opts = RayOptions(min_replicas=2, max_replicas=2, target_ongoing_requests=32, replica_cpus=0.5,
                          max_models_per_replica=2, max_ongoing_requests=64)
        serve.run(build_app(settings, opts), name=APP, route_prefix="/")
        answered = Counter()

        def count(r: httpx.Response) -> None:  # completions a replica answered, to know when metrics caught up
            if r.request.url.path == "/v1/completions" and r.headers.get(REPLICA_HEADER, "writer") != "writer":
                answered["n"] += 1

        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, headers=_auth(ADMIN),
                          event_hooks={"response": [count]}) as c:
            c.answered = answered  # type: ignore[attr-defined]
            yield c
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def reference(adapters: dict[str, Any]) -> Any:
    """The single-process server on the same base."""
    with live_server(model=adapters["base"], adapters_dir=os.path.join(adapters["root"], "ref-store"),
                     kv_cache_blocks=96, max_num_seqs=8, max_adapters=8, served_model_name="tiny") as srv:
        with srv.client() as c:
            yield c


def _sse_tokens(c: httpx.Client, model: str | None) -> tuple[str, str | None]:
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": N, "min_tokens": N, "temperature": 0, "stream": True}
    if model:
        body["model"] = model
    text = ""
    with c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        replica = r.headers.get(REPLICA_HEADER)
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        text += json.loads(ln[6:])["choices"][0]["text"]
    return text, replica


def test_autoscaling_settings_reach_serve(cluster: httpx.Client) -> None:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    cfg = details["applications"][APP]["deployments"]["Replica"]["deployment_config"]
    auto = cfg["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"], auto["target_ongoing_requests"]) == (2, 2, 32)
    assert cfg["ray_actor_options"]["num_cpus"] == 0.5
    assert cluster.get("/health").json() == {"status": "ok"}


def test_same_answers_as_single_process(cluster: httpx.Client, reference: httpx.Client,
                                        adapters: dict[str, Any]) -> None:
    families = ["lora", "dora", "ia3", "prefix", "prompt", "bottleneck"]
    for fam in families:
        files = _files(adapters["dirs"][fam])
        assert upload(cluster, fam, files).status_code == 201
        assert upload(reference, fam, files).status_code == 201
    base = tokens(complete(reference, None))
    assert tokens(complete(cluster, None)) == base
    assert tokens(complete(cluster, "tiny")) == base
    for fam in families:
        want = tokens(complete(reference, fam))
        assert want != base, f"{fam}: the adapter must change the output"
        r = complete(cluster, fam)
        assert r.headers.get(REPLICA_HEADER), "every answer names its replica"
        assert tokens(r) == want, fam
    # streaming (SSE) through the ingress: the same text as the single server's non-streamed answer
    for model in (None, "lora", "prefix"):
        text, replica = _sse_tokens(cluster, model)
        want = complete(reference, model).json()["choices"][0]["text"]
        assert text == want and replica
    # the catalogue is the writer's: every family listed with its type
    listed = {a["name"]: a["type"] for a in cluster.get("/v1/adapters").json()["data"]}
    assert {listed[f] for f in families} == {"lora", "dora", "ia3", "prefix", "prompt", "bottleneck"}
    ids = {m["id"] for m in cluster.get("/v1/models").json()["data"]}
    assert {"tiny", *families} <= ids
    # errors keep OpenAI's shape through the ingress
    r = complete(cluster, "no-such-adapter")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


def _chat(c: httpx.Client, model: str, affinity: bool = True, **kw: Any) -> httpx.Response:
    return c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": N, "min_tokens": N, "return_token_ids": True, **kw},
                  headers={} if affinity else {NO_AFFINITY_HEADER: "1"})


def test_assistants_through_the_ingress(cluster: httpx.Client, reference: httpx.Client,
                                        adapters: dict[str, Any]) -> None:
    """An assistant created through the ingress answers on both replicas as the single server's twin does
    (its instructions and defaults applied: same prompt and tokens); an edit reaches every replica before
    the PATCH returns; after a delete both replicas answer 404."""
    for c in (cluster, reference):
        if upload(c, "asst-lora", _files(adapters["dirs"]["lora"])).status_code != 201:
            raise AssertionError("upload failed")
        r = c.post("/v1/assistants", json={"name": "helper", "model": "asst-lora", "instructions": "Be brief.",
                                           "temperature": 0})
        assert r.status_code == 200, r.text
    ref = _chat(reference, "helper").json()
    plain = _chat(reference, "asst-lora", temperature=0).json()
    assert ref["prompt_token_ids"] != plain["prompt_token_ids"], "the instructions must reach the prompt"
    send = lambda: _chat(cluster, "helper", affinity=False)
    got = _both_replicas(cluster, "helper", lambda r: r.json(), "the assistant answered on both", send=send)
    for body in got.values():
        assert body["prompt_token_ids"] == ref["prompt_token_ids"], body
        assert body["choices"][0]["token_ids"] == ref["choices"][0]["token_ids"]
    assert "helper" in {m["id"] for m in cluster.get("/v1/models").json()["data"]}
    for c in (cluster, reference):
        r = c.patch("/v1/assistants/helper", json={"instructions": "Answer in French."})
        assert r.status_code == 200, r.text
    ref2 = _chat(reference, "helper").json()
    assert ref2["prompt_token_ids"] != ref["prompt_token_ids"]
    for body in _both_replicas(cluster, "helper", lambda r: r.json(), "the edited assistant", send=send).values():
        assert body.get("prompt_token_ids") == ref2["prompt_token_ids"], body  # never the old instructions
    assert cluster.delete("/v1/assistants/helper").status_code == 200
    gone = _both_replicas(cluster, "helper", lambda r: (r.status_code, r.json()["error"]["param"]),
                          "404 after the delete", send=send)
    assert set(gone.values()) == {(404, "model")}, gone


def _metric(c: httpx.Client, name: str, **labels: str) -> dict[str, float]:
    """{replica: value} of the samples of `name` that carry `labels` (ingress /metrics, merged)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(cluster_get(c, "/metrics")):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out[s.labels["replica"]] = out.get(s.labels["replica"], 0.0) + s.value
    return out


def caught_up(c: httpx.Client) -> None:
    """Wait until the merged metrics count every completion a replica has answered (replicas push each second)."""
    wait_for(lambda: sum(_metric(c, "peftserve_http_requests_total", route="/v1/completions").values())
             >= c.answered["n"], "the replicas' pushed metrics to count every answered completion")


def cluster_get(c: httpx.Client, path: str) -> str:
    r = c.get(path)
    assert r.status_code == 200
    return r.text


def test_affinity_and_merged_metrics(cluster: httpx.Client, adapters: dict[str, Any]) -> None:
    names = [f"aff{i}" for i in range(4)]
    for n in names:
        assert upload(cluster, n, _files(adapters["dirs"][n])).status_code == 201
    answers = {n: tokens(complete(cluster, n)) for n in names}
    assert len({tuple(a) for a in answers.values()}) == 4, "four different adapters, four different answers"
    # Warm-up: Serve places an adapter no replica holds on the replica with the fewest (a tie: at random) and
    # each replica keeps 2; warm-up ends when a whole round lands where the previous one did and Serve's own
    # multiplexing state agrees: each replica holds exactly the model ids of the adapters it answered (no adapter
    # still listed on a replica that evicted it, which would let the router send its next request there).
    last: dict[str, str] = {}

    def settled() -> bool:
        now = {n: complete(cluster, n).headers[REPLICA_HEADER] for n in names}
        stable = now == last
        last.clear()
        last.update(now)
        if not stable:
            return False
        held = {r: {m.split("@")[0] for m in info["models"]} for r, info in _replica_infos().items()}
        return all(held.get(r) == {n for n in names if now[n] == r} for r in set(now.values()))

    wait_for(settled, "adapter placement to settle", timeout=120, poll=0)
    # both replicas report (the merged /metrics has a replica label for each) and count every completion
    # answered so far: the pushed counters are current
    caught_up(cluster)
    assert len(_metric(cluster, "peftserve_http_requests_total")) >= 2
    loads_before = sum(_metric(cluster, "peftserve_adapter_loads_total", tier="device").values())

    per = 10
    where: dict[str, Counter[str]] = {n: Counter() for n in names}

    def one(n: str) -> None:
        r = complete(cluster, n)
        assert tokens(r) == answers[n]
        where[n][r.headers[REPLICA_HEADER]] += 1

    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, [n for _ in range(per) for n in names]))
    for n in names:
        top = where[n].most_common(1)[0][1]
        assert top / per >= 0.9, f"{n}: {dict(where[n])}"
    # every request counted, on the replica that answered it (merged metrics carry the replica label)
    caught_up(cluster)
    by_replica = _metric(cluster, "peftserve_http_requests_total", route="/v1/completions")
    assert set(by_replica) >= {r for w in where.values() for r in w}
    loads_after = sum(_metric(cluster, "peftserve_adapter_loads_total", tier="device").values())
    # 4 adapters, 2 replicas x 2 slots: each replica keeps its two adapters resident, so the only slot loads are
    # those of a request Serve spilled to the other replica (its home's queue probe timed out): at most two each
    # (the spilled adapter in, and later the evicted one back)
    spilled = sum(per - where[n].most_common(1)[0][1] for n in names)
    assert loads_after - loads_before <= 2 * spilled, (loads_before, loads_after, {n: dict(where[n]) for n in names})


def _both_replicas(c: httpx.Client, model: str, check: Any, what: str, send: Any = None) -> dict[str, Any]:
    """Send default-routed requests (`send()`, default a completion) until both replicas have answered
    (deadline); {replica: check(its latest answer)}."""
    seen: dict[str, Any] = {}

    def done() -> bool:
        r = send() if send is not None else complete(c, model, affinity=False)
        seen[r.headers[REPLICA_HEADER]] = check(r)
        return len(seen) >= 2

    wait_for(done, what, timeout=120, poll=0)
    return seen


def test_upload_replace_delete_consistent(cluster: httpx.Client, reference: httpx.Client,
                                          adapters: dict[str, Any]) -> None:
    v1, v2 = _files(adapters["dirs"]["ver1"]), _files(adapters["dirs"]["ver2"])
    assert upload(reference, "ver", v1).status_code == 201
    want1 = tokens(complete(reference, "ver"))
    assert upload(reference, "ver", v2, method="PUT").status_code == 200
    want2 = tokens(complete(reference, "ver"))
    assert want1 != want2 != tokens(complete(reference, None))

    r = upload(cluster, "ver", v1)
    assert r.status_code == 201 and r.json()["version"] == 1
    seen = _both_replicas(cluster, "ver", tokens, "v1 answered on both replicas")
    assert all(t == want1 for t in seen.values()), seen

    r = upload(cluster, "ver", v2, method="PUT")
    assert r.status_code == 200 and r.json()["version"] == 2
    # the call has returned: no request may start on v1, on either replica, routed either way
    for _ in range(4):
        assert tokens(complete(cluster, "ver")) == want2
    seen = _both_replicas(cluster, "ver", tokens, "v2 answered on both replicas")
    assert all(t == want2 for t in seen.values()), seen

    assert cluster.delete("/v1/adapters/ver").status_code == 204
    seen = _both_replicas(cluster, "ver", lambda r: r.status_code, "404 from both replicas")
    assert set(seen.values()) == {404}, seen
    assert complete(cluster, "ver").status_code == 404


def _replica_infos() -> dict[str, dict[str, Any]]:
    """Replica.info() of both replicas (handle calls, routed at random until both answered)."""
    h = serve.get_deployment_handle("Replica", APP)
    infos: dict[str, dict[str, Any]] = {}

    def two() -> bool:
        info = h.info.remote().result(timeout_s=60)
        infos[info["replica"]] = info
        return len(infos) >= 2

    wait_for(two, "both replicas' info", timeout=120, poll=0)
    return infos


def _replica_pids() -> dict[str, int]:
    return {r: info["pid"] for r, info in _replica_infos().items()}


def test_kill_replica_under_load(cluster: httpx.Client) -> None:
    pids = _replica_pids()
    victim, pid = sorted(pids.items())[0]
    n = 160  # long enough that the kill lands mid-stream
    results: list[tuple[str | None, int, str]] = []
    killed = []

    def stream(i: int) -> None:
        body = {"prompt": PROMPT, "max_tokens": n, "min_tokens": n, "temperature": 0, "stream": True}
        with cluster.stream("POST", "/v1/completions", json=body, headers={NO_AFFINITY_HEADER: "1"}) as r:
            replica = r.headers.get(REPLICA_HEADER)
            last = ""
            for ln in r.iter_lines():
                if not ln.startswith("data: "):
                    continue
                last = ln
                if replica == victim and not killed:
                    killed.append(True)
                    os.kill(pid, signal.SIGKILL)  # a replica process dies with this stream open
                if ln != "data: [DONE]" and "error" in json.loads(ln[6:]):
                    results.append((replica, r.status_code, "error-event"))
                    return
            results.append((replica, r.status_code, "done" if last == "data: [DONE]" else "cut"))

    def plain(i: int) -> None:
        r = complete(cluster, None, n=8, affinity=False)
        results.append((r.headers.get(REPLICA_HEADER), r.status_code,
                        "done" if r.status_code == 200 else r.json()["error"]["code"]))

    with cf.ThreadPoolExecutor(8) as pool:  # every call has httpx's deadline: nothing can hang the test
        futs = [pool.submit(stream, i) for i in range(6)] + [pool.submit(plain, i) for i in range(10)]
        for f in futs:
            f.result(timeout=300)
    assert killed, "no stream reached the victim replica"
    assert len(results) == 16
    for replica, status, how in results:
        if replica == victim:
            assert how in ("done", "error-event"), results  # never a silent cut
        else:
            assert (status, how) == (200, "done") or how == "replica_died", results
    assert sum(1 for _, s, h in results if (s, h) == (200, "done")) >= 8, results
    # Ray restarts the replica: two healthy replicas again, one of them a new process
    def back() -> bool:
        st = serve.status().applications[APP].deployments["Replica"]
        return st.status == "HEALTHY" and st.replica_states.get("RUNNING", 0) == 2

    wait_for(back, "Ray Serve to restart the killed replica", timeout=180, poll=0.5)
    new = _replica_pids()
    assert pid not in new.values() and len(new) == 2
    assert tokens(complete(cluster, None)) == tokens(complete(cluster, None, affinity=False))


def _statuses_on_both(c: httpx.Client, send: Any, what: str) -> dict[str, list[Any]]:
    """Default-routed requests until both replicas have answered twice (deadline); {replica: [send's checks]}."""
    seen: dict[str, list[Any]] = {}

    def done() -> bool:
        r = send()
        seen.setdefault(r.headers[REPLICA_HEADER], []).append((r.status_code, r.json()))
        return len(seen) >= 2 and all(len(v) >= 2 for v in seen.values())

    wait_for(done, what, timeout=120, poll=0)
    return seen


def test_tenant_keys_on_replicas(cluster: httpx.Client, adapters: dict[str, Any]) -> None:
    """Tenant keys created through the ingress work on every replica (the replica mirrors the writer's key row and
    the owners of what the request names): a tenant runs its own adapter and the base on both replicas, sees
    only its own adapters, gets 404 for another tenant's; its usage (counted on the replicas) is served by the
    writer; requests_per_minute is per replica, storage_bytes cluster-wide (the writer); after a revoke returns,
    both replicas answer 401."""
    base_url = cluster.base_url

    def new_key(tenant: str, **limits: int) -> dict[str, Any]:
        r = cluster.post("/v1/keys", json={"tenant": tenant, "scopes": ["infer", "adapters:write"],
                                           "limits": limits})
        assert r.status_code == 201, r.text
        return r.json()

    lora = _files(adapters["dirs"]["aff0"])
    size = sum(len(b) for b in lora.values())
    acme_key, globex_key = new_key("acme", storage_bytes=size + size // 2), new_key("globex")
    acme = httpx.Client(base_url=base_url, timeout=120, headers=_auth(acme_key["key"]))
    globex = httpx.Client(base_url=base_url, timeout=120, headers=_auth(globex_key["key"]))
    with acme, globex:
        assert upload(acme, "acme.lora", lora).status_code == 201
        assert upload(globex, "globex.lora", _files(adapters["dirs"]["aff1"])).status_code == 201
        # storage_bytes is checked where uploads land (the writer): one store, one count for the whole cluster
        r = upload(acme, "acme.more", _files(adapters["dirs"]["aff2"]))
        assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded", r.text
        want = tokens(complete(cluster, "acme.lora"))  # the admin's answer with acme's adapter
        assert want != tokens(complete(cluster, None)), "the adapter must change the output"

        got = _statuses_on_both(cluster, lambda: complete(acme, "acme.lora", affinity=False),
                                "acme's key answered on both replicas")
        for replica, answers in got.items():
            for status, body in answers:
                assert status == 200, (replica, body)
                assert body["choices"][0]["token_ids"] == want
        served = sum(len(a) for a in got.values())
        base = _statuses_on_both(cluster, lambda: complete(acme, None, affinity=False), "acme's base requests")
        assert {st for a in base.values() for st, _ in a} == {200}, base
        served += sum(len(a) for a in base.values())
        # another tenant's adapter is answered exactly as a name that does not exist, on both replicas
        other = _statuses_on_both(cluster, lambda: complete(acme, "globex.lora", affinity=False),
                                  "another tenant's adapter on both replicas")
        missing = complete(cluster, "no-such.adapter").json()["error"]
        for answers in other.values():
            for status, body in answers:
                assert status == 404 and body["error"]["code"] == missing["code"], body
                assert body["error"]["message"] == missing["message"].replace("no-such.adapter", "globex.lora")
        assert {m["id"] for m in acme.get("/v1/models").json()["data"]} == {"tiny", "acme.lora"}
        assert {a["name"] for a in globex.get("/v1/adapters").json()["data"]} == {"globex.lora"}

        # usage: the replicas count, the writer sums their pushed counters
        def usage() -> dict[str, Any]:
            rows = acme.get("/v1/usage").json()["data"]
            assert [u["key_id"] for u in rows] == [acme_key["id"]]
            return rows[0]

        wait_for(lambda: usage()["requests"] >= served, "acme's usage to count the replicas' requests")
        assert usage()["rejected"] == {"storage_bytes": 1}

        # /metrics through the ingress (every replica's, merged by the writer): filtered per tenant key as on a
        # single server. The admin sees acme's series from both replicas; acme sees its own; globex none of them.
        def scrape(c: httpx.Client) -> str:
            r = c.get("/metrics")
            assert r.status_code == 200, r.text
            return r.text

        everything = scrape(cluster)
        assert 'adapter="acme.lora"' in everything and 'tenant="acme"' in everything
        assert {ln.split('replica="')[1].split('"')[0] for ln in everything.splitlines()
                if 'adapter="acme.lora"' in ln} == set(got), "acme's series from both replicas"
        mine, theirs = scrape(acme), scrape(globex)
        assert 'adapter="acme.lora"' in mine and 'tenant="acme"' in mine and "globex.lora" not in mine
        assert "acme" not in theirs and 'replica="' in theirs

        # requests_per_minute is per replica: each replica admits one, then refuses
        rpm = new_key("acme", requests_per_minute=1)
        with httpx.Client(base_url=base_url, timeout=120, headers=_auth(rpm["key"])) as one:
            per = _statuses_on_both(cluster, lambda: complete(one, None, affinity=False), "an rpm=1 key on both")
        for replica, answers in per.items():
            assert answers[0][0] == 200, (replica, answers)
            assert any(st == 429 and b["error"]["code"] == "quota_exceeded" for st, b in answers[1:]), answers

        # revoke: once the call has returned, neither replica admits the key
        assert cluster.delete(f"/v1/keys/{acme_key['id']}").status_code == 200
        gone = _statuses_on_both(cluster, lambda: complete(acme, "acme.lora", affinity=False),
                                 "401 from both replicas after the revoke")
        assert {st for a in gone.values() for st, _ in a} == {401}, gone
        assert globex.get("/v1/models").status_code == 200  # the other tenant's key still works
