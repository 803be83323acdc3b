"""What `alpes bench` reports besides its measurements: progress, percentiles, the machine."""

from __future__ import annotations

import os
import platform
import sqlite3
import sys
import time
from importlib import metadata
from pathlib import Path


def say(message: str) -> None:
    """Progress, on stderr only (stdout carries the JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (no interpolation: a real sample)."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), int(-(-p * len(sorted_values) // 100))))
    return sorted_values[rank - 1]


def latency_summary_ms(seconds: list[float]) -> dict:
    values = sorted(s * 1000.0 for s in seconds)
    if not values:
        return {"count": 0}
    return {"count": len(values), "min": round(values[0], 1), "p50": round(percentile(values, 50), 1),
            "p95": round(percentile(values, 95), 1), "p99": round(percentile(values, 99), 1),
            "max": round(values[-1], 1), "mean": round(sum(values) / len(values), 1)}


def per_second(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict:
    memory_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_mb": memory_kb // 1024 if memory_kb else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "pulsar_client": _version("pulsar-client"),
        "pulsar_lite": _version("pulsar-lite"),
        "fastavro": _version("fastavro"),
    }


def cpu_seconds_from_stat(stat_text: str, ticks_per_second: int) -> float:
    """utime + stime of a process, from the text of /proc/<pid>/stat. The command name (field 2)
    is in parentheses and may hold spaces, so fields are counted after its closing one."""
    after_name = stat_text[stat_text.rindex(")") + 2:].split()
    # after_name[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(after_name[11]) + int(after_name[12])) / ticks_per_second


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds a running process has used so far (None when it is gone or not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return cpu_seconds_from_stat(text, os.sysconf("SC_CLK_TCK"))


class CpuMeter:
    """CPU seconds each named process spent between start() and stop()."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self.before: dict[str, float | None] = {}
        self.spent: dict[str, float | None] = {}

    def start(self) -> CpuMeter:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        return self

    def stop(self) -> dict[str, float | None]:
        for name, pid in self.pids.items():
            now, then = cpu_seconds(pid), self.before.get(name)
            # None: the process went away (restarted) during the measurement.
            self.spent[name] = None if now is None or then is None else round(now - then, 3)
        return self.spent

    def per_thousand(self, count: int) -> dict[str, float | None]:
        return {name: (None if spent is None or count <= 0 else round(1000 * spent / count, 3))
                for name, spent in self.spent.items()}
