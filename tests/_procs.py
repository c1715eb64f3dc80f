"""Process helpers shared by the tests that start real drivers: find and reap a whole session.

A driver started with `start_new_session=True` leads a session; Ray's workers move to their own
process groups but stay in that session, so the session id is what finds all of them.
"""
from __future__ import annotations

import os
import signal
import time


def session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (read from /proc/<pid>/stat)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[3]) == sid:
            out.append(int(d))
    return out


def reap(sid: int, grace: float = 0.0) -> None:
    """SIGKILL what is left of session `sid` after `grace` seconds (Ray workers outlive a killed driver)."""
    deadline = time.time() + grace
    while session_pids(sid) and time.time() < deadline:
        time.sleep(0.2)
    for _ in range(50):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
