"""Cost of run_trial's probe block (variance shift, BN re-estimation, evaluation) as a fraction of one epoch.

run_trial, after training, runs: measure_variance_shift on the training set
(eval mode), reestimate_bn on the training set, evaluate on the test set, and
measure_variance_shift again. This script
  1. runs search.trial.run_trial itself and divides its probe_time_s by the
     last epoch's epoch_time_s (training steps only; epoch 1 is the warm-up),
     once with the whole training set (probe_samples None, the paper's protocol)
     and once with probe_samples = --probe-samples (the lever run_trial offers),
  2. trains the same configuration again with search.trial.train.train and times
     each call of that block separately, cold (first call, as in a trial) and warm,
  3. times what-if variants of the block on the same model: larger
     inference batches, bf16 autocast (CUDA), a subset of the training set.
Timer: time.perf_counter around each call, synchronised on CUDA (as run_trial's own
probe_time_s and train()'s epoch_time_s). Target: the block <= 10% of an epoch.

    PYTHONPATH=. python benchmarks/probe_cost.py                    # GPU: cifar_wrn 16-4, 50k synthetic 3x32x32
    PYTHONPATH=. python benchmarks/probe_cost.py --device cpu --quick

Needs no ray, optuna or mlflow.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, when imported from elsewhere

from _common import (device_line, fmt, markdown_table, parse_with_defaults, set_threads, sync,  # noqa: E402
                     synthetic_sizes)

from search.config import TrialConfig  # noqa: E402
from search.trial.data import TensorLoader, load_data  # noqa: E402
from search.trial.models import build_model  # noqa: E402
from search.trial.probes import measure_variance_shift, reestimate_bn  # noqa: E402
from search.trial.train import evaluate, train  # noqa: E402
from search.trial.runner import _first, run_trial  # noqa: E402

TARGET = 0.10
FULL = dict(depth=16, width=4.0, batch_size=128, n_train=50_000, n_test=10_000, image_size=32, probe_samples=5000)
# CPU: WRN-16 keeps the 16-4 layer count (same number of BN hooks per batch) at width 1 and 16 px.
QUICK = dict(depth=16, width=1.0, batch_size=64, n_train=1024, n_test=256, image_size=16, probe_samples=128)
HEADERS = ("variant", "measure s", "reestimate s", "eval after s", "measure after s", "block s", "% of epoch")
PARTS = ("measure", "reestimate", "eval", "measure_after")


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def probe_block(model: torch.nn.Module, train_eval: Any, test: Any, device: torch.device, *,
                bf16: bool = False, eval_amp: bool = True) -> dict[str, float]:
    """Seconds of each call of run_trial's probe block (search/trial.py), in its order.

    bf16 wraps the probe passes in autocast (a what-if: run_trial runs them in fp32).
    """
    cuda = device.type == "cuda"
    ac = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 and cuda else contextlib.nullcontext

    def measure() -> None:
        with ac():
            measure_variance_shift(model, train_eval, device)

    def reest() -> None:
        with ac():
            reestimate_bn(model, train_eval, device)

    return {"measure": _timed(measure, device), "reestimate": _timed(reest, device),
            "eval": _timed(lambda: evaluate(model, test, device, amp=eval_amp and cuda), device),
            "measure_after": _timed(measure, device)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--quick", action="store_true", help="small CPU-sized defaults (implied on CPU)")
    p.add_argument("--backbone", default="cifar_wrn")
    p.add_argument("--depth", type=int, help="GPU default 16")
    p.add_argument("--width", type=float, help="GPU default 4")
    p.add_argument("--batch-size", type=int, help="training (and, as in run_trial, probe) batch; GPU default 128")
    p.add_argument("--n-train", type=int, help=f"synthetic training images (GPU default {FULL['n_train']})")
    p.add_argument("--n-test", type=int, help=f"synthetic test images (GPU default {FULL['n_test']})")
    p.add_argument("--image-size", type=int, help="GPU default 32")
    p.add_argument("--probe-batch", type=int, help="what-if inference batch (default 4 x batch size)")
    p.add_argument("--probe-samples", type=int, help="run_trial's probe_samples for the second trial (GPU default "
                   f"{FULL['probe_samples']} of {FULL['n_train']}); 0 skips it")
    p.add_argument("--subset", type=float, default=0.2, help="what-if fraction of the training set for the probes")
    p.add_argument("--compile", action="store_true", help="torch.compile in training (CUDA)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parse_with_defaults(p, argv, FULL, QUICK)
    args.probe_batch = args.probe_batch or 4 * args.batch_size
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    set_threads(args.threads)
    device = args.device
    cuda = device.type == "cuda"
    cfg = TrialConfig(backbone=args.backbone, depth=args.depth, width=args.width, dataset="synthetic",
                      image_size=args.image_size, batch_size=args.batch_size, epochs=2, compile=args.compile,
                      device=device.type, seed=0)
    print(f"probe_cost: run_trial's probe block vs one training epoch, {args.backbone}-{args.depth}-{args.width:g}, "
          f"batch {args.batch_size}, synthetic 3x{args.image_size}x{args.image_size}, {args.n_train} training / "
          f"{args.n_test} test images")
    print(device_line(device))
    print("timer: time.perf_counter, CUDA-synchronised; epoch = train()'s epoch_time_s of epoch 2 (training steps "
          "incl. batch production, no evaluation; epoch 1 is the warm-up); block = measure_variance_shift(train) + "
          "reestimate_bn(train) + evaluate(test) + measure_variance_shift(train) as search/trial.py runs it")

    with synthetic_sizes(args.n_train, args.n_test):
        # 1. The real thing.
        res = run_trial(cfg)
        if res.status != "ok":
            raise SystemExit(f"run_trial ended with status {res.status!r}; nothing to time")
        epoch_rt = res.history[-1]["epoch_time_s"]
        use_ps = bool(args.probe_samples) and args.probe_samples < args.n_train  # else it is the whole set again
        res_ps = run_trial(cfg.replace(probe_samples=args.probe_samples)) if use_ps else None
        # 2. Same configuration, trained again, so the block can be timed call by call.
        data = load_data(cfg, device)
    model = build_model(cfg, num_classes=data.num_classes).to(device)
    out = train(model, data, cfg, device)
    epoch = out.history[-1]["epoch_time_s"]

    rows: list[dict[str, Any]] = [dict(variant="run_trial probe_time_s", parts=None,  # whole training set
                                       block=res.probe_time_s, frac=res.probe_time_s / epoch_rt)]
    if res_ps is not None:
        rows.append(dict(variant=f"run_trial probe_time_s, probe_samples={args.probe_samples}", parts=None,
                         block=res_ps.probe_time_s, frac=res_ps.probe_time_s / res_ps.history[-1]["epoch_time_s"]))

    def add(name: str, parts: dict[str, float] | None) -> None:
        if parts is None:
            rows.append(dict(variant=name, parts=None, block=None, frac=None))
            return
        block = sum(parts.values())
        rows.append(dict(variant=name, parts=parts, block=block, frac=block / epoch))

    add("same calls, cold (first call)", probe_block(model, data.train_eval, data.test, device))
    add("same calls, warm (repeat)", probe_block(model, data.train_eval, data.test, device))
    te = data.train_eval
    big = TensorLoader(te.images, te.labels, te.normalise, batch_size=args.probe_batch)
    n_sub = max(args.probe_batch, int(args.subset * len(te.labels)))
    sub = TensorLoader(te.images[:n_sub], te.labels[:n_sub], te.normalise, batch_size=args.probe_batch)
    if use_ps:
        first = _first(te, args.probe_samples)
        add(f"same calls, first {args.probe_samples} images (probe_samples), warm",
            probe_block(model, first, data.test, device))
    add(f"what-if: probe batch {args.probe_batch}", probe_block(model, big, data.test, device))
    add("what-if: bf16 autocast", probe_block(model, te, data.test, device, bf16=True) if cuda else None)
    add(f"what-if: bf16 + batch {args.probe_batch}",
        probe_block(model, big, data.test, device, bf16=True) if cuda else None)
    add(f"what-if: {'bf16 + ' if cuda else ''}batch {args.probe_batch} + {n_sub} images",
        probe_block(model, sub, data.test, device, bf16=cuda))

    table = []
    for r in rows:
        parts = r["parts"] or {}
        table.append([r["variant"], *(fmt(parts.get(k), ".3f") for k in PARTS), fmt(r["block"], ".3f"),
                      fmt(None if r["frac"] is None else 100 * r["frac"], ".1f")])
    print(f"epoch: {epoch:.3f} s in the call-by-call run ({out.images_seen // 2} images), "
          f"{epoch_rt:.3f} s in run_trial")
    print(markdown_table(HEADERS, table))
    for r in rows[:1 + (res_ps is not None)]:
        print(f"target block <= {TARGET:.0%} of an epoch: {r['variant']}: {100 * r['frac']:.1f}% -> "
              + ("ok" if r["frac"] <= TARGET else "ABOVE TARGET"))
    return rows


if __name__ == "__main__":
    main()
