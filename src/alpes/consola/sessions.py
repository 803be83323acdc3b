"""Server-side sessions and their CSRF tokens.

The browser holds only a random 256-bit session id in the `alpes_consola` cookie (HttpOnly,
SameSite=Strict, Secure over https); the API key stays in this process's memory and reaches the
services from here. A session idle for longer than `idle_seconds` is gone, and so is every session
when the console restarts (signing in again is the price of never writing a key to disk).

Before signing in a visitor gets an anonymous session too: it carries the CSRF token of the sign-in
form (so a forged cross-site sign-in is refused like any other forged post); signing in replaces it
with a new id, so an id planted before sign-in is worth nothing after it.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

COOKIE = "alpes_consola"
IDLE_SECONDS = 30 * 60
# Anonymous sessions are cheap to make (one per sign-in page view): the store keeps at most this many
# sessions and drops the longest idle ones first when it is full.
MAX_SESSIONS = 20_000


def _token() -> str:
    return secrets.token_urlsafe(32)  # 256 random bits


@dataclass
class ConsoleSession:
    id: str
    csrf: str
    last_seen: float
    # Signed in: the role, and the key the services are called with (None: the protected local mode,
    # where the services treat an anonymous caller as the operator). Not signed in: role None.
    role: str | None = None
    key: str | None = field(default=None, repr=False)
    # Who, for the page header: the advertiser's or affiliate's id and name where known.
    tenant_id: str | None = None
    name: str | None = None
    local_mode: bool = False
    # Messages for the next page rendered (after a post and its redirect): (kind, text).
    flashes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def signed_in(self) -> bool:
        return self.role is not None

    def csrf_matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


class SessionStore:
    """In memory, one per console process. Thread-safe: pages run in the event loop and in threads."""

    def __init__(self, idle_seconds: float = IDLE_SECONDS, clock: Callable[[], float] = time.monotonic,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self.idle_seconds = idle_seconds
        self.clock = clock
        self.max_sessions = max_sessions
        self._sessions: dict[str, ConsoleSession] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str | None) -> ConsoleSession | None:
        """The live session of this id (its idle clock restarted), or None if unknown or expired."""
        if not session_id:
            return None
        now = self.clock()
        with self._lock:
            found = self._sessions.get(session_id)
            if found is None:
                return None
            if now - found.last_seen > self.idle_seconds:
                del self._sessions[session_id]
                return None
            found.last_seen = now
            return found

    def start(self) -> ConsoleSession:
        """A new anonymous session (the sign-in form's CSRF token)."""
        return self._add(ConsoleSession(id=_token(), csrf=_token(), last_seen=self.clock()))

    def sign_in(self, previous: ConsoleSession | None, *, role: str, key: str | None, tenant_id: str | None = None,
                name: str | None = None, local_mode: bool = False) -> ConsoleSession:
        """Replace `previous` (the anonymous session) with a signed-in one under a new id and token."""
        if previous is not None:
            self.drop(previous.id)
        return self._add(ConsoleSession(id=_token(), csrf=_token(), last_seen=self.clock(), role=role, key=key,
                                        tenant_id=tenant_id, name=name, local_mode=local_mode))

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _add(self, session: ConsoleSession) -> ConsoleSession:
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                self._evict()
            self._sessions[session.id] = session
        return session

    def _evict(self) -> None:
        """Expired sessions go; if still full, the longest idle tenth (anonymous ones first)."""
        now = self.clock()
        for sid in [s.id for s in self._sessions.values() if now - s.last_seen > self.idle_seconds]:
            del self._sessions[sid]
        if len(self._sessions) >= self.max_sessions:
            oldest = sorted(self._sessions.values(), key=lambda s: (s.signed_in, s.last_seen))
            for s in oldest[: max(1, self.max_sessions // 10)]:
                del self._sessions[s.id]
