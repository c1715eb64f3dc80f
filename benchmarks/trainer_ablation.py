"""Which part of search.trial.train.train's step costs time over a plain loop: one trainer feature at a time.

gpu_throughput.py found train() at 0.83-0.85 of a plain loop at batch 128 on an
H100 (WRN-16-4, resnet18; 0.98-1.0 at batch 512), where a step is bound by the
host issuing kernels. This script times, on the same search.trial.data batches and
model, a plain loop with each of train()'s per-step extras switched on alone:

  groups  the trainer's optimizer: two param groups (no weight decay on BN/bias)
  acc     loss and accuracy accumulated on the device every step
  check   acc + loss_sum.item() every CHECK_EVERY steps (the divergence check)
  lr      lr_at() written into every param group every step
  all     all of the above (a copy of train()'s step)
  fused   all, with SGD(fused=True): one multi-tensor kernel per group instead of ~5 foreach ops
  lean    all, accumulating with fewer kernels (add_ with alpha; one in-place count)
  train   search.trial.train.train itself (its second epoch)

Per variant and round: a fresh model, one untimed pass, one timed pass; rounds
alternate the order. Reports GPU time per step (CUDA events) and host CPU time
per step (time.thread_time of the loop thread: the cost of issuing the work).

    PYTHONPATH=. python benchmarks/trainer_ablation.py                 # GPU: cifar_wrn 16-4 and resnet18, batch 128
    PYTHONPATH=. python benchmarks/trainer_ablation.py --device cpu --quick

Needs no ray, optuna or mlflow.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (EpochClock, TimedLoader, device_line, fmt, markdown_table, model_label,  # noqa: E402
                     parse_model_spec, set_threads, sync, synthetic_sizes)

import search.trial.train as T  # noqa: E402
from search.config import TrialConfig  # noqa: E402
from search.trial.data import load_data, resolve_device  # noqa: E402
from search.trial.models import build_model  # noqa: E402

VARIANTS = ("plain", "groups", "acc", "check", "lr", "all", "fused", "lean", "train")
FULL = dict(models="cifar_wrn:16:4,resnet18:none:1", batch_size=128, n_train=25_600, image_size=32, rounds=3)
QUICK = dict(models="cifar_wrn:10:1", batch_size=64, n_train=512, image_size=16, rounds=2)


def run_variant(name: str, cfg: TrialConfig, data: Any, device: torch.device) -> tuple[float, float]:
    """(GPU-or-wall seconds per step, host CPU seconds per step) of one timed pass."""
    cuda = device.type == "cuda"
    if cfg.compile and cuda:
        torch._dynamo.reset()  # every variant compiles afresh (inductor's on-disk cache still helps)
    model = build_model(cfg, num_classes=data.num_classes).to(device)
    if name == "train":
        clock = EpochClock(device)
        cpu = []

        class CpuTimed(TimedLoader):
            def __iter__(self):  # noqa: ANN204
                c0 = time.thread_time()
                yield from super().__iter__()
                cpu.append(time.thread_time() - c0)

        T.train(model, dataclasses.replace(data, train=CpuTimed(data.train, clock)), cfg.replace(epochs=2), device)
        secs, _ = clock.seconds(skip=1)
        steps = len(data.train)
        return secs / steps, cpu[-1] / steps
    full = name in ("all", "fused", "lean")
    flags = {"groups": name == "groups" or full, "acc": name in ("acc", "check") or full,
             "check": name == "check" or full, "lr": name == "lr" or full}
    model.train()
    if cuda:
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cfg.compile and cuda else model
    if flags["groups"]:
        opt = T._optimizer(model, cfg)
        if name == "fused" and cuda:
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                  fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    autocast = T._autocast(device, cfg.amp)
    steps_per = len(data.train)
    total = 2 * steps_per
    clock = EpochClock(device)
    step = 0
    cpu = 0.0
    for p in range(2):  # pass 0 untimed
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        clock.start()
        c0 = time.thread_time()
        for x, y in data.train:
            if flags["lr"]:
                lr = T.lr_at(step, total, 0, cfg.lr, cfg.schedule)
                for g in opt.param_groups:
                    g["lr"] = lr
            with autocast:
                logits = net(x)
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if name == "lean":
                loss_sum.add_(loss.detach().float(), alpha=y.shape[0])
                correct.add_((logits.detach().argmax(1) == y).sum())
            elif flags["acc"]:
                loss_sum += loss.detach().float() * y.shape[0]
                correct += (logits.detach().argmax(1) == y).sum()
            step += 1
            if flags["check"] and step % T.CHECK_EVERY == 0 and not math.isfinite(loss_sum.item()):
                break
        cpu = time.thread_time() - c0
        clock.stop(steps_per)
    secs, _ = clock.seconds(skip=1)
    return secs / steps_per, cpu / steps_per


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int)
    p.add_argument("--compile", action="store_true", help="torch.compile the model in every variant (CUDA)")
    args = p.parse_args(argv)
    args.device = resolve_device(args.device)
    for k, v in (QUICK if args.quick or args.device.type == "cpu" else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    set_threads(args.threads)
    device = args.device
    variants = args.variants.split(",")
    print("trainer_ablation: per-step cost of each of train()'s extras over a plain loop")
    print(device_line(device))
    print(f"batch {args.batch_size}, {args.n_train} synthetic 3x{args.image_size}x{args.image_size} images "
          f"({args.n_train // args.batch_size} steps per timed pass), rounds {args.rounds}, "
          f"compile {'on' if args.compile and device.type == 'cuda' else 'off'}; GPU ms/step by CUDA events "
          "(wall on CPU), host ms/step by time.thread_time of the loop thread")
    for spec in args.models.split(","):
        backbone, depth, width = parse_model_spec(spec)
        cfg = TrialConfig(backbone=backbone, depth=depth, width=width, dataset="synthetic", image_size=args.image_size,
                          batch_size=args.batch_size, epochs=2, device=device.type, seed=0, compile=args.compile)
        with synthetic_sizes(args.n_train, 256):
            data = load_data(cfg, device)
        data.train.flip = True
        got: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                got[v].append(run_variant(v, cfg, data, device))
                sync(device)
        base = statistics.median(g for g, _ in got["plain"]) if "plain" in got else math.nan
        rows = []
        for v in variants:
            g = statistics.median(a for a, _ in got[v])
            c = statistics.median(b for _, b in got[v])
            rows.append([v, fmt(1e3 * g, ".3f"), fmt(1e3 * c, ".3f"), fmt(base / g, ".3f"),
                         " ".join(fmt(1e3 * a, ".2f") for a, _ in got[v])])
        print(f"{model_label(backbone, depth, width)}, batch {args.batch_size}:")
        print(markdown_table(("variant", "GPU ms/step", "host ms/step", "plain/variant speed", "rounds ms"), rows),
              flush=True)
        del data


if __name__ == "__main__":
    main()
