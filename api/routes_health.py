"""GET /api/health/live (the process answers) and GET /api/health (ready: the database answers; each provider's
mode, health and breaker). Neither needs a token: load balancers call them. Neither says anything secret."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api.deps import sessions
from common.errors import DatabaseUnavailable
from core.generation.dbexec import run_db
from core.generation.health import health_report

router = APIRouter(prefix="/api/health", tags=["health"])


@router.get("/live")
async def live() -> dict[str, str]:
    return {"status": "ok"}


def _readiness(factory: sessionmaker[Session]) -> dict[str, Any]:
    with factory() as session:
        session.execute(text("SELECT 1"))
        report = health_report(session)
    return {
        "status": "ok",
        "database": "ok",
        "providers": [
            {
                "provider": h.provider,
                "status": h.status.value,
                "mode": h.mode.value,
                "breaker": h.breaker.state.value,
                "reason": h.reason,
            }
            for h in report
        ],
    }


@router.get("", responses={503: {"description": "not ready: the database does not answer"}})
async def ready(factory: Annotated[sessionmaker[Session], Depends(sessions)]) -> JSONResponse:
    try:
        body = await run_db(_readiness, factory)
    except DatabaseUnavailable as down:
        return JSONResponse({"status": "unavailable", "database": str(down), "providers": []}, status_code=503)
    return JSONResponse(body)
