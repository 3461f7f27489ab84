"""FastAPI app factory: routes, error shapes, operations middleware, metrics, engine lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api import assistants
from server.api.adapters import router as adapters_router
from server.api.errors import install_handlers
from server.api.fine_tuning import router as fine_tuning_router
from server.api.openai import router as openai_router
from server.api.ops import OpsMiddleware
from server.api.state import ServerState
from server.console import router as console_router
from server.evals.api import router as evals_router
from server.metrics import Metrics
from server.shutdown import FINAL_GRACE_S, shutdown_error
from server.tenants.api import router as tenants_router
from server.tenants.principal import principal_of


def create_app(state: ServerState) -> FastAPI:
    """One app per ServerState; each gets its own metrics registry."""
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        if state.finetune is not None:
            state.finetune.start()
        try:
            yield
        finally:
            if state.finetune is not None:  # a running job stops between micro-steps, marked failed
                state.finetune.shutdown(timeout=FINAL_GRACE_S)
            # The drain (server.shutdown) has ended every request by now; whatever is left (HTTP tasks
            # cancelled, an embedding server without the drain) ends with an error, not mid-step.
            state.engine.abort_all(shutdown_error(state.settings.shutdown_timeout))
            state.engine.stop(timeout=FINAL_GRACE_S)

    if state.metrics is None:
        state.metrics = _metrics(state)
    app = FastAPI(title="peftserve", version="0.1.0", lifespan=lifespan)
    app.state.peft = state
    install_handlers(app)
    app.add_middleware(OpsMiddleware, state=state)
    app.include_router(openai_router)
    app.include_router(adapters_router)
    app.include_router(fine_tuning_router)
    assistants.install(app, state)
    if not state.settings.no_ui:
        app.include_router(console_router)
    app.include_router(evals_router)  # POST /v1/evals (admin), GET /v1/evals/{id}
    app.include_router(tenants_router)  # /v1/keys (admin), /v1/usage
    if state.tenants is not None:
        state.tenants.install_metrics(state.metrics.registry)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """The model is loaded and the engine loop is stepping: not dead, and no step hung past
        --ready-step-timeout while requests wait."""
        peft = request.app.state.peft
        eng = peft.engine
        if not eng.alive:
            reason = f"engine stopped: {eng.dead!r}" if eng.dead is not None else "engine not running"
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        running_for, limit = eng.step_running_for(), peft.settings.ready_step_timeout
        if running_for > limit and eng.num_requests > 0:
            reason = (f"engine step running for {running_for:.1f} s with {eng.num_requests} requests waiting "
                      f"(--ready-step-timeout {limit:g})")
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        """Prometheus text format; gauges are sampled from the engine now."""
        peft = request.app.state.peft
        text = peft.metrics_text() if peft.metrics_text is not None else peft.metrics.render()
        if peft.tenants is not None:  # a tenant key sees only its own tenant's and adapters' series
            text = peft.tenants.filter_metrics(principal_of(request), text)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app


def _metrics(state: ServerState) -> Metrics:
    """Metrics fed by the engine, plus the registry's CPU tier and its catalogue (adapters on disk)."""
    m = Metrics(state.engine, max_adapters=state.settings.metrics_max_adapters)
    state.engine.observers.append(m)
    reg = state.registry
    if hasattr(reg, "num_cpu"):
        m.residency["cpu"] = lambda: reg.num_cpu
        m.tier_loads["cpu"] = lambda: reg.cpu_loads
        m.tier_evictions["cpu"] = lambda: reg.cpu_evictions
    m.residency["disk"] = lambda: len(reg.names())
    if state.composer is not None:
        from server.compose.metrics import CompositionCollector

        m.registry.register(CompositionCollector(state.composer))
    return m
