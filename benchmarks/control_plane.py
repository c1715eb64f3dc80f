"""The control plane at scale: what a trial costs besides its training, at 100, 1,000 and 10,000 trials.

    python benchmarks/control_plane.py [--sizes 100 1000 10000] [--backend sqlite|server|server-postgres]

Each size is one real `python -m search.run` sweep (Ray Tune, the driver's Tune callback, MLflow runs,
params, metrics, tags and artifacts, Parquet staging and compaction, the sweep's report on its parent
run) over the `control_plane` space of benchmarks/_synthetic_trials.py: trials that train nothing
and return a 50-BN-layer, 10-epoch result at once. Then, on the same stores:

- `--resume` of the same command, which finds every trial finished ("nothing to do");
- a rebuild of both Parquet datasets from MLflow (`search.sweep.tracking.rebuild_parquet`);
- `python -m analysis.report` over all trials (figures included).

Per size it prints: the sweep's command wall and its trial phase (from the driver's "N trial(s) to
run" line to its "done" line, read as the lines arrive), milliseconds per trial of that phase, the
driver's peak resident memory (VmHWM of the search.run process), MLflow rows per trial (runs, params,
tags, metrics, latest_metrics, counted in the store's own database), artifact bytes and Parquet bytes
per trial, and the wall time of the resume, the rebuild and the report. Ratios to the smallest size
show whether a cost grows faster than linearly. `--json FILE` also writes one JSON object per size.

Backends: `sqlite` (the default store, sqlite:///<tmp>/mlflow.db); `server`: a live `mlflow server`
on 127.0.0.1 with a sqlite backend and --artifacts-destination; `server-postgres`: the same server
over a PostgreSQL database (Debian's postgresql, started here by initdb + pg_ctl in the temporary
folder; needs psycopg2). Targets (issue 26): per-trial cost at 10,000 within 1.5x of 100; <= 1 s per
trial (10% of a 10-second trial); resume <= 30 s and report <= 60 s at 10,000 trials.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "benchmarks" / "_synthetic_trials.py"
PER_SEED = 100  # the control_plane space's configurations per seed
TABLES = ("runs", "params", "tags", "metrics", "latest_metrics")


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _timed(cmd: list[str], cwd: Path, marks: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd`; its wall time, exit code, output, peak RSS (VmHWM, polled) and when each mark's line appeared."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def poll() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    lines, seen = [], {}
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        for name, text in (marks or {}).items():
            if name not in seen and text in line:
                seen[name] = time.perf_counter() - t0
    rc = proc.wait()
    watcher.join()
    return {"wall_s": time.perf_counter() - t0, "rc": rc, "out": "".join(lines), "marks": seen,
            "peak_mib": peak[0] / 1024}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend:
    """An MLflow store for one size: its tracking URI, its rows and its artifact bytes; stopped by PID."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind, self.tmp, self.procs = kind, tmp, []
        self.db_uri = f"sqlite:///{tmp / 'mlflow.db'}"
        self.artifacts = tmp / "mlruns"
        if kind == "sqlite":
            self.uri = self.db_uri
            return
        if kind == "server-postgres":
            self.db_uri = self._postgres()
        port = _free_port()
        self.uri = f"http://127.0.0.1:{port}"
        self.artifacts = tmp / "artifacts"
        log = open(tmp / "mlflow-server.log", "w")
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", self.db_uri, "--artifacts-destination", str(self.artifacts), "--workers", "1"],
            cwd=tmp, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        import urllib.request

        for _ in range(240):
            if self.procs[0].poll() is not None:
                break  # the server exited: its log says why
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server on {self.uri} did not start (see {tmp / 'mlflow-server.log'})")

    def _postgres(self) -> str:
        bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not bindir:
            raise RuntimeError("server-postgres: no /usr/lib/postgresql/*/bin (apt-get install postgresql)")
        bindir = bindir[-1]
        data, sock = self.tmp / "pg", self.tmp / "pgsock"
        sock.mkdir()
        user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if user:  # initdb refuses root
            shutil.chown(self.tmp, "postgres")
            shutil.chown(sock, "postgres")
        subprocess.run(user + [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
                       check=True, capture_output=True)
        port = _free_port()
        subprocess.run(user + [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(self.tmp / "pg.log"), "-w", "-o",
                               f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True)
        self.pg = (user, bindir, data)
        subprocess.run(user + [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                               "mlflow"], check=True, capture_output=True)
        self.pg_port = port
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"  # SQLAlchemy 2.1 defaults to psycopg 3

    def rows(self) -> dict[str, int]:
        """Rows per MLflow table, read from the store's database directly."""
        if self.db_uri.startswith("sqlite:///"):
            with sqlite3.connect(self.db_uri[len("sqlite:///"):]) as db:
                return {t: db.execute(f"select count(*) from {t}").fetchone()[0] for t in TABLES}
        out = {}
        for t in TABLES:
            got = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", "-d",
                                  "mlflow", "-tAc", f"select count(*) from {t}"], capture_output=True, text=True)
            out[t] = int(got.stdout.strip() or 0)
        return out

    def stop(self) -> None:
        import signal

        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        if getattr(self, "pg", None):
            user, bindir, data = self.pg
            subprocess.run(user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                           capture_output=True)


def _step(size: int, text: str) -> None:
    print(f"  {size} trials, {time.strftime('%H:%M:%S')}: {text}", flush=True)


def _bytes(folder: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file()) if folder.exists() else 0


def measure(size: int, backend: str, keep: Path | None = None) -> dict[str, Any]:
    """One size: the sweep, then resume, rebuild and report on its stores."""
    if size % PER_SEED:
        raise SystemExit(f"--sizes {size}: must be a multiple of {PER_SEED} (the space's configurations per seed)")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"control-plane-{size}-", dir=keep))
    store = Backend(backend, tmp)
    try:
        storage = tmp / "results"
        sweep = [sys.executable, "-m", "search.run", "--plugin", str(PLUGIN), "--space", "control_plane",
                 "--seeds", str(size // PER_SEED), "--num-cpus", "2", "--cpus-per-trial", "1", "--quiet",
                 "--storage", str(storage), "--tracking-uri", store.uri]
        run = _timed(sweep, tmp, marks={"start": "trial(s) to run", "done": "done in"})
        if run["rc"] != 0 or set(run["marks"]) != {"start", "done"}:
            raise SystemExit(f"size {size}: the sweep failed (exit {run['rc']}):\n{run['out'][-3000:]}")
        phase = run["marks"]["done"] - run["marks"]["start"]
        rows = store.rows()
        _step(size, f"sweep {run['wall_s']:.1f} s, phase {phase:.1f} s = {1000 * phase / size:.0f} ms/trial, driver peak "
                    f"{run['peak_mib']:.0f} MiB, MLflow rows {rows}")
        resume = _timed(sweep + ["--resume"], tmp)
        if resume["rc"] != 0 or "trial(s) to run" in resume["out"]:
            raise SystemExit(f"size {size}: --resume did not find everything finished (exit {resume['rc']}):\n"
                             f"{resume['out'][-3000:]}")
        _step(size, f"resume {resume['wall_s']:.1f} s (peak {resume['peak_mib']:.0f} MiB)")
        parquet = _bytes(storage / "control_plane", "*.parquet")
        rebuild = _timed([sys.executable, "-c",
                          "import sys; from search.plugins import load_plugin; load_plugin(sys.argv[1]); "
                          "from search.sweep.tracking import rebuild_parquet; "
                          "print(rebuild_parquet('control_plane', sys.argv[2], sys.argv[3]))",
                          str(PLUGIN), store.uri, str(storage)], tmp)
        if rebuild["rc"] != 0 or f"({size}, {size * 50})" not in rebuild["out"]:
            raise SystemExit(f"size {size}: the rebuild failed or lost rows:\n{rebuild['out'][-3000:]}")
        _step(size, f"rebuild {rebuild['wall_s']:.1f} s (peak {rebuild['peak_mib']:.0f} MiB)")
        report = _timed([sys.executable, "-m", "analysis.report", "--plugin", str(PLUGIN), "--space",
                         "control_plane", "--storage", str(storage), "--out", str(tmp / "report")], tmp)
        if report["rc"] != 0:
            raise SystemExit(f"size {size}: analysis.report failed:\n{report['out'][-3000:]}")
        return {
            "size": size, "backend": backend, "store": store.db_uri.split("://")[0],
            "command_s": run["wall_s"], "phase_s": phase, "ms_per_trial": 1000 * phase / size,
            "driver_peak_mib": run["peak_mib"], "rows_per_trial": {k: v / size for k, v in rows.items()},
            "artifact_bytes_per_trial": _bytes(store.artifacts) / size, "parquet_bytes_per_trial": parquet / size,
            "resume_s": resume["wall_s"], "resume_peak_mib": resume["peak_mib"], "rebuild_s": rebuild["wall_s"],
            "rebuild_peak_mib": rebuild["peak_mib"], "report_s": report["wall_s"], "report_peak_mib": report["peak_mib"],
        }
    finally:
        store.stop()
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


COLUMNS = (("size", "trials", "{:d}"), ("command_s", "sweep s", "{:.1f}"), ("phase_s", "phase s", "{:.1f}"),
           ("ms_per_trial", "ms/trial", "{:.0f}"), ("driver_peak_mib", "driver MiB", "{:.0f}"),
           ("rows", "MLflow rows/trial", "{}"), ("artifact_bytes_per_trial", "artifact B/trial", "{:.0f}"),
           ("parquet_bytes_per_trial", "Parquet B/trial", "{:.0f}"), ("resume_s", "resume s", "{:.1f}"),
           ("rebuild_s", "rebuild s", "{:.1f}"), ("report_s", "report s", "{:.1f}"),
           ("report_peak_mib", "report MiB", "{:.0f}"))


def table(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table, with each cost's ratio to the smallest size's."""
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in results:
        rows = r["rows_per_trial"]
        cells = []
        for key, _, fmt in COLUMNS:
            if key == "rows":
                cells.append(f"{sum(rows.values()):.0f} ({rows['metrics']:.0f} metrics, {rows['params']:.0f} params, "
                             f"{rows['tags']:.0f} tags)")
            else:
                cells.append(fmt.format(r[key]))
        lines.append("| " + " | ".join(cells) + " |")
    base = results[0]
    for r in results[1:]:
        lines.append(f"\n{r['size']} vs {base['size']} trials: ms/trial x{r['ms_per_trial'] / base['ms_per_trial']:.2f}"
                     f" (target <= 1.5), resume x{r['resume_s'] / base['resume_s']:.2f} for x{r['size'] / base['size']:.0f}"
                     f" trials, rebuild x{r['rebuild_s'] / base['rebuild_s']:.2f}, report x{r['report_s'] / base['report_s']:.2f}"
                     f", driver memory x{r['driver_peak_mib'] / base['driver_peak_mib']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000], help="trials per sweep (x100)")
    p.add_argument("--backend", choices=("sqlite", "server", "server-postgres"), default="sqlite")
    p.add_argument("--json", type=Path, help="also write one JSON object per size to this file")
    p.add_argument("--keep", type=Path, help="keep each size's stores under this folder (default: deleted)")
    args = p.parse_args(argv)
    results = []
    print(f"control plane: {args.backend} backend, sizes {args.sizes}, 2 CPUs, 1 CPU per trial, synthetic trials "
          "(50 BN layers, 10 epochs, no training)", flush=True)
    for size in args.sizes:
        r = measure(size, args.backend, args.keep)
        results.append(r)
        print(f"{size} trials: phase {r['phase_s']:.1f} s = {r['ms_per_trial']:.0f} ms/trial, resume {r['resume_s']:.1f} s,"
              f" rebuild {r['rebuild_s']:.1f} s, report {r['report_s']:.1f} s, driver peak {r['driver_peak_mib']:.0f} MiB",
              flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(r) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
