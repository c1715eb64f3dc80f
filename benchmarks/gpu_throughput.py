"""Training images/s of run_trial's loop vs a plain loop on the same batches vs a DataLoader-fed loop, and MFU.

Three loops train the same model (same initial weights, batch size, SGD,
bf16 autocast and channels_last on CUDA, optional torch.compile) on the same
CIFAR-shaped synthetic images, one after another in this process:

  trainer     search.trial.train.train (the loop run_trial runs) over search.trial.data's
              device-resident batches (uint8 on the device, crop/flip gathered there)
  plain       a minimal hand-written zero_grad/forward/backward/step loop over
              the very same search.trial.data loader (isolates the trainer's own overhead)
  dataloader  the usual PyTorch recipe: a TensorDataset of uint8 CPU images,
              torchvision RandomCrop + RandomHorizontalFlip per image in DataLoader
              workers, pin_memory, non_blocking copies, normalised on the device

MFU = trainer images/s x training FLOPs per image / the GPU's peak dense bf16
FLOP/s, with training FLOPs = 3 x the forward FLOPs that
torch.utils.flop_counter counts on one batch (convs and matmuls only).

    PYTHONPATH=. python benchmarks/gpu_throughput.py            # GPU: WRN-16-4, WRN-28-10, resnet18; batch 128, 512
    PYTHONPATH=. python benchmarks/gpu_throughput.py --compile
    PYTHONPATH=. python benchmarks/gpu_throughput.py --device cpu --quick

Needs no ray, optuna or mlflow.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, when imported from elsewhere

from _common import (EpochClock, TimedLoader, device_line, fmt, forward_flops_per_image, markdown_table,  # noqa: E402
                     model_label, parse_model_spec, parse_with_defaults, peak_bf16_flops, set_threads,
                     synthetic_sizes)

from search.config import TrialConfig  # noqa: E402
from search.trial.data import load_data  # noqa: E402
from search.trial.models import build_model  # noqa: E402
from search.trial.train import train  # noqa: E402

TARGET_PLAIN = 0.95  # trainer / plain loop on the same batches
TARGET_DATALOADER = 1.5  # trainer / DataLoader-fed loop, CIFAR-sized data
# GPU: 3 alternating rounds of 1 timed epoch. On an H100 (2026-11-23) batch-128 steps are bound by the host issuing
# kernels and single rounds scattered +-15%; one round with the trainer always first read 0.83 of the plain loop
# where 3 alternating rounds read 0.99-1.02 (docs/performance.md).
FULL = dict(models="cifar_wrn:16:4,cifar_wrn:28:10,resnet18:none:1", batch_sizes="128,512", n_train=50_000,
            n_test=1000, image_size=32, warmup_epochs=1, epochs=1, workers=min(8, os.cpu_count() or 1), rounds=3)
# CPU: tiny models and data; 3 alternating rounds because a shared CPU drifts far more than a GPU.
QUICK = dict(models="cifar_wrn:10:1,resnet18:none:0.25", batch_sizes="64", n_train=512, n_test=64, image_size=16,
             warmup_epochs=1, epochs=2, workers=1, rounds=3)
HEADERS = ("model", "batch", "trainer img/s", "plain img/s", "dataloader img/s", "trainer/plain",
           "trainer/dataloader", "train GFLOP/img", "MFU")


class AugmentedTensorDataset(torch.utils.data.TensorDataset):
    """TensorDataset of (uint8 image, label) whose images pass through a per-image torchvision transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        super().__init__(images, labels)
        self.transform = transform

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().__getitem__(i)
        return self.transform(x), y


class DataLoaderFeed:
    """The DataLoader recipe: CPU workers augment uint8 images, pinned batches copied non_blocking.

    Normalisation runs on the device with search.trial.data's own normaliser (uint8 crosses
    PCIe, 4x fewer bytes than float): the kindest version of this baseline.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normalise: Callable, device: torch.device, *,
                 batch_size: int, pad: int, workers: int) -> None:
        from torchvision import transforms

        size = images.shape[-1]
        tf = transforms.Compose([transforms.RandomCrop(size, padding=pad), transforms.RandomHorizontalFlip()])
        ds = AugmentedTensorDataset(images.cpu(), labels.cpu(), tf)
        cuda = device.type == "cuda"
        self.loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=cuda,
            persistent_workers=workers > 0, drop_last=len(ds) % batch_size == 1)  # as search.trial.data: no batch of 1
        self.normalise, self.device = normalise, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield self.normalise(x), y


def _fresh_model(cfg: TrialConfig, num_classes: int, device: torch.device) -> torch.nn.Module:
    if cfg.compile and device.type == "cuda":
        # 18 compiled instances of a few forward() code objects would pass dynamo's recompile limit,
        # after which it silently runs eager: start every loop from an empty cache.
        torch._dynamo.reset()
    # build_model seeds from cfg.seed: every loop starts from the same weights.
    return build_model(cfg, num_classes=num_classes).to(device)


def run_trainer(cfg: TrialConfig, data: Any, device: torch.device, warmup: int) -> tuple[float, str]:
    """search.trial.train.train as run_trial calls it, its training loader wrapped in a clock. (images/s, status)."""
    clock = EpochClock(device)
    model = _fresh_model(cfg, data.num_classes, device)
    out = train(model, dataclasses.replace(data, train=TimedLoader(data.train, clock)), cfg, device)
    return clock.images_per_s(skip=warmup), out.status


def run_plain(cfg: TrialConfig, loader: Iterable, num_classes: int, device: torch.device,
              warmup: int) -> tuple[float, str]:
    """The minimal loop: zero_grad / forward / loss / backward / step, same autocast/channels_last/compile."""
    cuda = device.type == "cuda"
    clock = EpochClock(device)
    model = _fresh_model(cfg, num_classes, device).train()
    if cuda:
        torch.backends.cudnn.benchmark = True  # as train() does
    if cuda and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if cuda and cfg.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    timed = TimedLoader(loader, clock)
    for _ in range(cfg.epochs):
        for x, y in timed:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and cfg.amp):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clock.images_per_s(skip=warmup), "ok"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="small CPU-sized defaults (implied on CPU)")
    p.add_argument("--models", help=f"comma list of backbone:depth:width (GPU default {FULL['models']})")
    p.add_argument("--batch-sizes", help=f"comma list (GPU default {FULL['batch_sizes']})")
    p.add_argument("--n-train", type=int, help=f"synthetic training images (GPU default {FULL['n_train']})")
    p.add_argument("--n-test", type=int, help="synthetic test images (train() evaluates them each epoch, untimed)")
    p.add_argument("--image-size", type=int, help="input side in px (GPU default 32)")
    p.add_argument("--warmup-epochs", type=int, help="untimed epochs per loop (cudnn autotune, compile)")
    p.add_argument("--epochs", type=int, help="timed epochs per loop")
    p.add_argument("--workers", type=int, help="DataLoader workers of the dataloader loop")
    p.add_argument("--rounds", type=int, help="repeat the three loops, alternating order; median (GPU default 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in all three loops (CUDA)")
    p.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast")
    p.add_argument("--peak-flops", type=float, help="peak dense bf16 FLOP/s of the GPU (overrides the table)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parse_with_defaults(p, argv, FULL, QUICK)
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    set_threads(args.threads)
    device = args.device
    peak, peak_src = peak_bf16_flops(device, args.peak_flops)
    amp = not args.no_amp
    cuda = device.type == "cuda"
    print("gpu_throughput: training images/s of search.trial.train.train vs a plain loop on the same search.trial.data "
          "batches vs a DataLoader-fed loop")
    print(device_line(device))
    print(f"data: synthetic 3x{args.image_size}x{args.image_size} uint8, {args.n_train} training images, "
          f"crop pad {args.image_size // 8} + flip; bf16 autocast {'on' if amp and cuda else 'off'}, "
          f"channels_last {'on' if cuda else 'off'}, compile {'on' if args.compile and cuda else 'off'}; "
          f"DataLoader workers {args.workers}; warm-up epochs {args.warmup_epochs}, timed epochs {args.epochs}, "
          f"rounds {args.rounds}")
    print(("timer: CUDA events" if cuda else "timer: time.perf_counter") +
          " per epoch, from the loop's first batch request to loader exhaustion after the last step was issued "
          "(synchronised before each epoch): training steps incl. batch production, augmentation and host-to-device "
          "copies; excluding evaluation, warm-up epochs and compile")
    print(f"peak bf16 dense FLOP/s: {fmt(peak, '.3g')} ({peak_src}); MFU = trainer img/s x train FLOP/img / peak; "
          "train FLOP/img = 3 x forward FLOPs (torch.utils.flop_counter, convs+matmuls)")

    rows, table = [], []
    for bs in (int(b) for b in str(args.batch_sizes).split(",")):
        for spec in str(args.models).split(","):
            backbone, depth, width = parse_model_spec(spec)
            cfg = TrialConfig(backbone=backbone, depth=depth, width=width, dataset="synthetic",
                              image_size=args.image_size, in_chans=3, batch_size=bs,
                              epochs=args.warmup_epochs + args.epochs, amp=amp, channels_last=True,
                              compile=args.compile, device=device.type, seed=0)
            with synthetic_sizes(args.n_train, args.n_test):
                data = load_data(cfg, device)
            # search.trial.data skips flips for 'synthetic' (its patterns are not mirror-symmetric) but flips cifar10;
            # flip here too, so all three loops do the CIFAR recipe's work (crop + flip) on CIFAR-shaped data.
            data.train.flip = True
            feed = DataLoaderFeed(data.train.images, data.train.labels, data.train.normalise, device,
                                  batch_size=bs, pad=data.train.pad, workers=args.workers)
            loops = {
                "trainer": lambda: run_trainer(cfg, data, device, args.warmup_epochs),
                "plain": lambda: run_plain(cfg, data.train, data.num_classes, device, args.warmup_epochs),
                "dataloader": lambda: run_plain(cfg, feed, data.num_classes, device, args.warmup_epochs),
            }
            got: dict[str, list[float]] = {k: [] for k in loops}
            notes = []
            for r in range(args.rounds):  # alternate the order so drift (clocks, thermals) hits all alike
                for name in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
                    ips, status = loops[name]()
                    got[name].append(ips)
                    if status != "ok":
                        notes.append(f"{name} {status}")
                    _free(device)
            del feed, data
            _free(device)
            tr, pl, dl = (statistics.median(got[k]) for k in ("trainer", "plain", "dataloader"))
            flops = 3 * forward_flops_per_image(cfg, num_classes=10)
            mfu = tr * flops / peak if peak else None
            row = dict(model=model_label(backbone, depth, width), batch=bs, trainer=tr, plain=pl, dataloader=dl,
                       trainer_plain=tr / pl, trainer_dataloader=tr / dl, train_flops=flops, mfu=mfu, notes=notes)
            rows.append(row)
            table.append([row["model"], str(bs), fmt(tr), fmt(pl), fmt(dl), fmt(tr / pl, ".3f"),
                          fmt(tr / dl, ".2f"), fmt(flops / 1e9, ".3g"), fmt(mfu, ".1%")])
            runs = "; ".join(f"{k} " + ", ".join(fmt(v) for v in got[k]) for k in got)
            print(f"  done {row['model']} batch {bs}: img/s per round: {runs}"
                  + (f" ({', '.join(notes)})" if notes else ""), flush=True)
    print(markdown_table(HEADERS, table))
    low_p = [f"{r['model']}@{r['batch']}" for r in rows if not r["trainer_plain"] >= TARGET_PLAIN]
    low_d = [f"{r['model']}@{r['batch']}" for r in rows if not r["trainer_dataloader"] >= TARGET_DATALOADER]
    print(f"target trainer/plain >= {TARGET_PLAIN}: "
          + ("met by all rows" if not low_p else f"BELOW: {', '.join(low_p)}"))
    print(f"target trainer/dataloader >= {TARGET_DATALOADER} (CIFAR-sized data): "
          + ("met by all rows" if not low_d else f"BELOW: {', '.join(low_d)}"))
    return rows


if __name__ == "__main__":
    main()
