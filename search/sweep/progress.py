"""What a sweep prints while it runs: a live block on a terminal, one line per finished trial otherwise.

On a TTY the block (counts, elapsed, ETA, the running trials by their MLflow run
names with their last epoch) is redrawn in place below the lines of finished
trials; in a CI log or `ray job submit` output (not a TTY) only the finished-trial
lines appear, each with the counts and ETA. Ray Tune's own status table is off
(`verbose=0`). Torch-, Ray- and MLflow-free: the Tune callback in `tune.py` feeds it.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TextIO

__all__ = ["Progress", "trial_cost", "quiet_libraries", "fmt_duration"]


def quiet_libraries() -> None:
    """Keep the libraries' routine INFO lines and notices off stderr; their warnings and errors stay.

    Ray's notice that token authentication is on (its default for a local cluster, which we keep)
    is dropped by message; Optuna's per-trial INFO lines repeat what the finished-trial lines say.
    """
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropAuthNotice) for f in auth.filters):
        auth.addFilter(_DropAuthNotice())
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.store.db_migrations", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # optuna keeps its own handler and level
        # "set_metric_names is experimental": a notice about Optuna's API, for this code's authors, not a user
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    except ImportError:
        pass


class _DropAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def fmt_duration(seconds: float) -> str:
    """0:07, 12:34 or 1:02:03."""
    if seconds != seconds or seconds < 0:  # NaN: no estimate yet
        return "?"
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class _Running:
    name: str
    started: float
    epoch: int = 0
    test_acc: float = float("nan")
    cost: float = 0.0


def trial_cost(cfg: dict) -> float:
    """A trial's relative time: width x depth x pixels x epochs x images. Only ratios within one sweep matter.

    Linear in width, not width^2 (the FLOPs): measured on 2 CPU cores, WRN-10 trials took 8 / 17 / 30 s at
    widths 1 / 2 / 3 (Fashion-MNIST study) and 5 / 7 / 16 s at 1 / 2 / 4 (digits), as fixed costs and small
    convolutions' inefficiency weigh more on narrow nets. A field left unset counts as 1.
    """
    def num(key: str, default: float = 1.0) -> float:
        v = cfg.get(key)
        return float(v) if isinstance(v, (int, float)) and v > 0 else default

    return num("width") * num("depth", 10.0) * num("image_size", 32.0) ** 2 * num("epochs") * num("train_samples")


@dataclass
class Progress:
    """Counts and the running trials of one sweep, rendered to `stream`.

    Args:
        title: what runs, e.g. "smoke (quick, grid)".
        total: trials planned.
        live: redraw a block in place (default: `stream` is a TTY and TERM is not dumb).
        epochs: epochs per trial, for "epoch 2/4" (0: unknown).
        total_cost: the planned trials' summed relative cost (`trial_cost`); with the cost of each trial
            given to `started`, the ETA weighs what is left by it (0: every trial counts the same).
    """

    title: str
    total: int
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    live: bool | None = None
    epochs: int = 0
    min_interval: float = 0.5  # seconds between redraws when nothing finished
    counts: dict[str, int] = field(default_factory=dict)
    running: dict[str, _Running] = field(default_factory=dict)
    total_cost: float = 0.0
    done_cost: float = 0.0

    def __post_init__(self) -> None:
        if self.live is None:
            self.live = bool(getattr(self.stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"
        self.t0 = time.time()
        self._drawn = 0  # lines of the live block now on screen
        self._last_draw = 0.0

    # ------------------------------------------------------------- events
    def started(self, key: str, name: str, cost: float = 0.0) -> None:
        """A trial started (or restarted after a failure: its clock restarts); `cost` is its `trial_cost`."""
        self.running[key] = _Running(name, time.time(), cost=cost)
        self.tick(force=True)

    def epoch(self, key: str, epoch: int, test_acc: float | None = None) -> None:
        """A running trial reported an epoch."""
        r = self.running.get(key)
        if r is not None:
            r.epoch = epoch
            if test_acc is not None:
                r.test_acc = test_acc
        self.tick()

    def finished(self, key: str, status: str, line: str) -> None:
        """A trial ended with `status`; `line` says what it gave (printed once, kept in the scrollback)."""
        r = self.running.pop(key, None)
        self.done_cost += r.cost if r is not None else 0.0
        self.counts[status] = self.counts.get(status, 0) + 1
        done = sum(self.counts.values())
        eta = "" if done >= self.total else f"  (ETA {fmt_duration(self.eta())})"
        self._erase()
        self.stream.write(f"[{done}/{self.total}] {line}{'' if self.live else eta}\n")
        self.tick(force=True)

    def close(self) -> None:
        """Remove the live block (the finished-trial lines stay)."""
        self._erase()
        self.stream.flush()

    # ------------------------------------------------------------- rendering
    def eta(self) -> float:
        """Seconds left at the pace so far; NaN before a trial finished.

        With costs, the pace is cost per second, so a grid whose wide networks come last is not
        promised to end at the narrow ones' pace; without, finished trials per second.
        """
        done = sum(self.counts.values())
        if done == 0:
            return float("nan")
        elapsed = time.time() - self.t0
        if self.total_cost > 0 and self.done_cost > 0:
            return elapsed / self.done_cost * max(self.total_cost - self.done_cost, 0.0)
        return elapsed / done * max(self.total - done, 0)

    def lines(self) -> list[str]:
        """The live block: a status line and one line per running trial (at most 8, then a count)."""
        done = sum(self.counts.values())
        width = shutil.get_terminal_size((100, 20)).columns
        parts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()))
        pending = max(self.total - done - len(self.running), 0)
        bar_w = 20
        filled = int(bar_w * done / self.total) if self.total else bar_w
        head = (f"{self.title} [{'#' * filled}{'.' * (bar_w - filled)}] {done}/{self.total} done"
                + (f" ({parts})" if parts else "") + f", {len(self.running)} running, {pending} pending"
                + f" | {fmt_duration(time.time() - self.t0)} elapsed, ETA {fmt_duration(self.eta())}")
        out = [head[:width - 1]]
        now = time.time()
        for r in sorted(self.running.values(), key=lambda r: r.started)[:8]:
            ep = f"epoch {r.epoch}/{self.epochs}" if self.epochs else f"epoch {r.epoch}"
            acc = f"  test acc {r.test_acc:.3f}" if r.test_acc == r.test_acc else ""
            out.append(f"  {r.name}  {ep}{acc}  {fmt_duration(now - r.started)}"[:width - 1])
        if len(self.running) > 8:
            out.append(f"  ... and {len(self.running) - 8} more running")
        return out

    def tick(self, force: bool = False) -> None:
        """Redraw the live block if it is due (every `min_interval` s, or now with `force`)."""
        if not self.live:
            return
        now = time.time()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._erase()
        block = self.lines()
        self.stream.write("\n".join(block) + "\n")
        self.stream.flush()
        self._drawn, self._last_draw = len(block), now

    def _erase(self) -> None:
        if self.live and self._drawn:
            # Cursor up to the block's first line, then clear to the end of the screen.
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
