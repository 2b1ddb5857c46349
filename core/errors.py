"""The one error taxonomy for everything a provider can do wrong.

Every adapter maps its client library's exceptions onto `ProviderError`; nothing else escapes an adapter.
The flags drive routing (retry or fall back?) and budgets (release the reservation or charge it?).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


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


@dataclass(frozen=True)
class ErrorTraits:
    retryable: bool
    """Trying again (here or at another provider) may succeed."""
    billable: bool
    """The provider may have charged for the attempt (fal may bill a 422; nobody bills a 5xx)."""
    counts_against_provider: bool
    """Says something about the provider's health (circuit breakers count it); validation and safety do not."""


ERROR_TRAITS: dict[ErrorClass, ErrorTraits] = {
    ErrorClass.AUTH: ErrorTraits(retryable=False, billable=False, counts_against_provider=True),
    ErrorClass.VALIDATION: ErrorTraits(retryable=False, billable=True, counts_against_provider=False),
    ErrorClass.SAFETY_REJECTED: ErrorTraits(retryable=False, billable=False, counts_against_provider=False),
    ErrorClass.RATE_LIMITED: ErrorTraits(retryable=True, billable=False, counts_against_provider=True),
    ErrorClass.QUOTA_EXCEEDED: ErrorTraits(retryable=True, billable=False, counts_against_provider=True),
    ErrorClass.UNAVAILABLE: ErrorTraits(retryable=True, billable=False, counts_against_provider=True),
    ErrorClass.TIMEOUT: ErrorTraits(retryable=True, billable=False, counts_against_provider=True),
    ErrorClass.BAD_RESPONSE: ErrorTraits(retryable=True, billable=False, counts_against_provider=True),
    ErrorClass.CANCELLED: ErrorTraits(retryable=False, billable=False, counts_against_provider=False),
}


class ProviderError(Exception):
    """A provider attempt failed. `error_class` says how; the message says what, for a person."""

    def __init__(
        self,
        error_class: ErrorClass,
        message: str,
        *,
        provider: str,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        reset_at: datetime | None = None,
        provider_request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message
        self.provider = provider
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

    @property
    def billable(self) -> bool:
        return self.traits.billable

    def __str__(self) -> str:
        code = f" (HTTP {self.status_code})" if self.status_code is not None else ""
        return f"{self.provider}: {self.error_class.value}{code}: {self.message}"


class ImagegateError(Exception):
    """Base for errors raised by core services (not providers)."""


class PermissionDenied(ImagegateError):
    """The actor's role does not allow this action."""


class NotFound(ImagegateError):
    """The thing asked for does not exist (or no longer does)."""


class InvalidInput(ImagegateError):
    """Input a person gave is wrong. `field_errors` maps a field path to a message they can act on."""

    def __init__(self, message: str, field_errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.field_errors = field_errors or {}
