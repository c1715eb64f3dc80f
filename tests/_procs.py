"""Process helpers shared by the tests that start real drivers: find and reap a whole session, and read
the sockets its processes listen on.

A driver started with `start_new_session=True` leads a session; Ray's workers move to their own
process groups but stay in that session, so the session id is what finds all of them.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import time
from pathlib import Path
from typing import Iterable


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


def descendants(root: int) -> set[int]:
    """`root` and every process below it (from the parent ids in /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo += children.get(pid, [])
    return out


# ------------------------------------------------------------------ sockets, read from /proc
def _ip(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def _bound_sockets() -> dict[int, tuple[str, str, int]]:
    """inode -> (protocol, address, port) of every listening TCP and bound UDP socket in this network namespace."""
    out = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/net/{proto}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            f = line.split()
            addr, port = f[1].split(":")
            listening = f[3] == "0A" if proto.startswith("tcp") else f[3] == "07"
            if listening and int(port, 16):
                out[int(f[9])] = (proto, str(_ip(addr)), int(port, 16))
    return out


def listeners(pids: Iterable[int]) -> list[tuple[int, str, str, int]]:
    """(pid, protocol, address, port) of the TCP sockets listening and UDP sockets bound in the given processes."""
    sockets, found = _bound_sockets(), []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in sockets:
                    found.append((pid, *sockets[inode]))
    return sorted(set(found))


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
