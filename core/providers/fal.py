"""fal.ai Qwen-Image (`fal-ai/qwen-image`) through fal-client's async queue API.

submit -> on_request_id -> poll status (queue position, logs) -> result -> download -> store. The request id
is handed out before any polling so a caller can persist it; `resume` collects a request submitted by another
process, `cancel` stops one.

fal-client is used unmodified, but its HTTP client is ours (a subclass overrides the cached `_client`):
- a transport rewrites fal's queue URLs to `AdapterConfig.base_url` (the emulator), instead of mutating
  fal_client's module globals, which would redirect every fal client in the process;
- it reads `x-fal-billable-units` off the result response (fal-client drops response headers);
- it turns the first 429 into RATE_LIMITED at once, with fal's Retry-After: fal-client ignores Retry-After and
  retries blindly for about 49 s, while a router with other providers should decide for itself;
- a connection refused before the provider ever answered is UNAVAILABLE at once (fal-client would retry for
  about 44 s): nothing was submitted, so failing over is safe;
- the submit POST is never sent twice. fal-client re-sends it after a broken connection or a gateway error,
  which can start a second paid job whose id nobody ever learns; once the POST's bytes may have reached fal, a
  failed submit ends the attempt instead, billing unknown. (A refused connection sent nothing: that one
  fal-client may retry.)

Once a job exists it is followed to its end within `AdapterRequest.timeout_s`. A failed status poll or result
fetch (a 503, a dropped connection) is retried with backoff: the paid job runs on whatever our connection does.
Whenever the attempt is abandoned while the job is queued or running (the deadline, the task cancelled, an
answer we cannot follow), the job is cancelled at fal, best effort, and the error keeps its request id for
recovery. `resume()` collects a job by id and never cancels it; `cancel()` does.

Billing, decided per case: nothing sent, or the submit refused -> not billed; a 422 -> unknown (fal documents
that a 422 "may" be billed); 5xx, cancellations and start timeouts -> not billed; a job we lost sight of while
it was queued or running -> unknown; a job that COMPLETED without error -> billed, with the
`x-fal-billable-units` fal reported, once the result was read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, TypeVar

import fal_client
import fal_client.client as fal_wire
import httpx
from asyncstdlib import cached_property as async_cached_property
from fal_client.auth import MissingCredentialsError

from common.errors import Billing, ErrorClass, ProviderError
from core.catalog import FAL_QWEN
from core.providers.base import (
    AdapterConfig,
    AdapterRequest,
    EventCallback,
    EventKind,
    HealthReport,
    ProgressEvent,
    ProviderAdapter,
    ProviderResult,
    RequestIdCallback,
    Stopwatch,
    Timings,
    Translation,
    checked_prompt,
    checked_values,
    emit,
    emit_event,
)
from core.providers.http_download import Billed, download_images, shared_ssl_context
from core.providers.http_headers import retry_after_seconds
from core.sizes import resolve_size

log = logging.getLogger(__name__)
T = TypeVar("T")

PROVIDER_ID = FAL_QWEN.id
APP_ID = "fal-ai/qwen-image"
LIVE_QUEUE_URL = "https://queue.fal.run/"
CONNECT_TIMEOUT_S = 5.0
"""A connect that takes longer than this is a dead host for our purposes (fal caps its own at 5 s too)."""
CANCEL_GRACE_S = 2.0
"""How long a best-effort cancel (after a deadline or a task cancellation) may add."""
MAX_POLL_BACKOFF_S = 5.0
"""The longest wait between two tries of a failed status poll or result fetch."""
HEALTH_TIMEOUT_S = 5.0
PROBE_REQUEST_ID = "00000000-0000-0000-0000-000000000000"
"""Never a real request id: its status answers 404 from a reachable queue that accepted our key."""
FAL_MIN_STEPS = 2
"""fal's API refuses fewer than 2 inference steps. The catalog allows 1 (other providers take it, and a fallback
may carry it), so a 1 is sent as 2, with a note. A wire fact, not a validation range."""

_RESULT_PATH = re.compile(r"/requests/([^/]+)$")
_RESENT_BY_FAL_CLIENT = frozenset({408, 409, 502, 503, 504})
"""Answers after which fal-client sends a request again on its own (the 5xx ones when they look like an
ingress error). For the submit we stop that: see the module doc."""
_START_TIMEOUTS = frozenset({"request_timeout", "startup_timeout"})
NOT_BILLED = Billed(Billing.NOT_BILLED)
UNKNOWN = Billed(Billing.UNKNOWN)


class _RateLimited(Exception):
    """Raised by the transport on a 429; not an httpx error, so fal-client does not retry it."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class _CallerFailed(Exception):
    """The caller's own on_request_id callback raised: re-raised as is, it says nothing about fal."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(str(original))
        self.original = original


class _Unreachable(Exception):
    """The host refused or timed out the connection before it had ever answered in this session."""


class _SubmitNotResent(Exception):
    """The submit failed after its bytes may have reached fal. Not an httpx error, so fal-client does not send
    it again. `cause` is the connection error, or fal's HTTP error answer."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause


class _Phase(StrEnum):
    SUBMITTING = "submitting"
    QUEUED = "queued"
    RUNNING = "running"
    FAILED = "failed"
    """fal reported COMPLETED with an error."""
    COMPLETED = "completed"
    """COMPLETED without an error: the output exists, and fal bills it."""
    DOWNLOADING = "downloading"


_WHERE = {
    _Phase.SUBMITTING: "while submitting",
    _Phase.QUEUED: "with the job last seen in fal's queue",
    _Phase.RUNNING: "with the job last seen running",
    _Phase.FAILED: "after the job failed, while reading why",
    _Phase.COMPLETED: "after the job completed, while fetching its result",
    _Phase.DOWNLOADING: "after the job completed, while downloading its images",
}
_ALIVE = frozenset({_Phase.QUEUED, _Phase.RUNNING})
"""Phases in which a paid job may still run on at fal: an attempt abandoned there cancels it."""


@dataclass
class _Attempt:
    """What one attempt (or one look-up) has seen so far; the billing facts of its errors follow from it."""

    request_id: str | None = None
    handle: fal_client.AsyncRequestHandle | None = None
    phase: _Phase = _Phase.SUBMITTING
    answered: bool = False
    """fal answered at least one status poll for this request id."""
    last_failure: str | None = None
    """The latest failed poll or fetch that no successful one followed."""
    billed_units: Decimal | None = None
    lookup: bool = False
    """cancel() and health probes: they cost nothing, whatever they find."""


def _detail_message(detail: Any) -> str:
    """fal's error `detail`: a string, or FastAPI's list of {loc, msg, type} for a 422."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = [str(p) for p in item.get("loc", []) if p != "body"]
                field = ".".join(loc) or "input"
                parts.append(f"{field}: {item.get('msg', 'invalid')}")
            else:
                parts.append(str(item))
        return "; ".join(parts) or "invalid input"
    return str(detail)


def _http_error(response: httpx.Response) -> fal_client.FalClientHTTPError:
    """fal-client's own error for an answer the transport has read (as fal-client would raise it)."""
    message: Any = response.text
    error_type = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = body.get("detail", response.text)
        error_type = body.get("error_type")
    return fal_client.FalClientHTTPError(
        message,
        response.status_code,
        dict(response.headers),
        response=response,
        error_type=error_type or response.headers.get("x-fal-error-type"),
    )


def _lost_submit(cause: BaseException) -> _SubmitNotResent:
    return _SubmitNotResent(
        f"the connection broke after the submit was sent ({type(cause).__name__}: {cause}); fal may have "
        "queued the job, so it was not sent again",
        cause,
    )


def _is_cancellation(status: int | None, error_type: str | None, message: str) -> bool:
    """fal reports a cancelled job three ways: an error type, HTTP 499, or a 400 saying so."""
    return (
        error_type == "request_cancelled"
        or status == 499
        or (status in (None, 400) and "cancelled" in message.lower())
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, fal_client.FalClientHTTPError):
        return f"HTTP {exc.status_code}: {_detail_message(exc.message)}"
    if isinstance(exc, _RateLimited):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def _passing(exc: BaseException, *, result: bool) -> bool:
    """Whether a failed status poll (or result fetch) is worth trying again: the job is not affected by it.

    A 5xx on the result that names an error type (or a start timeout) is the job's own failure, final."""
    if isinstance(exc, _RateLimited | httpx.TransportError | fal_client.FalClientTimeoutError):
        return True
    if isinstance(exc, fal_client.FalClientHTTPError):
        if exc.status_code in (408, 409):
            return True
        if exc.status_code >= 500:
            typed = exc.error_type or any(k.lower() == "x-fal-request-timeout-type" for k in exc.response_headers)
            return not (result and typed)
    return False


class _WatchedStream(httpx.AsyncByteStream):
    """A response body that tells the transport when reading it fails (a connection dropped mid-answer)."""

    def __init__(self, inner: httpx.AsyncByteStream, transport: _FalTransport, *, submit: bool) -> None:
        self.inner = inner
        self.transport = transport
        self.submit = submit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.inner:
                yield chunk
        except httpx.TransportError as exc:
            self.transport.last_transport_error = exc
            if self.submit:
                raise _lost_submit(exc) from exc
            raise

    async def aclose(self) -> None:
        await self.inner.aclose()


class _FalTransport(httpx.AsyncBaseTransport):
    """Routes fal's queue URLs to `base_url`, caps connect time, and watches responses (see module doc)."""

    def __init__(self, base_url: str | None) -> None:
        self.base_url = base_url.rstrip("/") + "/" if base_url else None
        # Live: fal's own transport, which falls back to its backup domains. Emulator: plain HTTP.
        # One SSL context per process (building one per transport cost tens of ms per call).
        plain = httpx.AsyncHTTPTransport(verify=shared_ssl_context())
        self.inner: httpx.AsyncBaseTransport = (
            plain if self.base_url else fal_wire.AsyncBackupDomainTransport(transport=plain)
        )
        self.reached = False
        self.submit_sent = False
        """A submit POST left this machine (its bytes may have reached fal)."""
        self.last_transport_error: Exception | None = None
        self.billable_units: dict[str, str] = {}

    def _route(self, request: httpx.Request) -> httpx.Request:
        if self.base_url is None:
            return request
        url = str(request.url)
        for prefix in {fal_wire.QUEUE_URL_FORMAT, LIVE_QUEUE_URL}:
            if url.startswith(prefix):
                target = httpx.URL(self.base_url + url[len(prefix) :])
                headers = request.headers.copy()
                headers["Host"] = target.netloc.decode("ascii")
                return httpx.Request(
                    request.method, target, headers=headers, stream=request.stream, extensions=request.extensions
                )
        return request

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request = self._route(request)
        submit = request.method == "POST"  # the only POST fal-client's queue API makes
        timeouts = dict(request.extensions.get("timeout", {}))
        connect = timeouts.get("connect")
        timeouts["connect"] = CONNECT_TIMEOUT_S if connect is None else min(connect, CONNECT_TIMEOUT_S)
        request.extensions["timeout"] = timeouts
        if submit:
            self.submit_sent = True
        try:
            response = await self.inner.handle_async_request(request)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # No connection, so nothing was sent: safe to fail over (or for fal-client to retry).
            self.last_transport_error = exc
            if submit:
                self.submit_sent = False
            if not self.reached:
                raise _Unreachable(
                    f"cannot connect to {request.url.netloc.decode()}: {exc or type(exc).__name__}"
                ) from exc
            raise
        except httpx.TransportError as exc:
            self.last_transport_error = exc
            if submit:
                raise _lost_submit(exc) from exc
            raise
        self.reached = True
        self.last_transport_error = None
        if isinstance(response.stream, httpx.AsyncByteStream):
            response.stream = _WatchedStream(response.stream, self, submit=submit)
        if response.status_code == 429:
            await response.aread()
            await response.aclose()
            try:
                body = response.json()
                detail = body.get("detail", response.text) if isinstance(body, dict) else response.text
            except ValueError:
                detail = response.text
            raise _RateLimited(
                f"rate limited: {_detail_message(detail) or 'HTTP 429'}",
                retry_after_seconds(response.headers.get("retry-after")),
            )
        if submit and response.status_code in _RESENT_BY_FAL_CLIENT:
            await response.aread()
            await response.aclose()
            error = _http_error(response)
            raise _SubmitNotResent(f"fal answered the submit with HTTP {response.status_code}", error)
        match = _RESULT_PATH.search(request.url.path)
        if request.method == "GET" and response.status_code == 200 and match:
            units = response.headers.get("x-fal-billable-units")
            if units is not None:
                self.billable_units[match.group(1)] = units
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class _FalClient(fal_client.AsyncClient):
    """fal-client's AsyncClient with our transport underneath; everything above HTTP is fal-client's own."""

    def __init__(self, key: str, transport: _FalTransport, default_timeout: float) -> None:
        super().__init__(key=key, default_timeout=default_timeout)
        self.transport = transport

    @async_cached_property(asyncio.Lock)
    async def _client(self) -> httpx.AsyncClient:
        auth = await self._auth
        return httpx.AsyncClient(
            transport=self.transport,
            headers={"Authorization": auth.header_value, "User-Agent": fal_wire.USER_AGENT},
            timeout=self.default_timeout,
        )


class FalQwenAdapter(ProviderAdapter):
    provider_id = PROVIDER_ID
    supports_resume = True
    supports_cancel = True

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)

    # -- translation ------------------------------------------------------------------------------------

    def translate(self, request: AdapterRequest) -> Translation:
        """Canonical parameters -> fal-ai/qwen-image input. Missing parameters take the catalog's defaults
        (not fal's, which differ: 30 steps and guidance 2.5), so what runs is what the product shows. Every
        value goes through the one validator against the catalog's ranges; InvalidInput names each one fal
        cannot take."""
        checked_prompt(FAL_QWEN, request.prompt)
        notes: list[str] = []
        params: dict[str, Any] = {
            name: spec.default for name, spec in FAL_QWEN.params.items() if spec.default is not None
        }
        for name, value in request.params.items():
            if name not in FAL_QWEN.params:
                if value is not None:
                    notes.append(f"{name} is not a {self.provider_id} parameter; ignored")
            elif value is not None:
                params[name] = value
        values = checked_values(FAL_QWEN, params, tuple(FAL_QWEN.params))

        wire: dict[str, Any] = {"prompt": request.prompt}
        size = resolve_size(FAL_QWEN, values["image_size"])  # the validator has resolved it once already
        wire["image_size"] = size.wire_value if size.form == "preset" else {"width": size.width, "height": size.height}
        if not size.exact:
            notes.append(size.note)
        steps = values["num_inference_steps"]
        if steps < FAL_MIN_STEPS:
            notes.append(f"num_inference_steps {steps} raised to {FAL_MIN_STEPS}, fal's minimum")
            steps = FAL_MIN_STEPS
        wire["num_inference_steps"] = steps
        for name in ("guidance_scale", "num_images", "seed", "negative_prompt"):
            if name in values:
                wire[name] = values[name]
        for name in ("enable_safety_checker", "sync_mode", "acceleration", "output_format"):
            wire[name] = values[name]
        return Translation(wire_params=wire, notes=tuple(notes))

    # -- plumbing -----------------------------------------------------------------------------------------

    def _key(self) -> str:
        key = (self.config.api_key or "").strip()
        if not key:
            raise ProviderError(
                ErrorClass.AUTH,
                "no fal key configured: set FAL_KEY (or FAL_KEY_ID and FAL_KEY_SECRET)",
                provider=self.provider_id,
                billing=Billing.NOT_BILLED,
            )
        return key

    @contextlib.asynccontextmanager
    async def _session(self, timeout_s: float) -> AsyncIterator[tuple[_FalClient, _FalTransport]]:
        """A fresh client per operation: httpx pools are tied to one event loop, and callers (Streamlit,
        the CLI) may run each operation in a new loop."""
        key = self._key()
        transport = _FalTransport(self.config.base_url)
        fal = _FalClient(key, transport, default_timeout=max(1.0, timeout_s))
        try:
            yield fal, transport
        finally:
            http = await fal._client
            await http.aclose()

    def _error(
        self,
        error_class: ErrorClass,
        message: str,
        attempt: _Attempt,
        billed: Billed,
        *,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        request_id: str | None = None,
    ) -> ProviderError:
        return ProviderError(
            error_class,
            message,
            provider=self.provider_id,
            billing=billed.billing,
            billed_units=billed.units,
            status_code=status_code,
            retry_after_s=retry_after_s,
            provider_request_id=attempt.request_id or request_id,
        )

    @staticmethod
    def _reported_units(attempt: _Attempt, transport: _FalTransport) -> Decimal | None:
        """The `x-fal-billable-units` fal sent with this request's result, once it did (and it was readable)."""
        raw = transport.billable_units.get(attempt.request_id or "")
        if attempt.billed_units is None and raw is not None:
            try:
                attempt.billed_units = Decimal(raw)
            except InvalidOperation:
                log.warning("fal sent an unreadable x-fal-billable-units %r for %s", raw, attempt.request_id)
                del transport.billable_units[attempt.request_id or ""]
        return attempt.billed_units

    @classmethod
    def _job_billing(cls, attempt: _Attempt, transport: _FalTransport) -> Billed:
        """The billing facts of an attempt that failed for a reason that says nothing about billing itself."""
        if attempt.lookup:
            return NOT_BILLED
        units = cls._reported_units(attempt, transport)
        if units is not None:
            return Billed(Billing.BILLED, units)
        if attempt.phase in (_Phase.COMPLETED, _Phase.DOWNLOADING):
            return Billed(Billing.BILLED)  # fal bills every successful output; it did not say how much
        if attempt.phase is _Phase.SUBMITTING and not transport.submit_sent:
            return NOT_BILLED
        return UNKNOWN

    def _map(self, exc: BaseException, attempt: _Attempt, transport: _FalTransport) -> ProviderError:
        """Every exception fal-client, httpx or a provider answer can raise, as a ProviderError whose billing
        follows from what the attempt had seen."""
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, _SubmitNotResent):
            if isinstance(exc.cause, fal_client.FalClientHTTPError):
                return self._map_http(exc.cause, attempt, transport)
            timed_out = isinstance(exc.cause, httpx.TimeoutException)
            return self._error(ErrorClass.TIMEOUT if timed_out else ErrorClass.UNAVAILABLE, str(exc), attempt, UNKNOWN)
        refused = NOT_BILLED if attempt.phase is _Phase.SUBMITTING else self._job_billing(attempt, transport)
        if isinstance(exc, _RateLimited):
            return self._error(
                ErrorClass.RATE_LIMITED, exc.message, attempt, refused, status_code=429, retry_after_s=exc.retry_after_s
            )
        if isinstance(exc, fal_client.FalClientHTTPError):
            return self._map_http(exc, attempt, transport)
        billed = self._job_billing(attempt, transport)
        if isinstance(exc, _Unreachable):
            return self._error(ErrorClass.UNAVAILABLE, str(exc), attempt, billed)
        if isinstance(exc, MissingCredentialsError):
            return self._error(ErrorClass.AUTH, f"no fal credentials: {exc}", attempt, NOT_BILLED)
        if isinstance(exc, fal_client.FalClientTimeoutError | httpx.TimeoutException | TimeoutError):
            return self._error(
                ErrorClass.TIMEOUT, f"fal did not answer in time ({exc or type(exc).__name__})", attempt, billed
            )
        if isinstance(exc, httpx.HTTPError):
            return self._error(
                ErrorClass.UNAVAILABLE, f"fal connection failed: {type(exc).__name__}: {exc}", attempt, billed
            )
        if isinstance(exc, ValueError | KeyError | TypeError | AttributeError):
            # JSONDecodeError is a ValueError; fal-client raises ValueError on a status it does not know.
            return self._error(
                ErrorClass.BAD_RESPONSE, f"unexpected answer from fal: {type(exc).__name__}: {exc}", attempt, billed
            )
        return self._error(ErrorClass.BAD_RESPONSE, f"fal call failed: {type(exc).__name__}: {exc}", attempt, billed)

    def _map_http(
        self, exc: fal_client.FalClientHTTPError, attempt: _Attempt, transport: _FalTransport
    ) -> ProviderError:
        """fal's HTTP error answers. The status decides billing where it says something about the job (a 5xx,
        a cancellation, a start timeout, a 422); otherwise a refused submit queued nothing, and a failure
        later on leaves the job's billing as the attempt saw it."""
        status = exc.status_code
        message = _detail_message(exc.message)
        headers = {k.lower(): v for k, v in exc.response_headers.items()}
        error_type = exc.error_type or ""
        request_id = headers.get("x-fal-request-id")
        if attempt.lookup:
            default = NOT_BILLED
        elif attempt.phase is _Phase.SUBMITTING:
            default = NOT_BILLED  # fal answered the submit with an error: no job was queued
        else:
            default = self._job_billing(attempt, transport)

        def fail(error_class: ErrorClass, text: str, billed: Billed, **kw: Any) -> ProviderError:
            return self._error(error_class, text, attempt, billed, status_code=status, request_id=request_id, **kw)

        if _is_cancellation(status, error_type, message):
            return fail(ErrorClass.CANCELLED, f"the fal request was cancelled: {message}", NOT_BILLED)
        if error_type in _START_TIMEOUTS or headers.get("x-fal-request-timeout-type"):
            # The job did not start (or finish) in the time fal was given: fal does not bill it.
            return fail(ErrorClass.TIMEOUT, f"fal {error_type or 'timeout'}: {message}", NOT_BILLED)
        if status in (401, 403):
            return fail(ErrorClass.AUTH, f"fal refused the key: {message}", default)
        if status == 422:
            # fal's pricing notes say a 422 "may" be billed; it does not say when, so nobody can know here.
            billed = NOT_BILLED if attempt.lookup else UNKNOWN
            return fail(ErrorClass.VALIDATION, f"fal rejected the input: {message}", billed)
        if status == 429:
            return fail(
                ErrorClass.RATE_LIMITED,
                f"rate limited: {message}",
                default,
                retry_after_s=retry_after_seconds(headers.get("retry-after")),
            )
        if status >= 500:
            kind = f" ({error_type})" if error_type else ""
            return fail(ErrorClass.UNAVAILABLE, f"fal failed{kind}: {message}", NOT_BILLED)  # 5xx is never billed
        if status == 408:
            return fail(ErrorClass.UNAVAILABLE, f"fal timed out reading the request: {message}", default)
        if status == 400:
            return fail(ErrorClass.VALIDATION, f"fal refused the request: {message}", default)
        return fail(ErrorClass.BAD_RESPONSE, f"unexpected HTTP {status} from fal: {message}", default)

    async def _cancel_quietly(self, handle: fal_client.AsyncRequestHandle) -> str:
        """Best-effort cancel of an abandoned job; what happened, for the error message."""
        try:
            await asyncio.wait_for(handle.cancel(), timeout=CANCEL_GRACE_S)
        except fal_client.FalClientHTTPError as exc:
            if exc.status_code == 400 and "ALREADY_COMPLETED" in (exc.response.text if exc.response else ""):
                log.warning("fal request %s completed before it could be cancelled", handle.request_id)
                return f"it completed before it could be cancelled: resume({handle.request_id!r}) collects it"
            log.warning("could not cancel fal request %s: %s", handle.request_id, _describe(exc))
            return f"cancelling it failed ({_describe(exc)}); its request id is kept for recovery"
        except Exception as exc:
            log.warning("could not cancel fal request %s: %s", handle.request_id, _describe(exc))
            return f"cancelling it failed ({_describe(exc)}); its request id is kept for recovery"
        return "cancelled at fal"

    async def _abandoned(self, failure: ProviderError, attempt: _Attempt, *, cancel: bool) -> ProviderError:
        """The error of an attempt we give up on: a job still queued or running is cancelled first (best
        effort), and the error says how that went and keeps the request id."""
        if not (cancel and attempt.handle is not None and attempt.phase in _ALIVE):
            return failure
        note = await self._cancel_quietly(attempt.handle)
        return ProviderError(
            failure.error_class,
            f"{failure.message}; {note}",
            provider=failure.provider,
            billing=failure.billing,
            billed_units=failure.billed_units,
            status_code=failure.status_code,
            retry_after_s=failure.retry_after_s,
            reset_at=failure.reset_at,
            provider_request_id=failure.provider_request_id or attempt.request_id,
        )

    def _deadline_error(self, timeout_s: float, attempt: _Attempt, transport: _FalTransport) -> ProviderError:
        """Why the deadline passed, from the facts as they were at that moment (before any cancel call, whose
        own answer must not replace them)."""
        where = _WHERE[attempt.phase]
        billed = self._job_billing(attempt, transport)
        cause = transport.last_transport_error
        failing = f"{type(cause).__name__}: {cause}" if cause is not None else attempt.last_failure
        if failing:
            return self._error(
                ErrorClass.UNAVAILABLE,
                f"fal kept failing {where}, until the {timeout_s:g}s deadline: {failing}",
                attempt,
                billed,
            )
        return self._error(ErrorClass.TIMEOUT, f"no result within {timeout_s:g}s ({where})", attempt, billed)

    # -- running ------------------------------------------------------------------------------------------

    async def generate(
        self,
        request: AdapterRequest,
        *,
        on_event: EventCallback | None = None,
        on_request_id: RequestIdCallback | None = None,
    ) -> ProviderResult:
        translation = self.translated(request)
        watch = Stopwatch()
        attempt = _Attempt()
        async with self._session(request.timeout_s) as (fal, transport):

            async def run() -> ProviderResult:
                # fal drops a request that has not started within this; it needs more than 1 s.
                start_timeout = request.timeout_s if request.timeout_s > 1 else None
                handle = await fal.submit(APP_ID, translation.wire_params, start_timeout=start_timeout)
                attempt.handle, attempt.request_id, attempt.phase = handle, handle.request_id, _Phase.QUEUED
                submit_s = watch.lap()
                try:
                    await emit(on_request_id, handle.request_id)
                except Exception as exc:
                    # The caller could not record the id: cancel rather than pay for an image nobody tracks.
                    await self._cancel_quietly(handle)
                    raise _CallerFailed(exc) from exc
                await emit_event(on_event, ProgressEvent(EventKind.SUBMITTED, self.provider_id, handle.request_id))
                return await self._follow(handle, attempt, transport, translation, watch, submit_s, on_event)

            return await self._bounded(run, request.timeout_s, attempt, transport, cancel_abandoned=True)

    async def resume(
        self,
        provider_request_id: str,
        request: AdapterRequest,
        *,
        on_event: EventCallback | None = None,
    ) -> ProviderResult:
        """Collect a job submitted earlier (by this process before a restart, or another one). It never cancels
        the job, whatever happens: stopping it is an explicit `cancel()`."""
        translation = self.translated(request)
        watch = Stopwatch()
        attempt = _Attempt(request_id=provider_request_id, phase=_Phase.QUEUED)
        async with self._session(request.timeout_s) as (fal, transport):

            async def run() -> ProviderResult:
                handle = await fal.get_handle(APP_ID, provider_request_id)
                attempt.handle = handle
                return await self._follow(handle, attempt, transport, translation, watch, 0.0, on_event)

            try:
                return await self._bounded(run, request.timeout_s, attempt, transport, cancel_abandoned=False)
            except ProviderError as err:
                if err.status_code == 404 and not attempt.answered:
                    raise self._error(
                        ErrorClass.VALIDATION,
                        f"fal knows no request {provider_request_id!r} (expired, never submitted, or sync_mode)",
                        attempt,
                        NOT_BILLED,  # a look-up: whatever happened to that request, this cost nothing
                        status_code=404,
                    ) from None
                raise

    async def _bounded(
        self,
        work: Callable[[], Awaitable[ProviderResult]],
        timeout_s: float,
        attempt: _Attempt,
        transport: _FalTransport,
        *,
        cancel_abandoned: bool,
    ) -> ProviderResult:
        """Run `work` within the deadline and map whatever escapes. A job left queued or running when we give
        up (the deadline, a failure we cannot follow, the task cancelled) is cancelled, best effort."""
        try:
            async with asyncio.timeout(timeout_s) as scope:
                return await work()
        except TimeoutError as exc:
            failure = (
                self._deadline_error(timeout_s, attempt, transport)
                if scope.expired()
                else self._map(exc, attempt, transport)
            )
            raise await self._abandoned(failure, attempt, cancel=cancel_abandoned) from exc
        except asyncio.CancelledError:
            # The caller stopped waiting (shutdown, a rerun): nobody will collect the job, so stop paying for it.
            if cancel_abandoned and attempt.handle is not None and attempt.phase in _ALIVE:
                await self._cancel_quietly(attempt.handle)
            raise
        except _CallerFailed as failed:
            raise failed.original from None
        except Exception as exc:
            failure = self._map(exc, attempt, transport)
            raise await self._abandoned(failure, attempt, cancel=cancel_abandoned) from exc

    async def _retrying(
        self,
        call: Callable[[], Awaitable[T]],
        attempt: _Attempt,
        *,
        what: str,
        result: bool,
    ) -> T:
        """`call` until it succeeds or fails for good; a failure that leaves the job untouched (see `_passing`)
        is tried again with backoff. The attempt's deadline bounds the whole."""
        failures = 0
        while True:
            try:
                value = await call()
            except Exception as exc:
                if not _passing(exc, result=result):
                    raise
                failures += 1
                attempt.last_failure = _describe(exc)
                delay = min(MAX_POLL_BACKOFF_S, max(self.config.poll_interval_s, 0.05) * 2**failures)
                if isinstance(exc, _RateLimited) and exc.retry_after_s is not None:
                    delay = max(delay, exc.retry_after_s)
                log.info(
                    "fal %s for %s failed (%s); trying again in %.1fs",
                    what,
                    attempt.request_id,
                    attempt.last_failure,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            attempt.last_failure = None
            return value

    async def _follow(
        self,
        handle: fal_client.AsyncRequestHandle,
        attempt: _Attempt,
        transport: _FalTransport,
        translation: Translation,
        watch: Stopwatch,
        submit_s: float,
        on_event: EventCallback | None,
    ) -> ProviderResult:
        request_id = handle.request_id
        queue_s = run_s = 0.0
        last_position: int | None = None
        seen_logs = 0

        def new_lines(logs: list[dict[str, Any]] | None) -> tuple[str, ...]:
            nonlocal seen_logs
            logs = logs or []
            if len(logs) < seen_logs:  # the provider restarted its log list
                seen_logs = 0
            fresh = tuple(str(item.get("message", "")) for item in logs[seen_logs:] if isinstance(item, dict))
            seen_logs = len(logs)
            return fresh

        async def poll() -> fal_client.Status:
            return await handle.status(with_logs=True)

        completed: fal_client.Completed
        while True:
            status = await self._retrying(poll, attempt, what="status poll", result=False)
            attempt.answered = True
            if isinstance(status, fal_client.Completed):
                completed = status
                break
            if isinstance(status, fal_client.Queued):
                if status.position != last_position:
                    last_position = status.position
                    await emit_event(
                        on_event,
                        # fal counts from 0 (= next to run); the product counts from 1.
                        ProgressEvent(
                            EventKind.QUEUED, self.provider_id, request_id, queue_position=status.position + 1
                        ),
                    )
            elif isinstance(status, fal_client.InProgress):
                lines = new_lines(status.logs)
                first = attempt.phase is not _Phase.RUNNING
                if first:
                    attempt.phase, queue_s = _Phase.RUNNING, watch.lap()
                if first or lines:
                    await emit_event(
                        on_event, ProgressEvent(EventKind.RUNNING, self.provider_id, request_id, logs=lines)
                    )
            await asyncio.sleep(self.config.poll_interval_s)

        if attempt.phase is _Phase.RUNNING:
            run_s = watch.lap()
        else:
            queue_s = watch.lap()
        if completed.error or completed.error_type:
            attempt.phase = _Phase.FAILED
            error = str(completed.error or "")
            if _is_cancellation(None, completed.error_type, error):
                raise self._error(
                    ErrorClass.CANCELLED, f"the fal request was cancelled: {error or completed.error_type}",
                    attempt, NOT_BILLED,
                )
            # The result answers with the HTTP status that says what failed (a 5xx, a 422, a timeout).
            log.info("fal request %s completed with error %s: %s", request_id, completed.error_type, error)
        else:
            attempt.phase = _Phase.COMPLETED

        async def fetch() -> Any:
            # What fal-client's `handle.get()` does after its own status loop, without that loop: the status was
            # just read as COMPLETED, and polling it again cost one more exchange with fal per image request.
            response = await fal_wire._async_maybe_retry_request(
                handle.client, "GET", handle.response_url, timeout=fal_wire.QUEUE_POLL_TIMEOUT
            )
            fal_wire._raise_for_status(response)
            return response.json()  # fal-client types it AnyJSON

        output = await self._retrying(fetch, attempt, what="result fetch", result=True)
        attempt.phase = _Phase.COMPLETED
        self._reported_units(attempt, transport)
        urls, seed, flags = self._parse_output(output, attempt, transport)
        if flags and all(flags):
            raise self._error(
                ErrorClass.SAFETY_REJECTED,
                f"fal's safety checker flagged {'the image' if len(flags) == 1 else f'all {len(flags)} images'}",
                attempt,
                self._job_billing(attempt, transport),  # flagged outputs were generated, and are billed
            )
        keep = [url for url, flagged in zip(urls, flags, strict=True) if not flagged]
        watch.lap()
        attempt.phase = _Phase.DOWNLOADING
        await emit_event(
            on_event,
            ProgressEvent(EventKind.DOWNLOADING, self.provider_id, request_id, message=f"{len(keep)} image(s)"),
        )
        images = await download_images(
            keep,
            provider=self.provider_id,
            timeout_s=self.config.download_timeout_s,
            billed=self._job_billing(attempt, transport),
            provider_request_id=request_id,
        )
        download_s = watch.lap()
        await emit_event(
            on_event,
            ProgressEvent(EventKind.COMPLETED, self.provider_id, request_id, logs=new_lines(completed.logs)),
        )
        return ProviderResult(
            provider=self.provider_id,
            images=images,
            seed=seed,
            provider_request_id=request_id,
            timings=Timings(submit_s, queue_s, run_s, download_s, watch.total()),
            translation=translation,
            billed_units=attempt.billed_units,
            mode=self.config.mode,
            nsfw_flags=tuple(flags),
            raw_metadata={
                "timings": output.get("timings"),
                "metrics": completed.metrics,
                "prompt": output.get("prompt"),
                "filtered_nsfw": sum(flags),
            },
        )

    def _parse_output(
        self, output: Any, attempt: _Attempt, transport: _FalTransport
    ) -> tuple[list[str], int | None, list[bool]]:
        """images[].url, seed and has_nsfw_concepts from fal's result, or BAD_RESPONSE saying what is off
        (billed: fal produced and billed an output, however unreadable)."""

        def bad(message: str) -> ProviderError:
            return self._error(ErrorClass.BAD_RESPONSE, message, attempt, self._job_billing(attempt, transport))

        if not isinstance(output, Mapping):
            raise bad(f"fal's result is not an object: {output!r:.200}")
        images = output.get("images")
        if not isinstance(images, list) or not images:
            raise bad("fal's result has no images")
        urls = []
        for i, image in enumerate(images):
            url = image.get("url") if isinstance(image, Mapping) else None
            if not isinstance(url, str) or not url:
                raise bad(f"fal's image {i} has no url")
            urls.append(url)
        seed = output.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise bad(f"fal's seed is not an integer: {seed!r}")
        raw_flags = output.get("has_nsfw_concepts") or []
        if not isinstance(raw_flags, list):
            raise bad("fal's has_nsfw_concepts is not a list")
        # Missing flags mean the checker said nothing about that image (it was off, or fal omitted them).
        flags = [bool(raw_flags[i]) if i < len(raw_flags) else False for i in range(len(urls))]
        return urls, seed, flags

    # -- cancel and health --------------------------------------------------------------------------------

    async def cancel(self, provider_request_id: str) -> None:
        """Ask fal to cancel a request. Raises VALIDATION if it already completed or fal does not know it.
        Its errors are about the look-up, which costs nothing: never billed."""
        lookup = _Attempt(request_id=provider_request_id, lookup=True)
        async with self._session(10.0) as (fal, transport):
            try:
                async with asyncio.timeout(10.0):
                    await fal.cancel(APP_ID, provider_request_id)
            except fal_client.FalClientHTTPError as exc:
                text = exc.response.text if exc.response is not None else ""
                if exc.status_code == 400 and "ALREADY_COMPLETED" in text:
                    raise self._error(
                        ErrorClass.VALIDATION,
                        f"fal request {provider_request_id} already completed; collect it with resume()",
                        lookup,
                        NOT_BILLED,
                        status_code=400,
                    ) from None
                if exc.status_code == 404:
                    raise self._error(
                        ErrorClass.VALIDATION,
                        f"fal knows no request {provider_request_id!r}",
                        lookup,
                        NOT_BILLED,
                        status_code=404,
                    ) from None
                raise self._map(exc, lookup, transport) from exc
            except TimeoutError as exc:
                raise self._error(
                    ErrorClass.TIMEOUT, "fal did not confirm the cancellation within 10s", lookup, NOT_BILLED
                ) from exc
            except ProviderError:
                raise
            except Exception as exc:
                raise self._map(exc, lookup, transport) from exc

    async def health_probe(self) -> HealthReport:
        """GET the status of a request id that cannot exist. A reachable queue that accepts the key answers
        404, which costs nothing; 401/403 means the key is refused; anything else is unhealthy."""
        started = time.monotonic()
        lookup = _Attempt(lookup=True)

        def report(ok: bool, detail: str, error_class: ErrorClass | None = None) -> HealthReport:
            return HealthReport(self.provider_id, ok, time.monotonic() - started, detail, error_class)

        target = self.config.base_url or LIVE_QUEUE_URL
        try:
            async with self._session(HEALTH_TIMEOUT_S) as (fal, transport):
                try:
                    async with asyncio.timeout(HEALTH_TIMEOUT_S):
                        await fal.status(APP_ID, PROBE_REQUEST_ID)
                except fal_client.FalClientHTTPError as exc:
                    if exc.status_code == 404:
                        return report(True, f"fal queue at {target} reachable and the key accepted")
                    err = self._map(exc, lookup, transport)
                    return report(False, err.message, err.error_class)
                except TimeoutError:
                    return report(False, f"no answer from {target} within {HEALTH_TIMEOUT_S:g}s", ErrorClass.TIMEOUT)
                except Exception as exc:
                    err = self._map(exc, lookup, transport)
                    return report(False, err.message, err.error_class)
        except ProviderError as err:
            return report(False, err.message, err.error_class)
        return report(False, f"{target} answered a status for a request that cannot exist", ErrorClass.BAD_RESPONSE)
