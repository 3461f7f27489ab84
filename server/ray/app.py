"""The Ray Serve application: one ingress, one store writer, N engine replicas.

- `Replica` runs the unchanged single-process server (ServerState + FastAPI app, its own engine and device)
  and answers forwarded HTTP requests in-process, streaming (SSE included). Its adapter store is a local
  cache: it holds only versions fetched from the writer by (name, version, sha256) and checked against the
  hash before they are registered.
- `StoreWriter` owns the one adapter store (`--adapters-dir`): every upload, replace and delete goes through
  it, and it answers the adapter listings and /v1/models. It also collects each replica's metrics.
- `Ingress` is the HTTP entry: it keeps the catalogue (name -> version, sha256), reads `model` from the body
  and routes with Ray Serve's model multiplexing (`multiplexed_model_id = "name@version"`), so requests for
  an adapter go to the replicas that hold it; base requests go anywhere. Every forwarded request carries the
  versions it must run on; a replica fetches a missing version before it starts the request, so once a
  replace or delete has returned (the ingress refreshes its catalogue from the writer first), no replica
  starts a request on the old version.
"""


import asyncio
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from server.ray.asgi import stream_asgi
from server.ray.metrics import merge_metrics
from server.tenants import mirror

log = logging.getLogger("peftserve.ray")

REPLICA_HEADER = "x-peftserve-replica"
NO_AFFINITY_HEADER = "x-peftserve-no-affinity"  # "1": route this request as Ray's default would (bench, tests)
GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
# served by the writer: the catalogue and everything that writes the store
WRITER_PREFIXES = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/models",
                   "/v1/assistants", "/v1/files", "/v1/fine_tuning", "/v1/keys", "/v1/usage")
METRICS_PUSH_S = 1.0


@dataclass
class RayOptions:
    """What `peftserve ray serve` adds to the serve flags."""
    replicas: int = 2
    min_replicas: int | None = None  # set min/max to autoscale (Serve's autoscaling_config)
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    # Serve multiplexing's per-replica cache of adapter ids; default 2 x --max-adapters, so an adapter keeps its
    # home replica while its device slot is lent to another (bench/RESULTS.md: fewer slot loads than = slots)
    max_models_per_replica: int | None = None
    max_ongoing_requests: int = 64
    affinity: bool = True
    writer_cpus: float = 0.1
    ingress_cpus: float = 0.1
    # a custom Ray resource only the node that mounts --adapters-dir offers (multi-node: pins the writer there)
    writer_resource: str | None = None

    def validate(self) -> "RayOptions":
        def bad(flag: str, value: Any, why: str) -> None:
            raise ValueError(f"--{flag}: invalid value {value!r} ({why})")

        if self.replicas < 1:
            bad("replicas", self.replicas, "must be >= 1")
        if (self.min_replicas is None) != (self.max_replicas is None):
            bad("min-replicas" if self.min_replicas is None else "max-replicas",
                None, "give both --min-replicas and --max-replicas to autoscale")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= (self.max_replicas or 0):
            bad("min-replicas", self.min_replicas, f"must be in [0, --max-replicas {self.max_replicas}]")
        if self.max_replicas is not None and self.max_replicas < 1:
            bad("max-replicas", self.max_replicas, "must be >= 1")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            bad("target-ongoing-requests", self.target_ongoing_requests, "must be > 0")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            bad("replica-cpus" if self.replica_cpus < 0 else "replica-gpus",
                min(self.replica_cpus, self.replica_gpus), "must be >= 0")
        if self.max_models_per_replica is not None and self.max_models_per_replica < 1:
            bad("max-models-per-replica", self.max_models_per_replica, "must be >= 1")
        return self

    def replica_deployment_options(self) -> dict[str, Any]:
        """Serve options of the Replica deployment: resources, replica count or autoscaling."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.replica_cpus, "num_gpus": self.replica_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
        }
        if self.min_replicas is not None:
            auto: dict[str, Any] = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                                    "initial_replicas": max(self.min_replicas, min(self.replicas,
                                                                                   self.max_replicas or 1))}
            if self.target_ongoing_requests is not None:
                auto["target_ongoing_requests"] = self.target_ongoing_requests
            opts["autoscaling_config"] = auto
        else:
            opts["num_replicas"] = self.replicas
        return opts


def _settings(values: dict[str, Any], **override: Any) -> Any:
    from server.config import Settings

    return Settings(**{**values, **override})


def _start_state(settings: Any, fine_tuning: bool = False) -> tuple[Any, Any]:
    """What the app's lifespan would start: the engine (and, on the writer, the fine-tuning worker)."""
    from server.api.app import create_app
    from server.api.state import build_state

    state = build_state(settings)
    app = create_app(state)
    state.engine.start()
    if not fine_tuning:
        state.finetune = None  # jobs run on the writer, where the trained adapter lands in the store
    elif state.finetune is not None:
        state.finetune.start()
    return state, app


def _stop_state(state: Any) -> None:
    from server.shutdown import FINAL_GRACE_S, shutdown_error

    if state.finetune is not None:
        state.finetune.shutdown(timeout=FINAL_GRACE_S)
    state.engine.abort_all(shutdown_error(0))
    state.engine.stop(timeout=5)


class _Token:
    """What the multiplexed loader caches: the adapter version this replica holds for Serve's routing."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id


# ------------------------------------------------------------------------------------------------ writer

@serve.deployment(name="StoreWriter", num_replicas=1, max_ongoing_requests=64)
class StoreWriter:
    """The one writer of the adapter store, and the catalogue every replica fetches from."""

    def __init__(self, settings: dict[str, Any]) -> None:
        # Validation needs the model's shapes, so the writer loads the base too, on CPU with the CPU default KV
        # cache (room for a few max_model_len sequences, not a GPU-sized --kv-cache-blocks): it serves no
        # generation traffic, only fine-tuning jobs.
        s = _settings(settings, device="cpu", kv_cache_blocks=None, max_num_seqs=1)
        self.state, self.app = _start_state(s, fine_tuning=True)
        self.reports: dict[str, tuple[float, str]] = {}
        # the ingress relays /metrics here: the replicas' merged text, behind the single server's key check
        # (--metrics-require-key) and per-tenant filter
        self.state.metrics_text = lambda: merge_metrics(self.metrics()).encode()

    def base_name(self) -> str:
        return self.state.base_name

    def catalog(self) -> dict[str, Any]:
        """name -> [version, sha256] for stored adapters, "static" for --adapter ones (every replica has them)."""
        out: dict[str, Any] = {}
        for name in self.state.registry.names():
            e = self.state.registry.entry(name)
            if e is None:
                continue
            rec = e.record or {}
            out[name] = [e.version, rec.get("sha256")] if e.stored else "static"
        return out

    def assistants(self) -> dict[str, Any]:
        """name -> the assistant's row (a replica mirrors it before it serves a request naming it)."""
        if self.state.assistants is None:
            return {}
        return {a.name: asdict(a) for a in self.state.assistants.store.list()}

    def tenancy(self) -> dict[str, Any]:
        """The tenant key and owners rows (the ingress carries what a request needs to its replica)."""
        return mirror.snapshot(self.state.tenants)

    def fetch(self, name: str, version: int) -> dict[str, Any]:
        """The files of (name, version), its sha256 and record; travels through Ray's object store."""
        from adapters_store.loader import KNOWN_FILES

        rec = self.state.store.record(name, version)  # AdapterError 404 when pruned or deleted
        path = rec.path
        files = {n: (path / n).read_bytes() for n in KNOWN_FILES if (path / n).is_file()}
        return {"files": files, "sha256": rec.sha256, "record": rec.to_dict()}

    async def http(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any] | bytes]:
        async for item in stream_asgi(self.app, req["method"], req["path"], req["query"], req["headers"],
                                      req["body"]):
            if isinstance(item, dict):
                item["headers"].append((REPLICA_HEADER, "writer"))
            yield item

    def report_metrics(self, replica: str, text: str, usage: dict[str, Any] | None = None) -> list[str] | None:
        """A replica's metrics and tenant usage counters; answers the ids of the keys that exist (the replica
        forgets any other it mirrored: a stream on a revoked key is cut there too)."""
        self.reports[replica] = (time.monotonic(), text)
        tenants = self.state.tenants
        if tenants is None:
            return None
        if usage:
            tenants.merge_usage(replica, usage)
        return sorted(tenants.keys.ids())

    def metrics(self, max_age_s: float = 30.0) -> dict[str, str]:
        """The latest report of every replica heard from in the last `max_age_s` seconds."""
        now = time.monotonic()
        return {r: t for r, (at, t) in self.reports.items() if now - at <= max_age_s}

    def __del__(self) -> None:
        if getattr(self, "state", None) is not None:
            _stop_state(self.state)


# ------------------------------------------------------------------------------------------------ replica

@serve.deployment(name="Replica")
class Replica:
    """One engine on its own device, running the single-process server's app."""

    async def __init__(self, settings: dict[str, Any], writer: DeploymentHandle, max_models: int) -> None:
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.local = Path(tempfile.mkdtemp(prefix=f"peftserve-replica-{self.replica_id}-"))
        # its own store dir: a cache of what the writer holds, filled on demand (nothing is shared on disk)
        s = _settings(settings, adapters_dir=str(self.local / "store"))
        self.state, self.app = await asyncio.to_thread(_start_state, s)
        self.writer = writer
        self.fetched = 0  # versions fetched from the writer (tests, metrics)
        self._locks: dict[str, asyncio.Lock] = {}

        async def load(model_id: str) -> _Token:
            return _Token(model_id)  # the version itself was made current by _ensure before the request

        self._load = load  # Serve keeps its multiplexing state (the held model ids) on this function
        self._mux = serve.multiplexed(max_num_models_per_replica=max_models)(load)
        self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        while True:
            try:
                text = self.state.metrics.render().decode()
                tenants = self.state.tenants
                usage = tenants.usage_rows() if tenants is not None else None
                live = await self.writer.report_metrics.remote(self.replica_id, text, usage)
                if live is not None:
                    mirror.prune(tenants, live)
            except Exception:  # noqa: BLE001 - the writer restarting must not stop the replica
                log.debug("metrics push failed", exc_info=True)
            await asyncio.sleep(METRICS_PUSH_S)

    async def _ensure(self, name: str, want: Any) -> None:
        """Make the registry match the catalogue for `name` before a request on it starts."""
        reg = self.state.registry
        if want == "static":
            return
        if want is None:  # deleted (or never existed): forget any version we hold
            e = reg.entry(name)
            if e is not None and e.stored:
                reg.remove(name)
            return
        version, sha = int(want[0]), str(want[1])
        e = reg.entry(name)
        if e is not None and e.stored and e.version >= version:
            return
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            e = reg.entry(name)
            if e is not None and e.stored and e.version >= version:
                return
            got = await self.writer.fetch.remote(name, version)
            path = await asyncio.to_thread(self._write_verified, name, version, sha, got)
            e = reg.entry(name)
            if e is None or not e.stored or e.version < version:  # never step back to an older version
                reg.register(name, version, path, got["record"])
            self.fetched += 1

    def _write_verified(self, name: str, version: int, sha: str, got: dict[str, Any]) -> Path:
        from adapters_store.store import content_sha256

        final = self.local / "fetched" / name / f"v{version}"
        if final.is_dir() and content_sha256(final)[0] == sha:
            return final
        tmp = self.local / "fetched" / ".tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        for fname, data in got["files"].items():
            (tmp / os.path.basename(fname)).write_bytes(data)
        digest, _ = content_sha256(tmp)
        if digest != sha or got["sha256"] != sha:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"adapter {name!r} v{version}: fetched bytes hash to {digest}, the catalogue says "
                               f"{sha}; not loaded")
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        return final

    def _mirror_assistant(self, name: str, row: dict[str, Any] | None) -> None:
        """Make this replica's copy of assistant `name` the writer's row (None: it no longer exists)."""
        from adapters_store.assistants import Assistant

        if self.state.assistants is None:
            return
        store = self.state.assistants.store
        have = store.get(name)
        if row is None:
            if have is not None and have.name == name:
                store.delete(have.id)
            return
        want = Assistant(**row)
        if have != want:
            store.mirror(want)

    async def http(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any] | bytes]:
        want: dict[str, Any] = req.get("want") or {}
        try:
            mirror.apply(self.state.tenants, req.get("tenancy"))  # the request's key and owners, as the writer has them
            for name, row in (req.get("assistants") or {}).items():
                self._mirror_assistant(name, row)
            for name, w in want.items():
                await self._ensure(name, w)
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self._mux(model_id)  # Serve's bookkeeping: this replica now holds model_id
        except Exception as e:  # noqa: BLE001 - the client gets the reason in OpenAI's shape
            log.exception("preparing adapters failed")
            body = json.dumps({"error": {"message": f"replica could not load the adapter: {e}",
                                         "type": "server_error", "param": "model",
                                         "code": "adapter_load_failed"}}).encode()
            yield {"status": 503, "headers": [("content-type", "application/json"),
                                               (REPLICA_HEADER, self.replica_id)]}
            yield body
            return
        async for item in stream_asgi(self.app, req["method"], req["path"], req["query"], req["headers"],
                                      req["body"]):
            if isinstance(item, dict):
                item["headers"].append((REPLICA_HEADER, self.replica_id))
            yield item

    def info(self) -> dict[str, Any]:
        """This replica's id, pid and counters (tests, bench)."""
        wrapper = getattr(self._load, "__serve_multiplex_wrapper", None)
        return {"replica": self.replica_id, "pid": os.getpid(), "fetched": self.fetched,
                "slot_loads": self.state.engine.stats().slot_loads,
                "models": sorted(getattr(wrapper, "models", None) or ())}  # the ids Serve routes here by

    def __del__(self) -> None:
        if getattr(self, "_pusher", None) is not None:
            self._pusher.cancel()
        if getattr(self, "state", None) is not None:
            _stop_state(self.state)
        if getattr(self, "local", None) is not None:
            shutil.rmtree(self.local, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ ingress

async def _sse_tail(gen: Any, dead: tuple[type[BaseException], ...]) -> AsyncIterator[bytes]:
    try:
        async for c in gen:
            yield c
    except dead as e:  # tokens were sent already: end the stream with an error event
        err = {"error": {"message": f"the replica serving this request died: {type(e).__name__}",
                         "type": "server_error", "param": None, "code": "replica_died"}}
        yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode()


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None, "code": code}},
                        status_code=status)


ingress_app = FastAPI(title="peftserve (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)
_HOP = {"content-length", "transfer-encoding", "connection"}


def _asgi_request(request: Request, body: bytes) -> dict[str, Any]:
    """What `http` of a writer or replica replays through its ASGI app (`server/ray/asgi.py`)."""
    return {"method": request.method, "path": request.url.path, "query": request.url.query.encode(),
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()],
            "body": body}


@serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=1024)
@serve.ingress(ingress_app)
class Ingress:
    async def __init__(self, replica: DeploymentHandle, writer: DeploymentHandle, affinity: bool = True) -> None:
        self.replica, self.writer, self.affinity = replica, writer, affinity
        self.base_name = await writer.base_name.remote()
        self.catalog: dict[str, Any] = {}
        self.assistants: dict[str, Any] = {}  # name -> the writer's row
        self.tenancy: dict[str, Any] = mirror.snapshot(None)  # the writer's tenant keys and owners rows
        await self._refresh()
        self.retried = 0

    async def _refresh(self) -> None:
        self.catalog, self.assistants, self.tenancy = await asyncio.gather(
            self.writer.catalog.remote(), self.writer.assistants.remote(), self.writer.tenancy.remote())

    def _assistant(self, model: Any) -> tuple[dict[str, Any], Any]:
        """For a model id that is no adapter and not the base: {model: its assistant row, or None}, and the
        model the assistant stands for (its adapter, or the base)."""
        if not isinstance(model, str) or not model or model == self.base_name or model in self.catalog:
            return {}, model
        row = self.assistants.get(model)
        return {model: row}, (row["model"] if row is not None else model)

    def _want(self, body: bytes) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
        """The adapters a generate request names (model, adapters[].name) -> what each must be; the
        multiplexed id; the assistant it names ({name: row or None}), which the replica mirrors first."""
        try:
            data = json.loads(body)
        except ValueError:
            return {}, None, {}
        if not isinstance(data, dict):
            return {}, None, {}
        names: list[str] = []
        assistant, model = self._assistant(data.get("model"))
        if isinstance(model, str) and model and model != self.base_name:
            names.append(model)
        for a in data.get("adapters") or []:
            if isinstance(a, dict) and isinstance(a.get("name"), str):
                names.append(a["name"])
        want = {n: self.catalog.get(n) for n in names}
        mid = None
        if isinstance(model, str) and isinstance(want.get(model), list):
            mid = f"{model}@{want[model][0]}"
        elif isinstance(model, str) and want.get(model) == "static":
            mid = model
        return want, mid, assistant

    @ingress_app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @ingress_app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        """Every replica's metrics merged (a `replica` label), through the writer's app: a tenant key sees only
        its own series and `--metrics-require-key` closes it, as on a single server."""
        return await self._relay(self.writer.options(stream=True).http, _asgi_request(request, b""), retry=False)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        fwd = _asgi_request(request, body)
        p = request.url.path
        if p.startswith(WRITER_PREFIXES) or p in ("/v1/evals",):
            resp = await self._relay(self.writer.options(stream=True).http, fwd, retry=False)
            if request.method != "GET" and resp.status_code < 400:
                await self._refresh()  # read-your-writes: later requests carry the new versions (and keys)
            return resp
        mid = None
        if request.method == "POST" and p in GENERATE_PATHS:
            fwd["want"], mid, fwd["assistants"] = self._want(body)
            if any(w is None for w in fwd["want"].values()):
                # a name the catalogue lacks: an adapter a fine-tuning job (or another ingress) just stored, or
                # an assistant created through another ingress?
                await self._refresh()
                fwd["want"], mid, fwd["assistants"] = self._want(body)
            if not self.affinity or request.headers.get(NO_AFFINITY_HEADER) == "1":
                mid = None
        asst_ids = [row["id"] for row in (fwd.get("assistants") or {}).values() if row is not None]
        fwd["tenancy"] = mirror.payload(self.tenancy, request.headers.get("authorization"), fwd.get("want") or {},
                                        asst_ids)
        opts: dict[str, Any] = {"stream": True}
        if mid:
            opts["multiplexed_model_id"] = mid
        return await self._relay(self.replica.options(**opts).http, fwd, retry=True)

    async def _relay(self, method: Any, fwd: dict[str, Any], retry: bool) -> Response:
        """Forward; a replica that dies before it sent anything is retried (twice) on another one."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        dead = (ActorDiedError, ActorUnavailableError, RayActorError)
        attempts = 3 if retry else 1
        for attempt in range(attempts):
            gen = method.remote(fwd)
            try:
                head = await gen.__anext__()
            except dead as e:
                if attempt + 1 < attempts:
                    self.retried += 1
                    log.warning("replica died before answering; retrying (%s)", type(e).__name__)
                    continue
                return _error(503, f"the replica serving this request died: {type(e).__name__}",
                              "replica_died")
            headers = {k: v for k, v in head["headers"] if k.lower() not in _HOP}
            if headers.get("content-type", "").startswith("text/event-stream"):
                return StreamingResponse(_sse_tail(gen, dead), status_code=head["status"], headers=headers,
                                         media_type=None)
            chunks: list[bytes] = []
            try:
                async for c in gen:
                    chunks.append(c)
            except dead as e:
                if attempt + 1 < attempts:  # nothing reached the client yet: run it elsewhere
                    self.retried += 1
                    continue
                return _error(503, f"the replica serving this request died: {type(e).__name__}",
                              "replica_died")
            return Response(b"".join(chunks), status_code=head["status"], headers=headers)
        raise AssertionError("unreachable")

    @ingress_app.get("/_ray/info")
    async def info(self) -> dict[str, Any]:
        return {"catalog": self.catalog, "retried": self.retried, "affinity": self.affinity}


# ------------------------------------------------------------------------------------------------ build

def build_app(settings: Any, options: RayOptions | None = None) -> Any:
    """The Serve application for `settings` (a Settings or a dict of its fields) and the Ray options."""
    opts = (options or RayOptions()).validate()
    values = settings.model_dump() if hasattr(settings, "model_dump") else dict(settings)
    _settings(values)  # refuse bad values here, naming the flag, not inside a replica
    if opts.replica_gpus > 0:
        values["device"] = "cuda"
    elif values.get("device", "auto") == "auto":
        values["device"] = "cpu"
    max_models = opts.max_models_per_replica or 2 * (values.get("max_adapters") or 8)  # None: no cap (--adapter-memory)
    writer_actor: dict[str, Any] = {"num_cpus": opts.writer_cpus}
    if opts.writer_resource:
        writer_actor["resources"] = {opts.writer_resource: 0.01}
    writer = StoreWriter.options(ray_actor_options=writer_actor).bind(values)
    replica = Replica.options(**opts.replica_deployment_options()).bind(values, writer, max_models)
    return Ingress.options(ray_actor_options={"num_cpus": opts.ingress_cpus}).bind(replica, writer, opts.affinity)


def build(args: dict[str, Any]) -> Any:
    """Application builder for `serve run server.ray.app:build key=value ...` and Serve config files
    (`import_path: server.ray.app:build`, `args: {settings: {...}, ray: {replicas: 2, ...}}`)."""
    args = dict(args or {})
    settings = args.pop("settings", None) or {}
    ray_opts = args.pop("ray", None) or {}
    # flat `key=value` arguments of `serve run`: RayOptions fields first, the rest are settings
    for key, value in args.items():
        k = key.replace("-", "_")
        (ray_opts if k in RayOptions.__dataclass_fields__ else settings)[k] = value
    fields = RayOptions.__dataclass_fields__
    typed: dict[str, Any] = {}
    for k, v in ray_opts.items():
        if k not in fields:
            raise ValueError(f"unknown Ray option {k!r}; known: {', '.join(fields)}")
        typed[k] = _coerce(v, fields[k].default)
    return build_app(settings, RayOptions(**typed))


def _coerce(value: Any, default: Any) -> Any:
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float) or default is None:
        try:
            return int(value) if value.isdigit() else float(value)
        except ValueError:
            return value
    return value


def options_dict(opts: RayOptions) -> dict[str, Any]:
    return asdict(opts)
