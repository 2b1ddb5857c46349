"""Database work from async code: a bounded thread pool, so the event loop never waits on the database.

Public API:
- `await run_db(fn, *args, **kwargs)`: run a blocking function (a query, a service call) on the pool and await
  its result; exceptions come back as raised. The caller's context variables go with it.
- `await in_transaction(factory, fn)`: run `fn(session)` inside `db.engine.transaction(factory)` on the pool:
  one short unit of work, committed when `fn` returns, rolled back when it raises.
- `submit(fn, *args, **kwargs) -> concurrent.futures.Future`: the same without awaiting, for work that must
  run even when the awaiting task is cancelled (releasing a slot, leaving a queue; see `finish_even_if_cancelled`).
- `await finish_even_if_cancelled(future, cleanup)`: await a submitted future; if the awaiting task is
  cancelled first, `cleanup(result)` is submitted once the work is done, so what it took is given back.
- `await write_once(factory, fn, attempts=3)` (blocking: `write_once_sync`): `in_transaction` for a final write
  that must not be lost and is guarded so it cannot apply twice: a `DatabaseUnavailable` is retried a bounded
  number of times.
- `configure(max_workers)`, `max_workers()`, `pool_capacity(engine)`, `shutdown()`.

Database errors: the one place they are mapped. An `OperationalError` or `InterfaceError` from the driver
(SQLite's "database is locked" after its busy timeout, a dropped or refused PostgreSQL connection, a server
shutting down) or an invalidated connection comes back from `run_db`/`in_transaction` as
`common.errors.DatabaseUnavailable` (the cause chained), never as a raw SQLAlchemy error. Integrity errors and
programming errors are bugs or lost races with their own handling, and pass through unchanged.

Size: `IMAGEGATE_DB_THREADS` (default 15, at most 32). A thread holds at most one pooled connection at a
time, so the executor should be no larger than the engine's pool (`pool_capacity`; `db.engine.make_engine`
gives PostgreSQL 5 + 10 overflow, SQLite SQLAlchemy's QueuePool 5 + 10, hence the default 15): extra threads
would only queue on the pool while holding a thread. Requests beyond the executor's size queue in the
executor, in order, as coroutines: 1,000 requests in flight cost 1,000 awaiting tasks and at most 32 threads.

Decision: a bounded executor over the existing synchronous engine, not an async engine, because
- one code path for both databases: SQLite is the default and aiosqlite is not installed (it would itself run
  a thread per connection); psycopg has an async mode, but only for PostgreSQL;
- every service we call (settings, prices, budgets, usage, breakers, authz) is synchronous Session code
  shared with Streamlit and the CLI; an AsyncSession would need `run_sync` (greenlets) around each of them,
  or a second copy of each;
- our transactions are short (a few indexed statements, well under a millisecond on SQLite), so handing one
  to a thread (~20-50 us) is cheap beside it, and the pool bound is what protects the database anyway.
Cancelling a task that awaits `run_db` does not stop the work already running in a thread (nothing can stop
a statement safely from outside): the transaction still commits or rolls back on its own. Work that takes
something (a slot) must therefore be paired with its give-back (`finish_even_if_cancelled`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, exc
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import QueuePool

from common.errors import DatabaseUnavailable
from db.engine import transaction

P = ParamSpec("P")
T = TypeVar("T")

ENV_THREADS = "IMAGEGATE_DB_THREADS"
DEFAULT_THREADS = 15
"""= the connections db.engine.make_engine's pool hands out at once (5 + 10 overflow)."""
MAX_THREADS = 32
THREAD_NAME_PREFIX = "imagegate-db"

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_executor_pid: int | None = None
_size: int | None = None


def _configured_size() -> int:
    raw = os.environ.get(ENV_THREADS, "").strip()
    if not raw:
        return DEFAULT_THREADS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV_THREADS} must be a whole number of threads (1-{MAX_THREADS}), not {raw!r}") from None
    if not 1 <= value <= MAX_THREADS:
        raise ValueError(f"{ENV_THREADS} must be between 1 and {MAX_THREADS}, not {value}")
    return value


def pool_capacity(engine: Engine) -> int | None:
    """How many connections `engine` hands out at once (pool size + overflow); None when it does not say
    (NullPool, StaticPool). `configure(min(MAX_THREADS, pool_capacity(engine)))` sizes the executor to it."""
    pool = engine.pool
    if isinstance(pool, QueuePool):
        overflow = pool._max_overflow  # no public accessor; -1 means unbounded
        return None if overflow < 0 else pool.size() + overflow
    return None


def configure(max_workers: int | None = None) -> None:
    """Set the executor's size (None: from `IMAGEGATE_DB_THREADS`). Work already submitted finishes on the old
    executor, which is shut down without waiting."""
    global _executor, _size
    size = _configured_size() if max_workers is None else max_workers
    if not 1 <= size <= MAX_THREADS:
        raise ValueError(f"the database executor takes 1-{MAX_THREADS} threads, not {size}")
    with _lock:
        old, _executor, _size = _executor, None, size
    if old is not None:
        old.shutdown(wait=False)


def max_workers() -> int:
    """The executor's size (configured, or from the environment)."""
    return _size if _size is not None else _configured_size()


def _pool() -> ThreadPoolExecutor:
    global _executor, _executor_pid
    executor = _executor
    if executor is not None and _executor_pid == os.getpid():
        return executor
    with _lock:
        # A forked child inherits the parent's executor object but none of its threads: make a new one.
        if _executor is None or _executor_pid != os.getpid():
            _executor = ThreadPoolExecutor(max_workers=max_workers(), thread_name_prefix=THREAD_NAME_PREFIX)
            _executor_pid = os.getpid()
        return _executor


def shutdown(wait: bool = True) -> None:
    """Stop the executor (a new one starts on the next call)."""
    global _executor
    with _lock:
        old, _executor = _executor, None
    if old is not None:
        old.shutdown(wait=wait)


def database_unavailable(error: exc.DBAPIError) -> DatabaseUnavailable | None:
    """The `DatabaseUnavailable` a driver error means, or None when it is not about the database being
    reachable or writable (an integrity or programming error)."""
    if not (error.connection_invalidated or isinstance(error, exc.OperationalError | exc.InterfaceError)):
        return None
    cause = error.orig if error.orig is not None else error
    lines = str(cause).strip().splitlines()
    reason = lines[0] if lines else type(cause).__name__
    return DatabaseUnavailable(f"the database could not complete the work: {reason}")


def _mapped(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except exc.DBAPIError as error:
        unavailable = database_unavailable(error)
        if unavailable is None:
            raise
        raise unavailable from error


def submit(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Future[T]:
    """Run `fn` on the database executor with the caller's context variables; returns its future. Database
    errors come back mapped (see the module docstring)."""
    context = contextvars.copy_context()
    return _pool().submit(context.run, _mapped, functools.partial(fn, *args, **kwargs))


async def run_db(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Await `fn(*args, **kwargs)` run on the database executor (never on the event loop's thread)."""
    return await asyncio.wrap_future(submit(fn, *args, **kwargs))


def _in_transaction(factory: sessionmaker[Session], fn: Callable[[Session], T]) -> T:
    with transaction(factory) as session:
        return fn(session)


async def in_transaction(factory: sessionmaker[Session], fn: Callable[[Session], T]) -> T:
    """Await `fn(session)` run inside one `db.engine.transaction(factory)` on the database executor."""
    return await run_db(_in_transaction, factory, fn)


WRITE_ATTEMPTS = 3
"""How often `write_once` tries a final write before it gives up (the caller leaves the work to recovery)."""
WRITE_BACKOFF_S = (0.05, 0.25)
"""Waits between those tries (SQLite's busy timeout already waited inside each one)."""


def write_once_sync(factory: sessionmaker[Session], fn: Callable[[Session], T], *, attempts: int = WRITE_ATTEMPTS) -> T:
    """`fn(session)` in one transaction, tried again when the database is unavailable, up to `attempts` times
    in all; the last `DatabaseUnavailable` is raised when every try failed. Blocking: run it on the pool
    (`write_once`, or `submit` for a write that must go on when its awaiting task is cancelled).

    Only for work that is guarded so it applies at most once (a guarded UPDATE ... WHERE finished_at IS NULL,
    a status transition): a try whose commit reached the database but whose answer was lost must find its work
    done on the next try and say so, not do it again. A failed try rolled back entirely (one transaction)."""
    if attempts < 1:
        raise ValueError("write_once needs at least one attempt")
    for number in range(attempts):
        try:
            return _mapped(functools.partial(_in_transaction, factory, fn))
        except DatabaseUnavailable:
            if number + 1 >= attempts:
                raise
            time.sleep(WRITE_BACKOFF_S[min(number, len(WRITE_BACKOFF_S) - 1)])
    raise AssertionError("unreachable")  # pragma: no cover


async def write_once(
    factory: sessionmaker[Session], fn: Callable[[Session], T], *, attempts: int = WRITE_ATTEMPTS
) -> T:
    """`write_once_sync` on the database executor."""
    return await run_db(write_once_sync, factory, fn, attempts=attempts)


async def finish_even_if_cancelled(future: Future[T], cleanup: Callable[[T], Any]) -> T:
    """Await `future`; if the awaiting task is cancelled, submit `cleanup(result)` once the work has finished
    (when it finished with a result), then re-raise the cancellation. The work itself is never abandoned
    half-way: it runs to its commit or rollback in its thread."""
    waited = asyncio.wrap_future(future)
    try:
        return await asyncio.shield(waited)
    except asyncio.CancelledError:
        # Nobody awaits `waited` any more: take its outcome so asyncio never logs it as unretrieved.
        waited.add_done_callback(lambda done: done.cancelled() or done.exception())

        def give_back(done: Future[T]) -> None:
            if done.cancelled() or done.exception() is not None:
                return
            submit(cleanup, done.result())

        future.add_done_callback(give_back)
        raise
