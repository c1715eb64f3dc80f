"""Cost of search.probes.measure_variance_shift relative to a plain eval pass over the same batches.

Both run in this one process on the same model and the same pre-built batches
(synthetic data of CIFAR shape, already on the device), alternating for
several repeats after one warm-up of each. The timer covers the whole pass
over all batches: for the plain pass, model.eval() and torch.no_grad()
forwards; for the probe, the full measure_variance_shift call (hooks, the
per-batch statistics, the final per-layer records). On CUDA each timed region
ends with a synchronize. Prints the median of each and the median ratio
(target <= 1.5), by wall clock and by process CPU time (the latter is the
fairer measure on a machine shared with other jobs; on CUDA use wall).

    PYTHONPATH=. .venv/bin/python benchmarks/probe_overhead.py --device cpu

Needs no ray, optuna or mlflow.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from search.trial.probes import measure_variance_shift

TARGET = 1.5  # issue 13: the whole probe block, mechanism included, <= 1.5x a plain eval pass


def small_cnn(num_classes: int = 10) -> nn.Module:
    """Fallback when search.models is unavailable: conv-BN-ReLU stages with dropout before each BN."""
    layers, c = [], 3
    for w in (64, 128, 256):
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.Dropout(0.3), nn.BatchNorm2d(w), nn.ReLU(),
                   nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def build(args: argparse.Namespace) -> tuple[nn.Module, str]:
    try:
        from search.config import TrialConfig
        from search.trial.models import build_model

        cfg = TrialConfig(backbone=args.backbone, depth=args.depth, width=args.width, image_size=32,
                          dropout_placement="pre_bn", dropout_type="bernoulli", dropout_rate=0.3)
        model = build_model(cfg, num_classes=10)
        return model, f"{args.backbone} depth={args.depth} width={args.width:g} (pre_bn bernoulli 0.3)"
    except ImportError as e:
        print(f"note: search.models is not importable ({e}); timing the fallback small_cnn instead")
        return small_cnn(), "fallback small_cnn (3 stages, 64-128-256 channels, dropout before 3 BN)"


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(); CPU time is robust to other jobs on a shared machine."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="cifar_wrn")
    p.add_argument("--depth", type=lambda s: None if s.lower() == "none" else int(s), default=16,
                   help="CIFAR family depth; 'none' for stock timm models")
    p.add_argument("--width", type=float, default=4.0)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--every", type=int, default=None,
                   help="the mechanism's batch stride (default: measure_variance_shift's own)")
    p.add_argument("--no-mechanism", action="store_true", help="the shift probe alone")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model, desc = build(args)
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=g).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=g).to(device)) for _ in range(args.batches)]

    @torch.no_grad()
    def plain() -> None:
        model.eval()
        for x, _ in batches:
            model(x)

    kw = {"mechanism": not args.no_mechanism} | ({"every": args.every} if args.every else {})

    def probe() -> None:
        measure_variance_shift(model, batches, device, **kw)

    plain(), probe()  # warm-up: allocator, kernel selection, first-call costs
    plain_t, probe_t = [], []
    for _ in range(args.repeats):
        plain_t.append(timed(plain, device))
        probe_t.append(timed(probe, device))
    n_bn = len(measure_variance_shift(model, batches[:1], device))
    images = args.batches * args.batch_size
    print(f"model: {desc}; {n_bn} BN layers; device {device}; torch threads {torch.get_num_threads()}")
    print(f"data: {args.batches} batches x {args.batch_size} images 3x32x32 ({images} images), {args.repeats} repeats")
    print("timer: one full pass over all batches (plain: eval-mode no_grad forwards; probe: the whole"
          " measure_variance_shift call incl. hooks and per-layer records), synchronised on CUDA;"
          " wall clock and process CPU time")
    for k, clock in enumerate(("wall", "cpu")):
        a, b = [t[k] for t in plain_t], [t[k] for t in probe_t]
        ratios = [y / x for x, y in zip(a, b)]
        ratio = statistics.median(ratios)
        verdict = "ok" if ratio <= TARGET else "ABOVE TARGET"
        print(f"[{clock:4s}] plain median {statistics.median(a) * 1e3:9.1f} ms   probe median"
              f" {statistics.median(b) * 1e3:9.1f} ms   ratio median {ratio:.3f}"
              f" (per repeat {', '.join(f'{r:.2f}' for r in ratios)}); target <= {TARGET}: {verdict}")

if __name__ == "__main__":
    main()
