"""A real local webhook receiver for the tests (a thread running http.server on a free port), and
the signature verifier the README shows, verbatim."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


# -- the README's verifier (README "Webhooks"), copied as a receiver would ----------------------------
def verify_alpes_signature(secret: str, header: str, body: bytes, tolerance: int = 300) -> bool:
    items = [part.split("=", 1) for part in header.split(",")]
    timestamp = next(v for k, v in items if k == "t")
    if abs(time.time() - int(timestamp)) > tolerance:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v) for k, v in items if k == "v1")


FAULTS = ("500", "timeout", "close")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: str  # "200", the fault played ("500", "timeout", "close"), or "truncated"

    @property
    def payload(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Answers each path's first requests with `faults` in turn (500, a reply slower than the
    sender's timeout, a connection closed with no reply), then 200. `down`: every request fails (500)."""

    faults: tuple[str, ...] = FAULTS
    slow_seconds: float = 1.0
    down: bool = False
    requests: list[Received] = field(default_factory=list)
    _seen: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if len(body) < length:
                    # The sender died mid-request (a kill -9 between its headers and its body): a
                    # receiver cannot verify a short body and never acts on it; nobody waits for
                    # an answer. Recorded, so a test can count it, but it plays no fault.
                    with receiver._lock:
                        receiver.requests.append(Received(self.path, dict(self.headers), body, "truncated"))
                    self.close_connection = True
                    return
                with receiver._lock:
                    n = receiver._seen.get(self.path, 0)
                    receiver._seen[self.path] = n + 1
                    play = "500" if receiver.down else (receiver.faults[n] if n < len(receiver.faults) else "200")
                    receiver.requests.append(Received(self.path, dict(self.headers), body, play))
                if play == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if play == "timeout":
                    time.sleep(receiver.slow_seconds)
                status = 500 if play == "500" else 200
                answer = b'{"ok": false}' if status == 500 else b'{"ok": true}'
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:  # the sender gave up (timeout): nobody to answer
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def whole(self, path: str | None = None) -> list[Received]:
        """Requests that arrived whole (to `path`), whatever they were answered, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.answered != "truncated" and (path is None or r.path == path)]

    def delivered(self, path: str | None = None) -> list[Received]:
        """Requests answered 200 (to `path`), in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.answered == "200" and (path is None or r.path == path)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
