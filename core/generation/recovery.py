"""Crash recovery: collect what a dead process left running, settle its money exactly once.

`imagegate recover` runs it once; the worker runs it at start and then periodically.

A generation is in the hands of the process holding its lease (renewed every third of `LEASE_TTL_S` while it
runs). When a lease has expired, the process is gone (killed, crashed, its machine lost) and recovery takes
over, generation by generation, with `usage.take_over_generation` (one guarded UPDATE: of any number of
recovering processes exactly one gets each generation):

- An attempt that got a provider request id (stored before polling) from a provider that can resume (fal's
  queue): `adapter.resume(request id)` collects the finished, paid result; the images are stored and indexed,
  the attempt is finished as `recovered` with the actual cost from the billed units at ITS price version, the
  reservation it made is settled, and the generation succeeds. If the provider says the job failed, the
  attempt is finished with those billing facts (not billed: the reservation is released).
- An attempt without a request id, or at a provider that cannot resume: nobody can know what the provider
  did, so it is finished as `cancelled` with billing unknown (its estimate stays held until reconciled; a
  free provider's is released), and the generation fails, saying so.
- A generation with no unfinished attempt (its process died before an attempt started or between two) is
  closed as failed.
- Then `budgets.expire_stale` gives back reservations still open past their expiry (none should remain from
  the cases above; this is the net for anything else).

Exactly once, however many recover at the same time or race a slow original process: the attempt's end is
`usage.finish_attempt` (guarded by `finished_at IS NULL`) in the same transaction as the settlement, which is
rolled back when another process finished it first; each reservation hold closes by one guarded status change.
Only an attempt run in the same connection mode here (live, emulator, sandbox) is resumed: a recovery process
without the emulator's URL, say, leaves the emulator's attempts for one that has it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from common.errors import Billing, ErrorClass, ProviderError
from core import price_store
from core.generation import budgets, records, usage
from core.generation.dbexec import in_transaction, run_db
from core.generation.service import LEASE_TTL_S, AdapterFactory, default_factory, process_owner
from core.generation.settlement import Settlement, actual_cost
from core.providers.base import AdapterRequest, ProviderAdapter, ProviderResult
from core.providers.registry import build_adapter
from db.models import utcnow

__all__ = [
    "RESUME_TIMEOUT_S",
    "RecoveredAttempt",
    "RecoveryReport",
    "expire_stale_reservations",
    "recover",
    "recover_sync",
]

log = logging.getLogger(__name__)

RESUME_TIMEOUT_S = 120.0
"""How long recovery waits for one resumed job to finish at its provider."""
BATCH = 100


@dataclass(frozen=True)
class RecoveredAttempt:
    generation_id: str
    attempt_no: int
    provider: str
    outcome: str
    """collected | failed | abandoned | skipped | taken (another process finished it first)."""
    detail: str
    billing: str | None = None
    actual_micro_usd: int | None = None
    images: int = 0

    @property
    def line(self) -> str:
        cost = "" if self.actual_micro_usd is None else f", actual {self.actual_micro_usd} micro-USD"
        billed = "" if self.billing is None else f" [{self.billing}{cost}]"
        where = f"{self.generation_id} attempt {self.attempt_no} at {self.provider}"
        return f"{where}: {self.outcome}{billed}: {self.detail}"


@dataclass(frozen=True)
class RecoveryReport:
    attempts: tuple[RecoveredAttempt, ...] = ()
    generations_closed: tuple[str, ...] = ()
    """Generations with nothing left to collect, closed as failed."""
    reservations_expired: int = 0

    @property
    def collected(self) -> int:
        return sum(1 for a in self.attempts if a.outcome == "collected")

    @property
    def nothing_to_do(self) -> bool:
        return not self.attempts and not self.generations_closed and not self.reservations_expired

    def lines(self) -> list[str]:
        out = [a.line for a in self.attempts]
        out += [
            f"{g}: closed as failed (its process stopped before an attempt ran or between two)"
            for g in self.generations_closed
        ]
        if self.reservations_expired:
            out.append(f"{self.reservations_expired} expired reservation(s) given back")
        return out or ["nothing to recover"]


@dataclass
class _Recovery:
    factory: sessionmaker[Session]
    adapter_factory: AdapterFactory
    now: datetime
    lease_ttl: timedelta
    timeout_s: float
    owner: str = field(default_factory=process_owner)
    adapters: dict[str, ProviderAdapter] = field(default_factory=dict)

    def adapter(self, provider: str) -> ProviderAdapter:
        if provider not in self.adapters:
            self.adapters[provider] = self.adapter_factory(provider)
        return self.adapters[provider]

    async def close(self) -> None:
        for adapter in self.adapters.values():
            with contextlib.suppress(Exception):
                await adapter.aclose()

    def take(self, session: Session, generation_id: str) -> bool:
        return usage.take_over_generation(
            session, generation_id, lease_owner=self.owner, lease_expires_at=self.now + self.lease_ttl, now=self.now
        )

    async def attempt(self, pending: usage.PendingAttempt) -> RecoveredAttempt:
        def said(outcome: str, detail: str) -> RecoveredAttempt:
            return RecoveredAttempt(pending.generation_id, pending.attempt_no, pending.provider, outcome, detail)

        adapter = self.adapter(pending.provider)
        if adapter.mode.value != pending.mode:
            return said(
                "skipped",
                f"it ran in {pending.mode} mode and {pending.provider} is in {adapter.mode.value} mode here; "
                "recover from a process configured as the one that ran it",
            )
        request, _prompt = await run_db(self._request, pending)
        result: ProviderResult | None = None
        error: ProviderError | None = None
        if pending.provider_request_id and adapter.supports_resume:
            try:
                result = await adapter.resume(pending.provider_request_id, request)
            except ProviderError as exc:
                error = exc
        else:
            why = (
                "no provider request id was stored"
                if not pending.provider_request_id
                else (f"{pending.provider} cannot resume a request by id")
            )
            error = ProviderError(
                ErrorClass.CANCELLED,
                f"abandoned: the process running it ({pending.lease_owner or 'unknown'}) stopped before it "
                f"finished, and {why}; the provider may have run it",
                provider=pending.provider,
                billing=Billing.UNKNOWN,
                provider_request_id=pending.provider_request_id,
            )
        try:
            return await in_transaction(self.factory, lambda session: self._settle(session, pending, result, error))
        except _Taken:
            return said("taken", "another process finished this attempt first; nothing was counted here")

    def _request(self, pending: usage.PendingAttempt) -> tuple[AdapterRequest, str]:
        with self.factory() as session:
            _request, prompt = records.generation_request(session, pending.generation_id)
        return AdapterRequest(prompt=prompt, params=pending.effective_params, timeout_s=self.timeout_s), prompt

    def _settle(
        self,
        session: Session,
        pending: usage.PendingAttempt,
        result: ProviderResult | None,
        error: ProviderError | None,
    ) -> RecoveredAttempt:
        if pending.price_version_id is None:  # pragma: no cover - start_attempt refuses unpriced attempts
            raise ValueError(f"attempt {pending.attempt_id} has no price version")
        price = price_store.get_price_version(session, pending.price_version_id).price
        if result is not None:
            billing, units = Billing.BILLED, result.billed_units
        else:
            assert error is not None
            billing, units = error.billing, error.billed_units
        settlement: Settlement = actual_cost(
            price=price,
            billing=billing,
            billed_units=units,
            estimated_micro_usd=pending.estimated_micro_usd,
            params=pending.effective_params,
            mode=pending.mode,
        )
        seed = result.seed if result is not None else None
        images = [
            usage.ImageRecord(i.sha256, i.format, i.width, i.height, i.size_bytes, seed)
            for i in (result.images if result is not None else ())
        ]
        finished_at = utcnow()
        if result is not None:
            t = result.timings
            outcome = usage.AttemptOutcome(
                status="recovered",
                billing=settlement.billing,
                actual_micro_usd=settlement.actual_micro_usd,
                billed_units=settlement.billed_units,
                images_count=len(images),
                megapixels_micro=sum(i.width * i.height for i in images),
                queue_ms=_ms(t.queue_s),
                run_ms=_ms(t.run_s),
                download_ms=_ms(t.download_s),
                total_ms=_ms((finished_at - pending.started_at).total_seconds()),
                image_refs=[i.ref for i in images],
                finished_at=finished_at,
            )
        else:
            assert error is not None
            outcome = usage.AttemptOutcome(
                status="cancelled" if error.error_class is ErrorClass.CANCELLED else "failed",
                billing=settlement.billing,
                actual_micro_usd=settlement.actual_micro_usd,
                billed_units=settlement.billed_units,
                error_class=error.error_class.value,
                error_message=error.message,
                total_ms=_ms((finished_at - pending.started_at).total_seconds()),
                finished_at=finished_at,
            )
        # The lock order of every writer: budget periods, the attempt and its rollup, images, the generation.
        reservation = records.attempt_reservation(session, pending.generation_id, pending.started_at)
        if reservation is not None:
            budgets.settle(session, reservation, settlement.actual_micro_usd or 0, settlement.billing, now=self.now)
        if not usage.finish_attempt(session, pending.attempt_id, outcome):
            raise _Taken
        if images:
            existing = len(usage.generation_images(session, pending.generation_id))
            usage.record_images(
                session, pending.generation_id, pending.attempt_id, pending.user_id, images, first_position=existing
            )
        attempts = records.attempt_records(session, pending.generation_id)
        unknown = any(a.billing == Billing.UNKNOWN.value for a in attempts)
        cost = None if unknown else sum(a.actual_micro_usd or 0 for a in attempts)
        if result is not None:
            usage.finish_generation(
                session,
                pending.generation_id,
                status="succeeded",
                final_provider=pending.provider,
                final_cost_micro_usd=cost,
                now=finished_at,
            )
        elif not any(a.finished_at is None for a in attempts):
            assert error is not None
            usage.finish_generation(
                session,
                pending.generation_id,
                status="failed",
                final_provider=None,
                final_cost_micro_usd=cost,
                error_class=error.error_class.value,
                error_message=f"recovered after its process stopped: {error}",
                now=finished_at,
            )
        if result is not None:
            outcome_word = "collected"
        else:
            outcome_word = "abandoned" if error is not None and error.error_class is ErrorClass.CANCELLED else "failed"
        detail = (
            f"{len(images)} image(s) collected from request {pending.provider_request_id}"
            if result is not None
            else str(error)
        )
        return RecoveredAttempt(
            pending.generation_id,
            pending.attempt_no,
            pending.provider,
            outcome_word,
            detail,
            billing=settlement.billing.value,
            actual_micro_usd=settlement.actual_micro_usd,
            images=len(images),
        )

    def close_abandoned(self, session: Session, generation_id: str) -> bool:
        if not self.take(session, generation_id):
            return False
        attempts = records.attempt_records(session, generation_id)
        unknown = any(a.billing == Billing.UNKNOWN.value for a in attempts)
        cost = None if unknown else sum(a.actual_micro_usd or 0 for a in attempts)
        return usage.finish_generation(
            session,
            generation_id,
            status="failed",
            final_provider=None,
            final_cost_micro_usd=cost,
            error_class=ErrorClass.CANCELLED.value,
            error_message="abandoned: the process running it stopped before an attempt ran or between two attempts",
            now=self.now,
        )


class _Taken(Exception):
    """Another process finished the attempt first: this transaction rolls back."""


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(0, round(seconds * 1000))


def _pending(factory: sessionmaker[Session], now: datetime, limit: int) -> list[usage.PendingAttempt]:
    with factory() as session:
        return usage.pending_attempts(session, now, include_without_request_id=True, limit=limit)


def _abandoned(factory: sessionmaker[Session], now: datetime, limit: int) -> list[str]:
    with factory() as session:
        return records.abandoned_generations(session, now, limit=limit)


def expire_stale_reservations(factory: sessionmaker[Session], now: datetime | None = None) -> int:
    """Give back every reservation still open past its expiry (`budgets.expire_stale`, in short batches);
    returns how many. Blocking: from async code, through dbexec."""
    from db.engine import transaction

    now = now or utcnow()
    total = 0
    while True:
        with transaction(factory) as session:
            expired = budgets.expire_stale(session, now)
        total += expired
        if expired < budgets.EXPIRY_BATCH:
            return total


async def recover(
    factory: sessionmaker[Session] | None = None,
    *,
    now: datetime | None = None,
    adapters: AdapterFactory | None = None,
    lease_ttl_s: float = LEASE_TTL_S,
    timeout_s: float = RESUME_TIMEOUT_S,
    limit: int = BATCH,
    expire: bool = True,
) -> RecoveryReport:
    """Collect and settle what dead processes left (see the module docstring). `now` is the moment leases are
    judged against (default: the clock); `adapters` builds each provider's adapter (default: the registry's
    live/emulator/sandbox choice); at most `limit` attempts and `limit` generations per call."""
    sessions = factory if factory is not None else await run_db(default_factory)
    moment = now or utcnow()
    work = _Recovery(sessions, adapters or build_adapter, moment, timedelta(seconds=lease_ttl_s), timeout_s)
    done: list[RecoveredAttempt] = []
    closed: list[str] = []
    try:
        pending = await run_db(_pending, sessions, moment, limit)
        by_generation: dict[str, list[usage.PendingAttempt]] = {}
        for item in pending:
            by_generation.setdefault(item.generation_id, []).append(item)
        for generation_id, items in by_generation.items():
            took = await in_transaction(sessions, functools.partial(work.take, generation_id=generation_id))
            if not took and not await run_db(_is_finished, sessions, generation_id):
                continue  # another process took it over (or its owner renewed the lease) just now
            for item in sorted(items, key=lambda p: p.attempt_no):
                try:
                    done.append(await work.attempt(item))
                except Exception as exc:  # one broken attempt never stops the others' recovery
                    log.exception("recovering attempt %s of %s failed", item.attempt_no, generation_id)
                    done.append(
                        RecoveredAttempt(generation_id, item.attempt_no, item.provider, "skipped", f"error: {exc}")
                    )
        for generation_id in await run_db(_abandoned, sessions, moment, limit):
            if await in_transaction(sessions, functools.partial(work.close_abandoned, generation_id=generation_id)):
                closed.append(generation_id)
        expired = await run_db(expire_stale_reservations, sessions, moment) if expire else 0
    finally:
        await work.close()
    return RecoveryReport(tuple(done), tuple(closed), expired)


def _is_finished(factory: sessionmaker[Session], generation_id: str) -> bool:
    with factory() as session:
        return usage.get_generation(session, generation_id).finished


def recover_sync(factory: sessionmaker[Session] | None = None, **kwargs: Any) -> RecoveryReport:
    """`recover()` from synchronous code (the CLI)."""
    return asyncio.run(recover(factory, **kwargs))
