"""Aggregate images/s of k concurrent small trials on one GPU, each its own process (as Ray runs them).

For each k, k worker processes (this script with --worker) each load the
synthetic data onto the device, build the model and train one warm-up epoch
(CUDA context, cudnn autotune), then wait; all are released together and each
runs search.trial.train.train (the loop run_trial runs) for the timed epochs.
Aggregate throughput = all training images / (last end - first start); the
window includes train()'s per-epoch evaluation, as a trial would. GPU busy =
mean of `nvidia-smi --query-gpu=utilization.gpu` sampled every 100 ms in that
window (the fraction of time a kernel was running; it does not say how full
the SMs were). Also prints the fraction `--gpus-per-trial auto` would pick
(search.sweep.packing.measure_step_peak_bytes + gpu_fraction, measured in its own
process) and whether any worker ran out of memory.

    PYTHONPATH=. python benchmarks/packing.py                      # GPU: cifar_wrn 16-2, batch 128, k = 1, 2, 4, 8
    PYTHONPATH=. python benchmarks/packing.py --device cpu --quick # k = 1, 2; busy n/a

Needs no ray, optuna or mlflow.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _common, when imported from elsewhere

from _common import fmt, markdown_table, synthetic_sizes  # noqa: E402

TAG = "@@packing "  # prefix of the workers' JSON lines on stdout; anything else there is ignored
TARGET_BUSY = 0.80
FULL = dict(ks="1,2,4,8", depth=16, width=2.0, batch_size=128, n_train=50_000, n_test=1000, image_size=32,
            warmup_epochs=1, epochs=2)
# CPU: a model small enough that process start-up, not training, is most of the run.
QUICK = dict(ks="1,2", depth=10, width=1.0, batch_size=64, n_train=1024, n_test=64, image_size=16, warmup_epochs=1,
             epochs=2)
HEADERS = ("k", "aggregate img/s", "speed-up vs k=1", "per-trial img/s", "GPU busy", "peak reserved GiB/trial",
           "process GiB/trial", "status")


# ------------------------------------------------------------------ worker side
def _emit(event: str, **kw: Any) -> None:
    print(TAG + json.dumps({"event": event, **kw}), flush=True)


def worker(spec: dict[str, Any]) -> int:
    """One trial process: set up and warm up, say 'ready', wait for 'go' on stdin, train, report."""
    import torch

    torch.set_num_threads(spec["threads"])
    from search.config import TrialConfig
    from search.trial.data import load_data
    from search.trial.models import build_model
    from search.trial.train import train

    device = torch.device(spec["device"])
    cfg = TrialConfig(backbone=spec["backbone"], depth=spec["depth"], width=spec["width"], dataset="synthetic",
                      image_size=spec["image_size"], batch_size=spec["batch_size"], epochs=spec["epochs"],
                      device=device.type, seed=spec["seed"])
    cuda = device.type == "cuda"
    try:
        with synthetic_sizes(spec["n_train"], spec["n_test"]):
            data = load_data(cfg, device)
        model = build_model(cfg, num_classes=data.num_classes)
        if spec["warmup_epochs"]:
            train(model, data, cfg.replace(epochs=spec["warmup_epochs"]), device)
        _emit("ready")
        if sys.stdin.readline().strip() != "go":
            return 1
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.time()  # wall clock: comparable across processes on one machine
        out = train(model, data, cfg, device)
        t1 = time.time()
        peak = torch.cuda.max_memory_reserved(device) if cuda else None
        _emit("done", status=out.status, images=out.images_seen, train_time_s=out.train_time_s, t_start=t0, t_end=t1,
              peak_reserved_bytes=peak)
    except torch.OutOfMemoryError as e:
        print(f"out of memory: {e}", file=sys.stderr)  # the parent reads stderr if this happened before 'ready'
        _emit("done", status="oom", error=str(e).splitlines()[0])
        return 1
    return 0


def measure_worker(spec: dict[str, Any]) -> int:
    """What `--gpus-per-trial auto` would choose for this config (needs CUDA)."""
    from search.config import TrialConfig
    from search.sweep.packing import gpu_fraction, measure_step_peak_bytes

    cfg = TrialConfig(backbone=spec["backbone"], depth=spec["depth"], width=spec["width"], dataset="synthetic",
                      image_size=spec["image_size"], batch_size=spec["batch_size"], device="cuda")
    # resident_data_bytes reads search.trial.data.SYNTHETIC_SIZES: size it as the workers' data, not the 2048/512 default.
    with synthetic_sizes(spec["n_train"], spec["n_test"]):
        peak, total = measure_step_peak_bytes(cfg)
    try:
        frac, err = gpu_fraction(peak, total), None
    except ValueError as e:
        frac, err = None, str(e)
    _emit("measured", peak_bytes=peak, total_bytes=total, fraction=frac, error=err)
    return 0


# ------------------------------------------------------------------ parent side
class Worker:
    """A worker process; a thread turns its tagged stdout lines into events. stderr goes to a file."""

    def __init__(self, args: list[str], env: dict[str, str], err_path: Path) -> None:
        self.err_path = err_path
        with open(err_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(HERE / "packing.py"), *args], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        self.events: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                self.events.put(json.loads(line[len(TAG):]))
        self.events.put(None)  # end of output: the process exited

    def wait(self, event: str, deadline: float) -> dict[str, Any] | None:
        """The next event named `event`, or None if the process ended or the deadline passed."""
        while True:
            try:
                ev = self.events.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                return None
            if ev is None or ev.get("event") == event:
                return ev
            if time.time() > deadline:
                return None

    def send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died; its missing 'done' event says so

    def error_tail(self) -> str:
        text = self.err_path.read_text(errors="replace").strip().splitlines()
        oom = any("out of memory" in ln.lower() for ln in text)
        return ("OOM: " if oom else "") + (text[-1][:200] if text else f"exit code {self.proc.poll()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # only our own child, by its pid
        self.proc.wait()


class BusySampler:
    """GPU utilisation sampled every `interval_ms`: `nvidia-smi -lms`, else torch.cuda.utilization()."""

    def __init__(self, interval_ms: int, gpu: str) -> None:
        self.interval_ms, self.gpu = interval_ms, gpu
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self._proc: subprocess.Popen | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        if shutil.which("nvidia-smi"):
            self.source = f"nvidia-smi every {self.interval_ms} ms"
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", self.gpu,
                 "-lms", str(self.interval_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read_smi, daemon=True).start()
        else:
            self.source = f"torch.cuda.utilization() every {self.interval_ms} ms"
            threading.Thread(target=self._poll_torch, daemon=True).start()

    def _read_smi(self) -> None:
        for line in self._proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip())))
            except ValueError:  # '[N/A]' (e.g. MIG): no sample
                pass

    def _poll_torch(self) -> None:
        import torch

        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), float(torch.cuda.utilization(int(self.gpu)))))
            except Exception:  # no pynvml / amdsmi: no samples, busy stays n/a
                self.source = "none (no nvidia-smi, torch.cuda.utilization unavailable)"
                return
            self._stop.wait(self.interval_ms / 1e3)

    def stop(self) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()  # our own nvidia-smi child
            self._proc.wait()

    def busy(self, t0: float, t1: float) -> float | None:
        vals = [v for t, v in self.samples if t0 <= t <= t1]
        return statistics.fmean(vals) / 100.0 if vals else None


def process_memory(gpu: str) -> dict[int, int]:
    """{pid: bytes} of the compute processes on GPU `gpu` as nvidia-smi sees them (CUDA context included)."""
    if not shutil.which("nvidia-smi"):
        return {}
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits",
                          "-i", gpu], capture_output=True, text=True)
    got = {}
    for line in out.stdout.splitlines():
        try:
            pid, mib = (c.strip() for c in line.split(","))
            got[int(pid)] = int(float(mib)) * 2**20
        except ValueError:  # '[N/A]' or an odd line: no figure for that process
            pass
    return got


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(HERE.parent)  # the repository root, so workers import `search` whatever the caller's cwd
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_k(k: int, spec: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Start k workers, release them together, sample GPU busy; one table row."""
    cpus = os.cpu_count() or 1
    # Ray sets OMP_NUM_THREADS to a trial's CPUs: a share of the cores on GPU nodes; on CPU one thread each,
    # which also keeps a shared CPU out of OpenMP spin-wait collapse (2 threads x 2 busy cores: 10-30x slower).
    threads = args.threads or (max(1, cpus // k) if spec["device"] == "cuda" else 1)
    workers = [Worker(["--worker", json.dumps({**spec, "seed": i, "threads": threads})], _env(),
                      tmp / f"k{k}_w{i}.err") for i in range(k)]
    sampler = BusySampler(args.sample_ms, args.gpu_index) if spec["device"] == "cuda" else None
    try:
        deadline = time.time() + args.timeout
        ready = [w.wait("ready", deadline) for w in workers]
        failed = [i for i, r in enumerate(ready) if r is None]
        done: list[dict[str, Any] | None] = [None] * k
        # Each worker's whole GPU footprint after its warm-up epoch (context + caching allocator + data):
        # what a neighbour cannot use, to check against --gpus-per-trial auto's estimate.
        footprint = process_memory(args.gpu_index) if spec["device"] == "cuda" and not failed else {}
        if not failed:
            if sampler:
                sampler.start()
            for w in workers:  # release all at once: the timed windows overlap
                w.send("go\n")
            done = [w.wait("done", deadline) for w in workers]
        statuses = []
        for i, (w, d) in enumerate(zip(workers, done)):
            if d is None and failed and i not in failed:
                continue  # healthy, never released because another worker failed
            if d is None:
                statuses.append(f"w{i}: {w.error_tail()}")
            elif d["status"] != "ok":
                statuses.append(f"w{i}: {d['status']}" + (f" ({d['error']})" if d.get("error") else ""))
    finally:
        if sampler:
            sampler.stop()
        for w in workers:
            w.close()
    ok = [d for d in done if d is not None and d["status"] == "ok"]
    row: dict[str, Any] = dict(k=k, aggregate=float("nan"), per_trial=float("nan"), busy=None, peak=None,
                               status="ok" if not statuses and len(ok) == k else "; ".join(statuses) or "failed",
                               oom=any("oom" in s.lower() for s in statuses))
    fp = [footprint[w.proc.pid] for w in workers if w.proc.pid in footprint]
    row["footprint"] = max(fp) / 2**30 if fp else None
    row["used_total"] = sum(fp) / 2**30 if fp else None
    if ok:
        t0, t1 = min(d["t_start"] for d in ok), max(d["t_end"] for d in ok)
        row["aggregate"] = sum(d["images"] for d in ok) / (t1 - t0)
        row["per_trial"] = statistics.fmean(d["images"] / (d["t_end"] - d["t_start"]) for d in ok)
        row["busy"] = sampler.busy(t0, t1) if sampler else None
        peaks = [d["peak_reserved_bytes"] for d in ok if d.get("peak_reserved_bytes")]
        row["peak"] = max(peaks) / 2**30 if peaks else None
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--quick", action="store_true", help="small CPU-sized defaults (implied on CPU)")
    p.add_argument("--ks", help="comma list of trials per GPU (GPU default 1,2,4,8; CPU 1,2)")
    p.add_argument("--backbone", default="cifar_wrn")
    p.add_argument("--depth", type=lambda s: None if s.lower() == "none" else int(s), default=argparse.SUPPRESS,
                   help="'none' for stock timm models (GPU default 16; CPU 10)")
    p.add_argument("--width", type=float, help="GPU default 2; CPU 1")
    p.add_argument("--batch-size", type=int, help="GPU default 128; CPU 64")
    p.add_argument("--image-size", type=int, help="GPU default 32")
    p.add_argument("--n-train", type=int, help=f"synthetic training images per trial (GPU default {FULL['n_train']})")
    p.add_argument("--n-test", type=int, help="synthetic test images (evaluated each epoch, inside the window)")
    p.add_argument("--warmup-epochs", type=int, help="untimed epochs before the release")
    p.add_argument("--epochs", type=int, help="timed epochs per trial")
    p.add_argument("--sample-ms", type=int, default=100, help="GPU utilisation sampling interval")
    p.add_argument("--gpu-index", default=None, help="GPU for nvidia-smi -i (default: first of CUDA_VISIBLE_DEVICES)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: cores // k on GPU, 1 on CPU)")
    p.add_argument("--timeout", type=float, default=540, help="seconds per k before workers are given up")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker or args.measure:
        return args
    import torch

    # Resolved without initialising CUDA here: the parent holds no GPU memory while workers run.
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = args.device.split(":")[0]
    defaults = QUICK if args.quick or args.device == "cpu" else FULL
    for key, val in defaults.items():
        if getattr(args, key, None) is None and not (key == "depth" and hasattr(args, "depth")):
            setattr(args, key, val)  # depth: an explicit 'none' (stock timm model) must survive
    if args.gpu_index is None:
        args.gpu_index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.worker:
        sys.exit(worker(json.loads(args.worker)))
    if args.measure:
        sys.exit(measure_worker(json.loads(args.measure)))
    cuda = args.device == "cuda"
    spec = dict(backbone=args.backbone, depth=args.depth, width=args.width, batch_size=args.batch_size,
                image_size=args.image_size, n_train=args.n_train, n_test=args.n_test, epochs=args.epochs,
                warmup_epochs=args.warmup_epochs, device=args.device)
    label = f"{args.backbone}-{args.depth}-{args.width:g}" if args.depth else args.backbone
    print(f"packing: k concurrent trials (separate processes) of {label}, batch {args.batch_size}, synthetic "
          f"3x{args.image_size}x{args.image_size}, {args.n_train} training images, {args.epochs} timed epochs "
          f"after {args.warmup_epochs} warm-up")
    import torch

    gpu_name = "cpu"
    if cuda:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader", "-i",
                              args.gpu_index], capture_output=True, text=True) if shutil.which("nvidia-smi") else None
        gpu_name = out.stdout.strip() if out and out.returncode == 0 else "cuda (nvidia-smi unavailable)"
    print(f"device: {gpu_name}, torch {torch.__version__}, {os.cpu_count()} cores")
    print("timer: wall clock (time.time in each worker) from the common release to each worker's end of train(); "
          "aggregate = all training images / (last end - first start), per-epoch evaluation inside the window; "
          "setup, data loading and the warm-up epoch excluded")

    auto = "n/a (needs CUDA)"
    k_auto = need = total = None
    with tempfile.TemporaryDirectory(prefix="packing_") as tmpdir:
        tmp = Path(tmpdir)
        if cuda:
            w = Worker(["--measure", json.dumps(spec)], _env(), tmp / "measure.err")
            m = w.wait("measured", time.time() + args.timeout)
            w.close()
            if m is None:
                auto = f"measurement failed: {w.error_tail()}"
            elif m["fraction"] is None:
                auto = m["error"]
            else:
                k_auto = round(1 / m["fraction"])
                from search.sweep.packing import CUDA_CONTEXT_BYTES, HEADROOM

                need, total = m["peak_bytes"] * HEADROOM + CUDA_CONTEXT_BYTES, m["total_bytes"]
                auto = (f"fraction {m['fraction']:.3g} = 1/{k_auto} (step peak {m['peak_bytes'] / 2**30:.2f} GiB of "
                        f"{m['total_bytes'] / 2**30:.0f} GiB; search.sweep.packing.measure_step_peak_bytes + gpu_fraction)")
        print(f"--gpus-per-trial auto: {auto}")
        rows = []
        for k in (int(x) for x in str(args.ks).split(",")):
            row = run_k(k, spec, args, tmp)
            rows.append(row)
            print(f"  done k={k}: {row['status']}", flush=True)
    base = rows[0]["aggregate"] if rows and rows[0]["k"] == 1 else float("nan")
    table = []
    for r in rows:
        r["speedup"] = r["aggregate"] / base
        table.append([str(r["k"]), fmt(r["aggregate"]), fmt(r["speedup"], ".2f"), fmt(r["per_trial"]),
                      fmt(r["busy"], ".0%") if cuda else "n/a", fmt(r["peak"], ".2f"), fmt(r.get("footprint"), ".2f"),
                      r["status"]])
    print(markdown_table(HEADERS, table))
    sampler_src = "nvidia-smi utilization.gpu (fraction of time >= 1 kernel ran)" if cuda else "n/a on CPU"
    print(f"GPU busy: {sampler_src}; target for packed trials >= {TARGET_BUSY:.0%}")
    ooms = [r["k"] for r in rows if r["oom"]]
    print("out of memory: " + (f"at k = {', '.join(map(str, ooms))}" if ooms else "none")
          + (f"; auto packs k = {k_auto}" if k_auto else ""))
    fps = [r["footprint"] for r in rows if r.get("footprint")]
    if need and fps:
        worst = max(fps) * 2**30
        print(f"auto's per-trial estimate (step peak x headroom + context) {need / 2**30:.2f} GiB vs the largest "
              f"measured process footprint (nvidia-smi, after warm-up) {worst / 2**30:.2f} GiB: "
              + ("estimate covers it" if need >= worst else "ESTIMATE TOO LOW")
              + f"; k_auto x footprint = {k_auto * worst / 2**30:.1f} of {total / 2**30:.0f} GiB")
    return rows


if __name__ == "__main__":
    main()
