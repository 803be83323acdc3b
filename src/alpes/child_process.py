"""One OS process run by `alpes up` (a service instance or the embedded broker): start, stop, restart."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console


def _terminate_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the supervisor dies (even by SIGKILL), so no
    orphan keeps the ports and the data directory busy. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    service: str = ""  # a service instance: its service, index and HTTP port ("" for the broker)
    index: int = 0
    port: int = 0
    cleared_for_pid: int | None = None  # the exit the embedded broker was already restarted for
    process: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    history: list[float] = field(default_factory=list)
    held_for: float | None = None  # stopped on purpose (`alpes hold`) for this many seconds ...
    held_until: float | None = None  # ... counted from its exit (monotonic)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            preexec_fn=_terminate_with_parent)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart_due(self, console: Console) -> bool:
        """For a process found exited: plan its restart and say whether it is time (then counted in
        `restarts`). Backs off when it keeps dying at once, not when it ran for a while."""
        now = time.monotonic()
        if self.next_start == 0.0:
            code = self.process.returncode if self.process else None
            quick = now - self.started_at < 10
            delay = min(10.0, 0.5 * (2 ** min(self.restarts, 5))) if quick else 0.2
            self.next_start = now + delay
            console.print(f"[yellow]{self.name} exited (code {code}); restarting in {delay:.1f}s[/]")
        if now < self.next_start:
            return False
        self.next_start = 0.0
        self.restarts += 1
        return True
