"""Units of work run in one SQLite commit group (kernel/group_commit.py), for the tests of what
the units of one group see of each other and what their commit writes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from alpes.kernel.db import Database


def in_one_commit_group(database: Database, units: list[Callable[[], object]], *, commits: bool = True) -> list:
    """Run each unit (a callable that opens its own `database.transaction`) in a thread of its own,
    all in one commit group, in no set order: a holder takes the turn first and gives it up once
    every unit waits for it, and the group takes newcomers long enough that none commits before
    the last. Returns what each unit returned, or the exception it raised, in the units' order.
    `commits`: the group is committed once (False: a unit may end it, and the holder's
    transaction with it)."""
    committer = database.committer
    assert committer is not None, "commit groups are SQLite's"
    window, committer.window = committer.window, 60.0
    batches = committer.batches
    inside, release = threading.Event(), threading.Event()
    results: list = [None] * len(units)
    held: list = []

    def hold() -> None:
        try:
            with database.transaction():
                inside.set()
                release.wait(30)
        except Exception as error:  # noqa: BLE001 - its group failed: checked below
            held.append(error)

    def run(i: int) -> None:
        try:
            results[i] = units[i]()
        except Exception as error:  # noqa: BLE001 - handed back to the test
            results[i] = error

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(30)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(units))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while committer._waiting < len(units):
            assert time.monotonic() < deadline, "the units did not all queue for the turn"
            time.sleep(0.005)
    finally:
        release.set()
    holder.join(30)
    for thread in threads:
        thread.join(60)
    committer.window = window
    if commits:
        assert not held and committer.batches == batches + 1, "the units did not commit as one group"
    return results
