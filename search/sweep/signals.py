"""Every signal that would end the sweep driver ends it one way, whatever it is doing (issue 30).

SIGINT and SIGTERM were caught only inside Tune's loop; SIGHUP (a closed terminal), SIGQUIT, SIGUSR1/2 and
SIGPIPE (stdout piped into a reader that went away), and any signal during preflight, Ray's start, the
compaction or the end-of-sweep report, ended the driver without a message, with runs left RUNNING and the
local Ray's processes orphaned. `DriverSignals` is installed by `search.run` for the driver's whole life:

- inside Tune's loop (`stopping(abort)`), the first signal stops the tuner through its stopper (running
  trials are closed KILLED, `Interrupted`); a second one raises `Signalled` at once;
- anywhere else it raises `Signalled` (a KeyboardInterrupt, so no `except Exception` swallows it) in the
  main thread; the driver closes what it opened (the parent run KILLED), stops the Ray it started
  (`stop_ray`), and `search.run` prints one line and exits 128 + the signal's number.

A signal its parent set to be ignored (SIGHUP under nohup) stays ignored. Signals during the clean-up are
ignored: it is what makes the state truthful. SIGPIPE: the output whose reader went away is sent to
/dev/null, so the clean-up and the last line (on stderr) do not die on it; the BrokenPipeError of the write
that met it is handled as the signal (in Tune's callbacks it stops the tuner; elsewhere it unwinds as
`Signalled` does), and the handler itself raises nothing.
"""
from __future__ import annotations

import os
import select
import signal
from typing import Any

__all__ = ["DriverSignals", "Signalled", "CAUGHT", "exit_code", "stop_ray"]

# The catchable signals whose default action ends the process (SIGPIPE: Python ignores it, raising
# BrokenPipeError instead; the driver treats it as the signal it is)
CAUGHT = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2",
                                            "SIGPIPE") if hasattr(signal, n))


def exit_code(name: str) -> int:
    """128 + the signal's number, as a shell reports a process a signal ended (SIGHUP 129, SIGTERM 143)."""
    return 128 + int(signal.Signals[name])


class Signalled(KeyboardInterrupt):
    """A signal arrived outside Tune's loop (or a second one inside it): the driver unwinds from where it was."""

    def __init__(self, name: str, phase: str) -> None:
        super().__init__(f"{name} during {phase}")
        self.name, self.phase = name, phase


class DriverSignals:
    """The driver's handler of every signal in `CAUGHT`, from `install` to `restore` (module docstring).

    `phase` names what the driver is doing, for the last line; `stopping(abort)` hands the first signal to
    Tune's stopper while the tuner runs.
    """

    active: "DriverSignals | None" = None  # the installed one (search.run's), for the driver's modules

    def __init__(self) -> None:
        self.phase = "preflight"
        self.abort: Any = None  # the tuner's stopper while Tune's loop runs
        self.received: str = ""  # the first signal's name
        self.raised = False  # Signalled raised: the clean-up runs, later signals are ignored
        self.previous: dict[int, Any] = {}

    def install(self) -> "DriverSignals":
        """Take every signal of `CAUGHT` not ignored on purpose; again after Ray's start (Ray sets its own)."""
        for sig in CAUGHT:
            try:
                current = signal.getsignal(sig)
                if sig not in self.previous:
                    if current is signal.SIG_IGN and sig != signal.SIGPIPE:
                        continue  # ignored by whoever started us (nohup): leave it so
                    self.previous[sig] = current
                signal.signal(sig, self._handler)
            except (ValueError, OSError):  # not the main thread: the caller's own handling stays
                return self
        DriverSignals.active = self
        return self

    def restore(self) -> None:
        """Hand every signal back as it was before `install` (search.run's main may run inside a test)."""
        for sig, old in self.previous.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (ValueError, OSError, TypeError):
                pass
        self.previous.clear()
        if DriverSignals.active is self:
            DriverSignals.active = None

    def stopping(self, abort: Any) -> "_Stopping":
        """While Tune's loop runs: the first signal goes to `abort` (the tuner's stopper), a second raises."""
        return _Stopping(self, abort)

    def _handler(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == getattr(signal, "SIGPIPE", None):
            # The write that met the closed pipe raises BrokenPipeError where it was, which the driver handles as
            # this signal; raising here too would land inside that handling. Later writes go to /dev/null.
            mute_closed_outputs()
            if self.abort is not None and not self.abort.signal:
                self.abort.signal = name
            self.received = self.received or name
            return
        if self.raised:
            return  # cleaning up after the first signal: let it finish
        if self.abort is not None and not self.abort.signal:
            self.abort.signal, self.received = name, name
            _say(f"\n{name}: stopping the sweep (send it again to abort at once)")
            return
        self.received = self.received or name
        self.raised = True
        raise Signalled(name, self.phase)


class _Stopping:
    def __init__(self, guard: DriverSignals, abort: Any) -> None:
        self.guard, self.abort = guard, abort

    def __enter__(self) -> "_Stopping":
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # otherwise Tune replaces ours inside fit()
        self.guard.abort = self.abort
        self.guard.phase = "training"
        self.guard.install()  # Ray's start set handlers of its own (SIGTERM: a core dump, exit 134)
        return self

    def __exit__(self, *exc: object) -> None:
        self.guard.abort = None
        self.guard.phase = "the end of training"  # closing the stopped trials' runs, until the driver names more


def _say(text: str) -> None:
    try:
        print(text, flush=True)
    except (BrokenPipeError, OSError):
        pass


def mute_closed_outputs() -> None:
    """Point stdout/stderr at /dev/null where their reader went away (poll says POLLERR on a pipe without a
    reader): the driver's clean-up and its last line must not die writing to them."""
    for fd in (1, 2):
        try:
            p = select.poll()
            p.register(fd, select.POLLOUT)
            if any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0)):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
        except (OSError, ValueError):
            continue


def stop_ray(grace: float = 10.0) -> list[int]:
    """Stop the Ray this driver started (a local one: its processes are this process's descendants) and
    return the pids still alive after `grace` s, then SIGKILLed. A joined cluster (`--address`) is only
    disconnected. Processes are found by pid (from /proc), never by name."""
    import time

    try:
        import ray
    except ImportError:  # pragma: no cover - the sweep needs Ray
        return []
    mine = _descendants(os.getpid())  # before ray.shutdown: a worker whose raylet died is nobody's child
    try:
        if ray.is_initialized():
            ray.shutdown()
    except BaseException:  # noqa: BLE001 - a half-started Ray; its processes are stopped below
        pass
    deadline = time.time() + grace
    alive = [p for p in mine if _alive(p)]
    for pid in alive:
        _kill(pid, signal.SIGTERM)
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        _kill(pid, signal.SIGKILL)
    return alive


def _descendants(root: int) -> list[int]:
    """Every process below `root` (parent ids from /proc/<pid>/stat); [] where /proc is not there."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone but for its parent's wait
    except OSError:
        return False


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
