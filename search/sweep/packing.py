"""`--gpus-per-trial auto`: how many trials of one configuration fit on a GPU.

Ray accounts GPU fractions but does not isolate GPU memory, so the fraction
must come from a measurement: the peak memory of one training step of the
trial's model and batch size, plus the CUDA context each process pays, with
headroom. Packing then never runs a GPU out of memory.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["gpu_fraction", "measure_step_peak_bytes", "auto_gpus_per_trial"]

CUDA_CONTEXT_BYTES = 700 * 2**20  # per-process CUDA context + allocator slack: 645 MiB measured on an H100 (torch 2.11)
HEADROOM = 1.25  # peak varies with data order and cudnn algorithm choice
MAX_PER_GPU = 8  # beyond this, kernel launch contention dominates on one GPU


def gpu_fraction(peak_bytes: int, total_bytes: int, *, headroom: float = HEADROOM,
                 context_bytes: int = CUDA_CONTEXT_BYTES, max_per_gpu: int = MAX_PER_GPU) -> float:
    """The GPU fraction 1/k for the largest k trials that fit in `total_bytes`.

    Raises:
        ValueError: one trial alone does not fit.
    """
    need = peak_bytes * headroom + context_bytes
    if need > total_bytes:
        raise ValueError(f"--gpus-per-trial auto: one trial needs ~{need / 2**30:.1f} GiB "
                         f"but the GPU has {total_bytes / 2**30:.1f} GiB; lower batch_size or width")
    k = max(1, min(max_per_gpu, int(total_bytes // need)))
    return 1.0 / k


def resident_data_bytes(cfg: "object") -> int:
    """Bytes of the uint8 dataset a trial keeps on the GPU, with its padded training copy.

    imagefolder streams through a DataLoader and keeps nothing resident.
    """
    from search import registry

    n = registry.get("dataset", cfg.dataset).meta["images"] or 0  # train + test images it holds on the device
    n = n(cfg) if callable(n) else n
    if cfg.train_samples:
        n = min(n, cfg.train_samples + n // 6)
    pad = cfg.image_size // 8
    per_image = cfg.in_chans * cfg.image_size ** 2
    padded = cfg.in_chans * (cfg.image_size + 2 * pad) ** 2
    return int(n * (per_image + padded))


def measure_step_peak_bytes(cfg: "object") -> tuple[int, int]:
    """Peak CUDA memory of one forward/backward/step of `cfg`'s model at its batch size.

    Returns:
        (peak bytes of the step, total bytes of GPU 0).

    Raises:
        RuntimeError: no CUDA device.
    """
    import torch

    from search.trial.models import build_model

    if not torch.cuda.is_available():
        raise RuntimeError("--gpus-per-trial auto needs a CUDA device to measure on")
    dev = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    torch.backends.cudnn.benchmark = True  # as in training: the autotuner's workspaces count too
    base = torch.cuda.memory_reserved(dev)
    model = build_model(cfg).to(dev).train()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(cfg.batch_size, cfg.in_chans, cfg.image_size, cfg.image_size, device=dev)
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device=dev)
    for _ in range(2):  # the second step holds optimizer state too
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(dev)
    # Reserved, not allocated: the caching allocator's blocks are what a neighbour cannot use.
    peak = torch.cuda.max_memory_reserved(dev) - base + resident_data_bytes(cfg)
    total = torch.cuda.get_device_properties(dev).total_memory
    del model, opt, x, y
    torch.cuda.empty_cache()
    return int(peak), int(total)


def auto_gpus_per_trial(configs: list[dict], measure: Callable[[object], tuple[int, int]] | None = None) -> float:
    """One fraction for a sweep: sized by the most memory-hungry configuration.

    `measure` is injectable so the choice is testable without a GPU.
    """
    from search.config import TrialConfig

    measure = measure or measure_step_peak_bytes
    cfgs = [TrialConfig.from_dict(c) for c in configs]
    # Memory grows with width, depth, batch and image size: measure the largest of each backbone.
    def size(c: TrialConfig) -> float:
        return c.width ** 2 * (c.depth or 1) * c.batch_size * c.image_size ** 2

    worst: dict[str, TrialConfig] = {}
    for c in cfgs:
        if c.backbone not in worst or size(c) > size(worst[c.backbone]):
            worst[c.backbone] = c
    fractions = []
    for c in worst.values():
        peak, total = measure(c)
        fractions.append(gpu_fraction(peak, total))
    return max(fractions)
