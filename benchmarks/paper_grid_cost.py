"""What the paper's grid (`paper_cifar --profile paper`, 104 trials) costs on GPUs, from measured rates.

For each paper network at its recipe's batch size (PreResNet-110, ResNeXt-29 8x64d and
WRN-28-10 at 128, DenseNet-BC-100 at 64; read from spaces.paper_cifar, not restated
here), on CIFAR-shaped synthetic data (uint8 3x32x32, crop + flip), in this process:

  eager     run_trial with cuda_graphs=off: training img/s of the timed epochs
  graphed   run_trial with cuda_graphs=on (the default 'auto' on CUDA): img/s, GPU busy,
            MFU, peak reserved memory, the probe block (probe_samples 5000) and the
            per-epoch test evaluation, in seconds and as a share of a CIFAR epoch
  hand      a hand-written loop replaying one explicit torch.cuda.CUDAGraph of
            forward/backward/fused SGD (constant lr, ragged batch dropped): the
            reference for "trainer >= 0.95 x a hand-written loop with the same capture"
  packed    k = 1 / the fraction `--gpus-per-trial auto` picks (search.sweep.packing),
            k worker processes training at once (benchmarks/packing.py's machinery):
            aggregate img/s and GPU busy

The graphed run follows the eager one in the same process, as a reused Ray actor runs
its next trial: data stays resident (search.trial.data's cache) and cuDNN is warm, so
its probe block is the steady-state figure. Then the projection: per trial,
epochs x (50,000 / img/s + test evaluation) + probe block, summed over the 104 grid
trials; packed, divided by the measured aggregate speed-up; on 8 GPUs, the larger of
a perfect 1/8 split and the longest single trial.

    PYTHONPATH=. python benchmarks/paper_grid_cost.py                      # GPU: the four networks
    PYTHONPATH=. python benchmarks/paper_grid_cost.py --models cifar_wrn:16:4@128 --no-pack
    PYTHONPATH=. python benchmarks/paper_grid_cost.py --device cpu --quick # tiny sizes: the shape of the output only

Needs no ray, optuna or mlflow (torch, numpy and the project's search.* / spaces only).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # _common and packing, when imported from elsewhere

from _common import (EpochClock, device_line, fmt, forward_flops_per_image, markdown_table,  # noqa: E402
                     model_label, parse_with_defaults, peak_bf16_flops, set_threads, synthetic_sizes)

CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
TARGET_BUSY, TARGET_SPEEDUP, TARGET_HOURS, TARGET_PROBE, TARGET_HAND = 0.60, 2.0, 32.0, 0.10, 0.95
# GPU: enough images per timed epoch for a steady rate, few enough that four networks, the hand loop and the
# packed workers fit in ~10 minutes on an H100/H200 (benchmarks/gpu_session.sh).
FULL = dict(n_train=12_800, n_test=CIFAR_TEST, image_size=32, warmup_epochs=1, epochs=1, probe_samples=5000,
            pack_n_train=5_120, pack_epochs=1)
# CPU: tiny networks and data; only the shape of the output means anything.
QUICK = dict(n_train=48, n_test=16, image_size=8, warmup_epochs=1, epochs=1, probe_samples=16, pack_n_train=48,
             pack_epochs=1)
QUICK_ARCH = {"cifar_preresnet": (8, 1.0), "cifar_resnext": (11, 0.25), "cifar_wrn": (10, 1.0),
              "cifar_densenet_bc": (10, 1.0)}  # one block per stage, as spaces.paper_cifar's quick profile
HEADERS = ("network", "batch", "eager img/s", "graphed img/s", "graphed/eager", "hand img/s", "trainer/hand",
           "busy eager", "busy graphed", "MFU graphed", "peak GiB", "eval s/epoch", "probe block s",
           "probe % of epoch", "auto k", "packed img/s", "packed/single", "busy packed")
PROJ_HEADERS = ("setting", "GPU-hours (1 GPU, sum)", "wall h on 8 GPUs", "longest trial h")


def paper_networks() -> list[dict[str, Any]]:
    """The distinct networks of `paper_cifar --profile paper` with their recipe and trial count."""
    import spaces

    nets: dict[tuple, dict[str, Any]] = {}
    for c in spaces.get_space("paper_cifar").grid("paper"):
        key = (c["backbone"], c["depth"], float(c["width"]), c["batch_size"])
        n = nets.setdefault(key, dict(backbone=key[0], depth=key[1], width=key[2], batch_size=key[3],
                                      epochs=c["epochs"], lr=c["lr"], trials=0))
        n["trials"] += 1
        if n["epochs"] != c["epochs"]:
            raise ValueError(f"{key}: trials with different epoch counts ({n['epochs']}, {c['epochs']})")
    return list(nets.values())


def parse_spec(spec: str) -> dict[str, Any]:
    """'cifar_wrn:16:4@128' -> backbone, depth, width, batch_size (epochs/trials unknown: not projected)."""
    arch, _, batch = spec.partition("@")
    parts = arch.split(":")
    depth = None if len(parts) < 2 or parts[1].lower() in ("", "none") else int(parts[1])
    return dict(backbone=parts[0], depth=depth, width=float(parts[2]) if len(parts) > 2 else 1.0,
                batch_size=int(batch or 128), epochs=None, lr=0.1, trials=0)


# ------------------------------------------------------------------ measurements
def _trial_cfg(net: dict[str, Any], args: argparse.Namespace, **kw: Any):
    from search.config import TrialConfig

    return TrialConfig(backbone=net["backbone"], depth=net["depth"], width=net["width"], dataset="synthetic",
                       image_size=args.image_size, batch_size=net["batch_size"], lr=net["lr"],
                       epochs=args.warmup_epochs + args.epochs, probe_samples=args.probe_samples,
                       device=args.device.type, schedule="multistep", seed=0, **kw)


def timed_trial(cfg: Any, warm: int, sampler: Any) -> dict[str, Any]:
    """run_trial of cfg; img/s of the epochs after the first `warm`, busy over their window, eval and probe s."""
    from search.trial.runner import run_trial

    stamps: list[float] = []
    cuda = cfg.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    r = run_trial(cfg, report=lambda m: stamps.append(time.time()))
    out: dict[str, Any] = dict(status=r.status, probe_s=r.probe_time_s if r.status == "ok" else math.nan,
                               peak=torch.cuda.max_memory_reserved() / 2**30 if cuda else None)
    timed = r.history[warm:]
    images = sum(h["throughput"] * h["epoch_time_s"] for h in timed)
    out["rate"] = images / sum(h["epoch_time_s"] for h in timed) if timed else math.nan
    # on_epoch fires right after the epoch's test evaluation: between two reports lie one epoch and one eval.
    if len(stamps) >= 2:
        out["eval_s"] = max(0.0, stamps[-1] - stamps[-2] - r.history[-1]["epoch_time_s"])
    else:
        out["eval_s"] = math.nan
    # Window: from the last warm-up epoch's report to the last report (the timed epochs and their evaluations).
    out["busy"] = sampler.busy(stamps[warm - 1], stamps[-1]) if sampler and warm and len(stamps) > warm else None
    return out


def hand_graphed_rate(cfg: Any, epochs: int) -> float:
    """Images/s of a minimal loop replaying one explicit CUDA graph of the whole step (PyTorch's recipe)."""
    from search.trial.data import load_data
    from search.trial.models import build_model

    dev = torch.device("cuda")
    data = load_data(cfg, dev)  # resident from the trials before: no reload
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=data.num_classes).to(dev).to(memory_format=torch.channels_last).train()
    lr = torch.tensor(cfg.lr, device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay,
                          fused=True)
    x0, y0 = next(iter(data.train))
    sx, sy = x0.clone(), y0.clone()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(model(sx), sy)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step()
    clock = EpochClock(dev)
    for _ in range(1 + epochs):  # the first pass is a warm-up
        clock.start()
        n = 0
        for x, y in data.train:
            if x.shape[0] != sx.shape[0]:
                continue  # ragged last batch: dropped (the trainer pads it)
            sx.copy_(x)
            sy.copy_(y)
            graph.replay()
            n += x.shape[0]
        clock.stop(n)
    rate = clock.images_per_s(skip=1)
    del graph, opt, model
    return rate


def reduce_overhead_rate(cfg: Any, epochs: int) -> float:
    """Images/s of a minimal loop over torch.compile(model, mode="reduce-overhead") (the alternative to an
    explicit graph: Inductor kernels replayed from cudagraph trees) with fused SGD reading lr from a tensor.

    Static shapes as in the graphed trainer (ragged batch dropped), so nothing recompiles; the first pass
    (compilation, graph recording) is not timed.
    """
    from search.trial.data import load_data
    from search.trial.models import build_model

    dev = torch.device("cuda")
    data = load_data(cfg, dev)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=data.num_classes).to(dev).to(memory_format=torch.channels_last).train()
    net = torch.compile(model, mode="reduce-overhead")
    lr = torch.tensor(cfg.lr, device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay,
                          fused=True)
    size = cfg.batch_size
    clock = EpochClock(dev)
    for _ in range(1 + epochs):
        clock.start()
        n = 0
        for x, y in data.train:
            if x.shape[0] != size:
                continue
            torch.compiler.cudagraph_mark_step_begin()  # each step a new cudagraph-trees iteration
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += size
        clock.stop(n)
    rate = clock.images_per_s(skip=1)
    del net, opt, model
    torch._dynamo.reset()
    return rate


def auto_k(cfg: Any) -> tuple[int | None, str]:
    """Trials per GPU that `--gpus-per-trial auto` picks for cfg, measured here (CUDA only)."""
    from search.sweep.packing import gpu_fraction, measure_step_peak_bytes

    peak, total = measure_step_peak_bytes(cfg)
    try:
        return round(1 / gpu_fraction(peak, total)), f"step peak {peak / 2**30:.2f} GiB of {total / 2**30:.0f} GiB"
    except ValueError as e:
        return None, str(e)


def packed(net: dict[str, Any], k: int, args: argparse.Namespace) -> dict[str, Any]:
    """k concurrent worker processes of `net` (packing.py's run_k): aggregate img/s, busy, status."""
    import packing

    spec = dict(backbone=net["backbone"], depth=net["depth"], width=net["width"], batch_size=net["batch_size"],
                image_size=args.image_size, n_train=args.pack_n_train, n_test=args.n_test // 10 or 1,
                epochs=args.pack_epochs, warmup_epochs=1, device="cuda")
    ns = argparse.Namespace(threads=None, sample_ms=100, gpu_index=args.gpu_index, timeout=args.pack_timeout)
    with tempfile.TemporaryDirectory(prefix="grid_pack_") as tmp:
        return packing.run_k(k, spec, ns, Path(tmp))


def measure(net: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of one network's table row (n/a where CPU or a flag rules it out)."""
    import packing

    from search.trial.data import clear_resident

    cuda = args.device.type == "cuda"
    row: dict[str, Any] = dict(net)
    sampler = packing.BusySampler(100, args.gpu_index) if cuda else None
    if sampler:
        sampler.start()
    try:
        with synthetic_sizes(args.n_train, args.n_test):
            w = args.warmup_epochs
            eager = timed_trial(_trial_cfg(net, args, cuda_graphs="off"), w, sampler)
            graphed = timed_trial(_trial_cfg(net, args, cuda_graphs="on"), w, sampler) if cuda else None
            cfg = _trial_cfg(net, args)
            row["hand"] = hand_graphed_rate(cfg, args.epochs) if cuda and not args.no_hand else None
            row["compiled"] = reduce_overhead_rate(cfg, args.epochs) if cuda and args.reduce_overhead else None
            clear_resident()
            if cuda:
                torch.cuda.empty_cache()  # the packed workers get the memory back
            row["flops"] = forward_flops_per_image(cfg)
            # Sized as the grid's trials: CIFAR-100 resident (60,000 images) and its 100-class head.
            row["k"], row["k_why"] = auto_k(cfg.replace(dataset="cifar100")) if cuda else (None, "n/a (needs CUDA)")
    finally:
        if sampler:
            sampler.stop()
    row["eager"], row["graphed"] = eager, graphed
    row["pack"] = packed(net, row["k"], args) if cuda and row["k"] and not args.no_pack else None
    return row


# ------------------------------------------------------------------ projection
def trial_seconds(row: dict[str, Any], mode: str) -> float:
    """GPU seconds of one trial of this network alone on a GPU at its recipe's epochs."""
    m = row[mode]
    if m is None or not math.isfinite(m["rate"]) or row["epochs"] is None:
        return math.nan
    scale = CIFAR_TEST / row["n_test"]
    eval_s = m["eval_s"] * scale
    probe_s = m["probe_s"] + m["eval_s"] * (scale - 1)  # the block evaluates the test set once
    return row["epochs"] * (CIFAR_TRAIN / m["rate"] + eval_s) + probe_s


def project(rows: list[dict[str, Any]]) -> list[list[str]]:
    """GPU-hours of the grid: eager alone, graphed alone, graphed packed at auto's k (measured speed-up)."""
    out = []
    for name, mode, pack in (("eager, one trial per GPU", "eager", False), ("graphed, one trial per GPU", "graphed",
                                                                          False),
                             ("graphed, packed at auto k", "graphed", True)):
        total = longest = 0.0
        for r in rows:
            if not r["trials"]:
                continue
            t = trial_seconds(r, mode)
            wall = t
            if pack:
                p = r.get("pack")
                single = r[mode]["rate"] if r[mode] else math.nan
                speedup = p["aggregate"] / single if p and p["status"] == "ok" else math.nan
                # k trials share the GPU: each lasts k / speedup times longer, the GPU-time per trial shrinks by it.
                wall, t = t * (r["k"] or 1) / speedup, t / speedup
            longest = max(longest, wall) if math.isfinite(wall) else math.nan  # NaN (unmeasured) sticks
            total += r["trials"] * t
        wall8 = max(total / 8, longest)
        out.append([name, fmt(total / 3600, ",.1f"), fmt(wall8 / 3600, ",.1f"), fmt(longest / 3600, ",.2f")])
    return out


# ------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized defaults (implied on CPU)")
    p.add_argument("--models", help="comma list backbone:depth:width@batch to measure instead of the paper "
                                    "networks (not projected: no recipe)")
    p.add_argument("--only", help="comma list of paper backbones to measure (their grid trials only are projected)")
    p.add_argument("--n-train", type=int, help=f"synthetic training images (GPU default {FULL['n_train']})")
    p.add_argument("--n-test", type=int, help=f"synthetic test images (GPU default {FULL['n_test']})")
    p.add_argument("--image-size", type=int)
    p.add_argument("--warmup-epochs", type=int)
    p.add_argument("--epochs", type=int, help="timed epochs per run")
    p.add_argument("--probe-samples", type=int)
    p.add_argument("--pack-n-train", type=int, help="training images per packed worker")
    p.add_argument("--pack-epochs", type=int)
    p.add_argument("--pack-timeout", type=float, default=300)
    p.add_argument("--no-pack", action="store_true", help="skip the packed workers")
    p.add_argument("--no-hand", action="store_true", help="skip the hand-written graphed loop")
    p.add_argument("--reduce-overhead", action="store_true",
                   help="also time torch.compile(mode='reduce-overhead') in a minimal loop (compiles: minutes)")
    p.add_argument("--gpu-index", default=None)
    p.add_argument("--threads", type=int, help="torch CPU threads (CPU runs)")
    p.add_argument("--peak-flops", type=float, help="peak dense bf16 FLOP/s if the GPU is not in _common's table")
    p.add_argument("--json", help="also write the rows as JSON here")
    args = parse_with_defaults(p, argv, FULL, QUICK)
    if args.gpu_index is None:
        args.gpu_index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    set_threads(args.threads)
    cuda = args.device.type == "cuda"
    nets = [parse_spec(s) for s in args.models.split(",")] if args.models else paper_networks()
    if args.only:
        wanted = args.only.split(",")
        known = [n["backbone"] for n in nets]
        bad = [w for w in wanted if w not in known]
        if bad:
            raise SystemExit(f"--only {bad[0]!r} is not a paper network (allowed: {', '.join(known)})")
        nets = [n for n in nets if n["backbone"] in wanted]
    if not cuda:  # paper networks at one block per stage: the shape of the output, not the paper's cost
        for n in nets:
            if not args.models:
                n["depth"], n["width"] = QUICK_ARCH.get(n["backbone"], (n["depth"], n["width"]))
            n["batch_size"] = min(n["batch_size"], 16)
    print(f"paper_grid_cost: {sum(n['trials'] for n in nets)} grid trials over {len(nets)} networks; synthetic "
          f"3x{args.image_size}x{args.image_size}, {args.n_train} train / {args.n_test} test images, "
          f"{args.warmup_epochs} warm-up + {args.epochs} timed epochs per run, probe_samples {args.probe_samples}")
    print(device_line(args.device))
    peak, peak_src = peak_bf16_flops(args.device, args.peak_flops)
    print("timer: run_trial's per-epoch training time (perf_counter, CUDA-synchronised); hand loop: CUDA events; "
          "GPU busy: nvidia-smi utilization.gpu over the timed epochs incl. their test evaluation; "
          f"MFU peak: {peak_src}")
    rows, failed = [], []
    for net in nets:
        t0 = time.time()
        label = model_label(net["backbone"], net["depth"], net["width"])
        try:
            row = measure(net, args)
        except Exception as e:  # one network failing (capture, OOM) must not cost the others' figures
            failed.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"  FAILED {failed[-1]}", flush=True)
            if cuda:
                torch.cuda.empty_cache()
            continue
        row["n_test"] = args.n_test
        rows.append(row)
        # One JSON line per network as soon as it is measured: a run cut short still leaves its figures.
        print(f"  done {model_label(net['backbone'], net['depth'], net['width'])} in {time.time() - t0:.0f} s "
              f"@@row {json.dumps(row, default=str)}", flush=True)
    table = []
    for r in rows:
        e, g, p = r["eager"], r["graphed"], r.get("pack")
        base = g or e
        mfu = g["rate"] * 3 * r["flops"] / peak if g and peak else None
        epoch_s = CIFAR_TRAIN / base["rate"] if math.isfinite(base["rate"]) else math.nan
        probe_full = base["probe_s"] + base["eval_s"] * (CIFAR_TEST / args.n_test - 1)
        table.append([
            model_label(r["backbone"], r["depth"], r["width"]), str(r["batch_size"]), fmt(e["rate"]),
            fmt(g["rate"]) if g else "n/a", fmt(g["rate"] / e["rate"], ".2f") if g else "n/a",
            fmt(r["hand"]), fmt(g["rate"] / r["hand"], ".3f") if g and r["hand"] else "n/a",
            fmt(e["busy"], ".0%"), fmt(g["busy"], ".0%") if g else "n/a", fmt(mfu, ".1%"),
            fmt(base["peak"], ".2f"), fmt(base["eval_s"] * CIFAR_TEST / args.n_test, ".3f"),
            fmt(probe_full, ".3f"), fmt(100 * probe_full / epoch_s, ".1f"),
            str(r["k"]) if r["k"] else "n/a", fmt(p["aggregate"]) if p else "n/a",
            fmt(p["aggregate"] / base["rate"], ".2f") if p else "n/a", fmt(p["busy"], ".0%") if p else "n/a"])
    if table:
        print(markdown_table(HEADERS, table))
    if failed:
        print("not measured (their trials are left out of the projection): " + "; ".join(failed))
    if any(r.get("compiled") for r in rows):
        print(markdown_table(("network", "graphed trainer img/s", "hand graph img/s", "compile reduce-overhead img/s",
                              "hand/compiled"),
                             [[model_label(r["backbone"], r["depth"], r["width"]), fmt(r["graphed"]["rate"]),
                               fmt(r["hand"]), fmt(r["compiled"]), fmt(r["hand"] / r["compiled"], ".2f")
                               if r["hand"] and r["compiled"] else "n/a"] for r in rows]))
    why = "; ".join(f"{model_label(r['backbone'], r['depth'], r['width'])} {r['k_why']}" for r in rows)
    mode = "graphed" if cuda else "eager"
    print(f"probe % of epoch: run_trial's probe block (probe_samples {args.probe_samples}, one {CIFAR_TEST:,}-image "
          f"test evaluation) / a {CIFAR_TRAIN:,}-image epoch at the {mode} rate; auto k: {why}")
    print("status (eager, graphed, packed): " + "; ".join(
        f"{model_label(r['backbone'], r['depth'], r['width'])} {r['eager']['status']}, "
        f"{(r['graphed'] or {}).get('status', 'n/a')}, {(r.get('pack') or {}).get('status', 'n/a')}" for r in rows))
    if any(r["trials"] for r in rows):
        print(f"\nprojected cost of paper_cifar --profile paper ({sum(r['trials'] for r in rows)} trials; per trial "
              f"epochs x ({CIFAR_TRAIN:,} / img/s + test evaluation) + probe block; packed: / measured speed-up)")
        print(markdown_table(PROJ_HEADERS, project(rows)))
        if not cuda:
            print("(CPU, tiny networks: the hours mean nothing; the table's shape is what is checked)")
    print(f"targets: single small trial graphed busy >= {TARGET_BUSY:.0%} and graphed/eager >= {TARGET_SPEEDUP:g}; "
          f"grid <= {TARGET_HOURS:g} GPU-hours packed; probe block <= {TARGET_PROBE:.0%} of an epoch; "
          f"trainer/hand >= {TARGET_HAND}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=device_line(args.device), args={k: str(v) for k, v in vars(args).items()},
                           rows=rows), fh, indent=1, default=str)
    return rows


if __name__ == "__main__":
    main()
