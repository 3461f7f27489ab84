"""FastAPI app factory: routes, error shapes, engine lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server.api.errors import install_handlers
from server.api.openai import router as openai_router
from server.api.state import ServerState


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        try:
            yield
        finally:
            state.engine.stop(timeout=state.settings.shutdown_timeout)

    app = FastAPI(title="peftserve", version="0.1.0", lifespan=lifespan)
    app.state.peft = state
    install_handlers(app)
    app.include_router(openai_router)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        """The model is loaded and the engine loop is stepping."""
        eng = request.app.state.peft.engine
        if eng.alive:
            return JSONResponse({"status": "ready"})
        reason = f"engine stopped: {eng.dead!r}" if eng.dead is not None else "engine not running"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    return app
