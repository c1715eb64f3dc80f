"""Throughput of search.train.train's loop vs a minimal hand-written PyTorch loop.

Both run in this one process, on the same model (same initial weights), the
same device-resident batches (search.trial.data's digits loader) and batch size,
alternating for several rounds after one warm-up of each. Prints the median
training images/s of each and their ratio (target >= 0.95).

    PYTHONPATH=. .venv/bin/python benchmarks/trainer_overhead.py --device cpu --threads 1

Needs no ray, optuna or mlflow.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from search.config import TrialConfig
from search.trial.data import load_data, resolve_device
from search.trial.train import seed_everything, train


def small_cnn(in_chans: int, num_classes: int) -> nn.Module:
    """Fallback when search.models is not importable: a 3-stage conv-BN-ReLU net."""
    layers, c = [], in_chans
    for w in (32, 64, 128):
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))


def build(cfg: TrialConfig, num_classes: int) -> tuple[nn.Module, str]:
    try:
        from search.trial.models import build_model

        return build_model(cfg), f"search.trial.models.build_model({cfg.backbone}, depth={cfg.depth}, width={cfg.width})"
    except Exception as e:  # models may not exist yet in this checkout
        return small_cnn(cfg.in_chans, num_classes), f"small_cnn (search.models unavailable: {type(e).__name__})"


def minimal_loop(model: nn.Module, loader, cfg: TrialConfig, device: torch.device) -> float:
    """The plainest loop over the same batches: zero_grad / forward / loss / backward / step. Returns images/s."""
    model.to(device).train()
    cuda = device.type == "cuda"
    if cuda and cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    n = 0
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and cfg.amp):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            n += y.shape[0]
    if cuda:
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per timed run")
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds (after one warm-up)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=16, help="16 keeps a CPU run near a minute")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    args = ap.parse_args()
    if args.threads:
        # On a shared machine, fewer threads than cores avoids OpenMP spin-wait collapse under contention.
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    cfg = TrialConfig(dataset="digits", image_size=args.image_size, in_chans=3, batch_size=args.batch_size,
                      epochs=args.epochs, backbone="cifar_wrn", depth=10, width=1.0, seed=0)
    data = load_data(cfg, device)
    seed_everything(cfg.seed)
    template, model_name = build(cfg, data.num_classes)
    template.to(device)

    def run_trainer() -> float:
        out = train(copy.deepcopy(template), data, cfg, device)
        return out.throughput  # train's own timer: training steps only, evaluation excluded

    def run_minimal() -> float:
        return minimal_loop(copy.deepcopy(template), data.train, cfg, device)

    run_trainer(), run_minimal()  # warm-up: allocator, kernels, thread pools
    ours, base = [], []
    for r in range(args.rounds):  # alternate, and swap who goes first, so drift hits both alike
        pair = (run_trainer, run_minimal) if r % 2 == 0 else (run_minimal, run_trainer)
        for fn in pair:
            (ours if fn is run_trainer else base).append(fn())
    med_ours, med_base = statistics.median(ours), statistics.median(base)
    print(f"device={device} threads={torch.get_num_threads()} model={model_name}")
    print(f"data=digits n_train={data.n_train} image_size={args.image_size} batch_size={args.batch_size} "
          f"epochs/run={args.epochs} rounds={args.rounds}")
    print("timer: wall clock (CUDA-synchronised) around the training steps of all epochs, batch production from "
          "the device-resident loader included; train()'s per-epoch evaluation excluded")
    print(f"search.trial.train.train : median {med_ours:9.1f} images/s  (runs: {', '.join(f'{v:.0f}' for v in ours)})")
    print(f"minimal loop       : median {med_base:9.1f} images/s  (runs: {', '.join(f'{v:.0f}' for v in base)})")
    print(f"ratio train/minimal: {med_ours / med_base:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
