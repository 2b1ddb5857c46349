"""Prometheus metrics: this process's HTTP requests (count and latency by route template and status) and the
shared figures every replica reads from the database (spend, breakers, budgets, jobs: core.operations).

Scrape with an API token of an ADMIN or HERO (`authorization: {credentials: igt_...}` in the scrape config):
spend and budget names are staff information."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import acting_account, sessions
from core.generation.dbexec import run_db
from core.operations import OperationsSnapshot, operations_snapshot
from core.security import Actor

__all__ = ["HttpMetrics", "router"]

MICRO = 1_000_000
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class HttpMetrics:
    """ASGI middleware counting requests by method, route template (never the raw path: ids would explode the
    label set) and status, with a latency histogram.

    It runs on every request, so each label combination's child metric is looked up once and kept (the set is
    small: methods x route templates x statuses); `labels()` validates and locks on every call."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self._counted: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[tuple[str, str], Any] = {}
        self.requests = Counter(
            "imagegate_http_requests", "HTTP requests answered", ("method", "route", "status"), registry=registry
        )
        self.latency = Histogram(
            "imagegate_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ("method", "route"),
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = str(scope.get("method", "GET"))
            counted = self._counted.get((method, route, status))
            if counted is None:
                counted = self._counted[(method, route, status)] = self.requests.labels(method, route, str(status))
            timed = self._timed.get((method, route))
            if timed is None:
                timed = self._timed[(method, route)] = self.latency.labels(method, route)
            counted.inc()
            timed.observe(elapsed)


class _Snapshot(Collector):
    def __init__(self, snap: OperationsSnapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterable[GaugeMetricFamily]:
        spend = GaugeMetricFamily(
            "imagegate_spend_usd", "Actual spend in the current UTC day or month", labels=("provider", "mode", "period")
        )
        images = GaugeMetricFamily(
            "imagegate_images",
            "Images generated in the current UTC day or month",
            labels=("provider", "mode", "period"),
        )
        for figure in self.snap.spend:
            labels = (figure.provider, figure.mode, figure.period)
            spend.add_metric(labels, figure.actual_micro_usd / MICRO)
            images.add_metric(labels, figure.images)
        breakers = GaugeMetricFamily(
            "imagegate_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", labels=("provider",)
        )
        for provider, level in self.snap.breakers.items():
            breakers.add_metric((provider,), level)
        limit = GaugeMetricFamily("imagegate_budget_limit_usd", "Budget limit", labels=("budget", "mode"))
        spent = GaugeMetricFamily(
            "imagegate_budget_spent_usd", "Spent in the budget's period", labels=("budget", "mode")
        )
        held = GaugeMetricFamily(
            "imagegate_budget_reserved_usd", "Reserved by requests in flight", labels=("budget", "mode")
        )
        for use in self.snap.budgets:
            budget = (use.name, use.mode)
            limit.add_metric(budget, use.limit_micro_usd / MICRO)
            spent.add_metric(budget, use.spent_micro_usd / MICRO)
            held.add_metric(budget, use.reserved_micro_usd / MICRO)
        jobs = GaugeMetricFamily("imagegate_jobs", "Generation jobs by status", labels=("status",))
        for status, count in self.snap.jobs.items():
            jobs.add_metric((status,), count)
        return [spend, images, breakers, limit, spent, held, jobs]


router = APIRouter(tags=["operations"])


def _snapshot(factory: sessionmaker[Session], actor: Actor) -> OperationsSnapshot:
    with factory() as session:
        return operations_snapshot(session, actor)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(
    request: Request,
    actor: Annotated[Actor, Depends(acting_account)],
    factory: Annotated[sessionmaker[Session], Depends(sessions)],
) -> Response:
    """Prometheus text format: this process's HTTP metrics and the shared figures from the database."""
    snap = await run_db(functools.partial(_snapshot, factory, actor))
    shared = CollectorRegistry()
    shared.register(_Snapshot(snap))
    http: CollectorRegistry = request.app.state.http_registry
    return Response(generate_latest(http) + generate_latest(shared), media_type=CONTENT_TYPE_LATEST)
