"""The FastAPI application: `create_app()` for uvicorn (`imagegate api`) and for tests.

    uvicorn api.app:create_app --factory        # or: imagegate api --port 8000

Each process opens the configured database (migrated and seeded as the console does), runs its own job worker
(api.runner) and answers every error as problem details (api.problems)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from api import metrics, routes_admin, routes_generate, routes_health
from api.limits import DEFAULT_MAX_BODY_BYTES, BodySizeLimit
from api.metrics import HttpMetrics
from api.problems import install_problem_handlers
from api.runner import JobRunner
from core.generation.service import AdapterFactory
from core.runtime import open_runtime

__all__ = ["create_app"]

API_VERSION = "1"


def create_app(
    factory: sessionmaker[Session] | None = None,
    *,
    adapters: AdapterFactory | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    job_concurrency: int = 64,
) -> FastAPI:
    """The API over `factory`'s database (default: the configured one, migrated and seeded on start)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sessions = factory if factory is not None else open_runtime().sessions
        runner = JobRunner(sessions, adapters=adapters, concurrency=job_concurrency)
        app.state.sessions = sessions
        app.state.runner = runner
        runner.start()
        try:
            yield
        finally:
            await runner.stop()

    app = FastAPI(
        title="Imagegate API",
        version=API_VERSION,
        summary="Image generation across providers, under the budgets and settings the admins set.",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.state.http_registry = CollectorRegistry()  # this process's own: Prometheus scrapes each replica
    app.add_middleware(HttpMetrics, registry=app.state.http_registry)
    app.include_router(routes_generate.router)
    app.include_router(routes_health.router)
    app.include_router(routes_admin.router)
    app.include_router(metrics.router)
    return app
