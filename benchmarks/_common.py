"""Helpers shared by the GPU benchmarks: epoch clocks, synthetic data size, FLOPs, peak FLOP/s, tables.

Imports only torch and the project's search.* modules that need no Ray, Optuna
or MLflow, so the scripts run on a bare GPU image with `PYTHONPATH=.`.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Iterable, Iterator, Sequence

import torch

import search.trial.data

__all__ = ["EpochClock", "TimedLoader", "synthetic_sizes", "sync", "device_line", "peak_bf16_flops", "peak_for_name",
           "forward_flops_per_image", "markdown_table", "parse_markdown_table", "parse_model_spec", "model_label",
           "set_threads", "fmt"]

# Peak dense bf16 tensor-core FLOP/s by GPU name (NVIDIA datasheets, no sparsity).
# First substring match wins, so the specific H100 variants come before plain "H100" (SXM).
PEAK_BF16_DENSE: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),       # H200 SXM/NVL and GH200 share the H100 SXM tensor cores
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),       # "NVIDIA H100 80GB HBM3" = SXM
    ("A100", 312e12),
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU threads; on a shared 2-core machine fewer threads avoid OpenMP spin-wait collapse."""
    if threads:
        torch.set_num_threads(threads)


class EpochClock:
    """Times passes over a loader: CUDA events on GPU (device timestamps), perf_counter on CPU.

    `start()` synchronises first, so a pass never inherits queued work from
    before it; `stop()` only records, the events are read at the end (no sync
    inside the timed region beyond what the loop itself does).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.spans: list[tuple[Any, Any, int]] = []  # (start, end, images) of completed passes
        self._open: Any = None

    def _mark(self) -> Any:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        sync(self.device)
        self._open = self._mark()

    def stop(self, images: int) -> None:
        if self._open is not None:
            self.spans.append((self._open, self._mark(), images))
        self._open = None

    def seconds(self, skip: int = 0) -> tuple[float, int]:
        """(total seconds, images) of the completed passes after the first `skip` (warm-up) ones."""
        sync(self.device)
        total, images = 0.0, 0
        for a, b, n in self.spans[skip:]:
            total += a.elapsed_time(b) / 1e3 if self.device.type == "cuda" else b - a
            images += n
        return total, images

    def images_per_s(self, skip: int = 0) -> float:
        total, images = self.seconds(skip)
        return images / total if total > 0 else math.nan


class TimedLoader:
    """Wraps a loader of (x, y) so each complete pass is timed by an EpochClock.

    The clock starts when the loop asks for the first batch and stops when the
    loader is exhausted, i.e. after the last step's work was enqueued: it covers
    batch production (gather, augmentation, host-to-device copies) and every
    training step, and nothing the loop does between passes (evaluation).
    A pass abandoned early (divergence) is not recorded. `len()` and
    `set_epoch()` pass through, so search.train.train accepts it.
    """

    def __init__(self, inner: Iterable, clock: EpochClock) -> None:
        self.inner, self.clock = inner, clock

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator:
        self.clock.start()
        n = 0
        for x, y in self.inner:
            n += y.shape[0]  # host-side shape: no device sync
            yield x, y
        self.clock.stop(n)


@contextlib.contextmanager
def synthetic_sizes(n_train: int, n_test: int) -> Iterator[None]:
    """Temporarily make dataset 'synthetic' hold n_train/n_test images (search.trial.data fixes 2048/512).

    search.trial.data reads its module constant SYNTHETIC_SIZES at load time; there is
    no config field for it, so a CIFAR-sized (50k) synthetic set needs this.
    """
    old = search.trial.data.SYNTHETIC_SIZES
    search.trial.data.SYNTHETIC_SIZES = (int(n_train), int(n_test))
    try:
        yield
    finally:
        search.trial.data.SYNTHETIC_SIZES = old


def parse_with_defaults(p: Any, argv: list[str] | None, full: dict[str, Any], quick: dict[str, Any]) -> Any:
    """Parse `argv`, resolve --device, and fill every option left unset from `quick` (--quick or a CPU run)
    or `full` (a GPU run)."""
    args = p.parse_args(argv)
    args.device = search.trial.data.resolve_device(args.device)
    defaults = quick if args.quick or args.device.type == "cpu" else full
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def device_line(device: torch.device) -> str:
    """GPU name (or CPU threads), torch and CUDA versions: the first line of every table."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"device: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    return f"device: cpu ({torch.get_num_threads()} torch threads, {os.cpu_count()} cores), torch {torch.__version__}"


def peak_bf16_flops(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """(peak dense bf16 FLOP/s, where the figure came from); (None, why) on CPU or an unknown GPU."""
    if override:
        return float(override), "--peak-flops"
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    key, flops = peak_for_name(name)
    if flops is None:
        return None, f"{name!r} not in the table; pass --peak-flops"
    return flops, f"table entry {key!r} for {name!r}"


def peak_for_name(name: str) -> tuple[str | None, float | None]:
    """(table key, peak dense bf16 FLOP/s) of a GPU name as torch reports it; (None, None) if unknown."""
    for key, flops in PEAK_BF16_DENSE:
        if key in name:
            return key, flops
    return None, None


def forward_flops_per_image(cfg: Any, num_classes: int | None = None) -> float:
    """Forward FLOPs of one image of cfg's model, counted by FlopCounterMode (convs and matmuls, 2 per MAC).

    Counted on a CPU copy with two images (BatchNorm needs > 1 in train mode; eval here
    anyway), so the count never touches GPU memory. Elementwise ops (BN, ReLU) are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from search.trial.models import build_model

    model = build_model(cfg, num_classes=num_classes).eval()
    x = torch.zeros(2, cfg.in_chans, cfg.image_size, cfg.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2


def parse_model_spec(spec: str) -> tuple[str, int | None, float]:
    """'cifar_wrn:16:4' -> ('cifar_wrn', 16, 4.0); 'resnet18:none:1' or 'resnet18' -> ('resnet18', None, 1.0)."""
    parts = spec.split(":")
    name = parts[0]
    depth = None if len(parts) < 2 or parts[1].lower() in ("", "none") else int(parts[1])
    width = float(parts[2]) if len(parts) > 2 and parts[2] else 1.0
    return name, depth, width


def model_label(backbone: str, depth: int | None, width: float) -> str:
    """A table label without spaces: cifar_wrn-16-4, resnet18, resnet18-x0.25."""
    if depth is not None:
        return f"{backbone}-{depth}-{width:g}"
    return backbone if width == 1.0 else f"{backbone}-x{width:g}"


def fmt(v: float | None, spec: str = ",.0f") -> str:
    """A number for a table cell; 'n/a' for None/NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return format(v, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (pastes into docs/performance.md; tests parse it back)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def parse_markdown_table(text: str, first_header: str) -> list[dict[str, str]]:
    """Rows of the Markdown table in `text` whose first header cell is `first_header`, as dicts."""
    lines = [ln.strip() for ln in text.splitlines()]
    for i, ln in enumerate(lines):
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if ln.startswith("|") and cells[0] == first_header:
            out = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                out.append(dict(zip(cells, (c.strip() for c in row.strip("|").split("|")))))
            return out
    return []
