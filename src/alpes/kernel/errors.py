"""Domain errors: what the domain and its handlers raise when they refuse something.

They know nothing of HTTP. Each names the field it is about (None: the request as a whole) and
the reason; only the HTTP edge (`kernel.http`) turns them into a status and the one error shape,
and a consumer that meets one handles it as a business outcome, never as an HTTP answer.
"""

from __future__ import annotations


class DomainError(Exception):
    """A refusal by the domain: the field it is about and why."""

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


class NotFound(DomainError):
    """The thing named does not exist (or is not visible to the caller)."""


class Conflict(DomainError):
    """The request is valid but conflicts with the current state (a transition not allowed,
    a duplicate, a concurrent change)."""


class RuleViolated(DomainError):
    """The request breaks a rule of the domain on its own terms (fields that go together, a
    range inverted, a rule that needs a parameter it lacks)."""


class NotAllowed(DomainError):
    """The caller may use the operation but not on this (another tenant's campaign, a higher role's
    key). Where saying so would reveal that the thing exists, raise NotFound instead."""
