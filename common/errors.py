"""The one error tree. Every error the product raises on purpose derives from `ImagegateError`.

The console, the CLI and the REST API each map these classes once (message, exit code, HTTP status):

    ImagegateError
    ├── InvalidInput        a person's input is wrong (field_errors say where)        CLI 2, HTTP 422
    ├── PermissionDenied    the actor may not do this (unknown, inactive, wrong role)  CLI 3, HTTP 403
    ├── AccountLocked       sign-in refused until `until` (too many wrong passwords)   CLI 3, HTTP 423
    ├── NotFound            the thing asked for does not exist                         CLI 4, HTTP 404
    ├── Conflict            a stale version or a race lost: reload and try again       CLI 5, HTTP 409
    ├── DatabaseUnavailable the database cannot be reached                             CLI 6, HTTP 503
    ├── BudgetExceeded      a hard budget has not enough left for the estimate         CLI 8, HTTP 402
    └── ProviderError       a provider attempt failed (error_class, billing facts)     CLI 7, HTTP 502

Provider errors carry the billing facts that budgets settle from: `billing` is decided per case by the adapter
that saw what happened (billed, not billed, or unknown), with the billed units the provider reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum


class ImagegateError(Exception):
    """Root of every error the product raises on purpose."""


class InvalidInput(ImagegateError):
    """Input a person gave is wrong. `field_errors` maps a field path to a message they can act on."""

    def __init__(self, message: str, field_errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.field_errors = field_errors or {}


class PermissionDenied(ImagegateError):
    """The actor may not do this: unknown, deactivated, or without the role (checked from the database)."""


class AccountLocked(ImagegateError):
    """Too many wrong passwords in a row: sign-in is refused until `until`, whatever the password."""

    def __init__(self, message: str, until: datetime) -> None:
        super().__init__(message)
        self.until = until


class NotFound(ImagegateError):
    """The thing asked for does not exist (or no longer does)."""


class Conflict(ImagegateError):
    """Someone else changed it first (a stale version, a lost race): reload, then try again."""


class DatabaseUnavailable(ImagegateError):
    """The database cannot be reached (server down, wrong URL, file not writable)."""


def _usd(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}${whole}.{fraction:06d}"


class BudgetExceeded(ImagegateError):
    """A hard budget refused a request: it has less left in this period than the request's estimate.

    Names the budget and its figures for the period (all in micro-dollars, in one mode: live or simulated)."""

    def __init__(
        self,
        *,
        budget_id: int,
        budget_name: str,
        mode: str,
        limit_micro_usd: int,
        spent_micro_usd: int,
        reserved_micro_usd: int,
        requested_micro_usd: int,
    ) -> None:
        self.budget_id = budget_id
        self.budget_name = budget_name
        self.mode = mode
        self.limit_micro_usd = limit_micro_usd
        self.spent_micro_usd = spent_micro_usd
        self.reserved_micro_usd = reserved_micro_usd
        self.requested_micro_usd = requested_micro_usd
        self.left_micro_usd = max(0, limit_micro_usd - spent_micro_usd - reserved_micro_usd)
        super().__init__(
            f"budget {budget_name!r} ({mode}) has {_usd(self.left_micro_usd)} left of {_usd(limit_micro_usd)} "
            f"(spent {_usd(spent_micro_usd)}, reserved {_usd(reserved_micro_usd)}); "
            f"this request needs {_usd(requested_micro_usd)}"
        )


class ErrorClass(StrEnum):
    AUTH = "auth"
    VALIDATION = "validation"
    SAFETY_REJECTED = "safety_rejected"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXCEEDED = "quota_exceeded"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    BAD_RESPONSE = "bad_response"
    CANCELLED = "cancelled"


class Billing(StrEnum):
    """Whether the provider charged for an attempt, as far as we can know."""

    BILLED = "billed"
    NOT_BILLED = "not_billed"
    UNKNOWN = "unknown"
    """We cannot tell (a paid job may be running, or the provider's documentation is silent): budgets hold the
    estimate until the attempt is reconciled."""


@dataclass(frozen=True)
class ErrorTraits:
    retryable: bool
    """Trying again (here or at another provider) may succeed."""
    counts_against_provider: bool
    """Says something about the provider's health (circuit breakers count it); validation and safety do not."""


ERROR_TRAITS: dict[ErrorClass, ErrorTraits] = {
    ErrorClass.AUTH: ErrorTraits(retryable=False, counts_against_provider=True),
    ErrorClass.VALIDATION: ErrorTraits(retryable=False, counts_against_provider=False),
    ErrorClass.SAFETY_REJECTED: ErrorTraits(retryable=False, counts_against_provider=False),
    ErrorClass.RATE_LIMITED: ErrorTraits(retryable=True, counts_against_provider=True),
    ErrorClass.QUOTA_EXCEEDED: ErrorTraits(retryable=True, counts_against_provider=True),
    ErrorClass.UNAVAILABLE: ErrorTraits(retryable=True, counts_against_provider=True),
    ErrorClass.TIMEOUT: ErrorTraits(retryable=True, counts_against_provider=True),
    ErrorClass.BAD_RESPONSE: ErrorTraits(retryable=True, counts_against_provider=True),
    ErrorClass.CANCELLED: ErrorTraits(retryable=False, counts_against_provider=False),
}


class ProviderError(ImagegateError):
    """A provider attempt failed. `error_class` says how; the message says what, for a person.

    `billing` is the adapter's decision for this case (never a property of the class), and `billed_units` are
    the units the provider reported before the failure (fal's megapixels, Ideogram's images), if any."""

    def __init__(
        self,
        error_class: ErrorClass,
        message: str,
        *,
        provider: str,
        billing: Billing,
        billed_units: Decimal | None = None,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        reset_at: datetime | None = None,
        provider_request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        if billed_units is not None and billing is Billing.NOT_BILLED:
            raise ValueError("an error with billed units cannot say it was not billed")
        self.error_class = error_class
        self.message = message
        self.provider = provider
        self.billing = billing
        self.billed_units = billed_units
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        """rate_limited: seconds the provider asked us to wait (Retry-After), when it said."""
        self.reset_at = reset_at
        """quota_exceeded: when the quota is back, when the provider said."""
        self.provider_request_id = provider_request_id

    @property
    def traits(self) -> ErrorTraits:
        return ERROR_TRAITS[self.error_class]

    @property
    def retryable(self) -> bool:
        return self.traits.retryable

    def __str__(self) -> str:
        code = f" (HTTP {self.status_code})" if self.status_code is not None else ""
        return f"{self.provider}: {self.error_class.value}{code}: {self.message}"
