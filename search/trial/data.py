"""Datasets by name, served as device-resident batches (airbench style).

Datasets are registered by name (search/trial/datasets.py, `register_dataset`): each gives its
reader and facts (classes, flips, files), and this module serves what the reader returns.
In-memory datasets (digits, synthetic, cifar10, cifar100, fashion_mnist, mnist) live on the device
as one uint8 tensor [N, C, H, W]; a batch is a slice of a randperm, and the
random crop + flip is one batched gather on that device, so no
DataLoader sits in the hot path. Only `imagefolder` uses a DataLoader (PIL
decoding needs workers); its batches get the same on-device augmentation.

All randomness (epoch order, crop offsets, flips) comes from CPU generators
seeded by (cfg.seed, epoch), so a seed gives the same batches on CPU and CUDA,
whatever else drew random numbers before. Train/test splits and
`train_samples` subsets use a fixed seed: every trial sees the same images.

Resident across trials: with Ray Tune's `reuse_actors` one worker process runs
trial after trial, usually on the same data. The last in-memory dataset loaded
stays on its device (an LRU of one, keyed by `_identity`: dataset, size,
channels, subset, device, and for CIFAR the files' sizes and mtimes), so the
next trial on it skips reading, resizing and copying it. The cached tensors
are never written to. A different dataset releases the old one first, so a
worker never holds two. `clear_resident()` empties it.
"""
from __future__ import annotations

import pickle
import pickletools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from search import registry
from search.config import TrialConfig
from search.trial.errors import CorruptDatasetError, DatasetNotFoundError

__all__ = ["DataBundle", "DatasetNotFoundError", "CorruptDatasetError", "TensorLoader", "FolderLoader",
           "load_data", "resolve_device", "clear_resident"]

Batch = tuple[torch.Tensor, torch.Tensor]
SPLIT_SEED = 0  # fixed: every trial shares the digits split and the train_samples subset
SYNTHETIC_SIZES = (2048, 512)  # train, test images
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR = {  # name -> (folder, train files, test files, label key, archive to fetch by hand)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cpu'/'cuda' (or 'cuda:1') as given.

    Raises:
        ValueError: 'cuda' requested but no CUDA device is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"field 'device' = {name!r} but CUDA is not available here (allowed: auto, cpu)")
    return dev


@dataclass
class DataBundle:
    """Loaders and facts about one dataset. Each loader yields (x, y) on the device; len() = batches."""

    train: TensorLoader | FolderLoader  # augmented, reshuffled every epoch
    train_eval: TensorLoader | FolderLoader  # same training images, no augmentation, fixed order
    test: TensorLoader | FolderLoader
    num_classes: int
    in_chans: int
    image_size: int
    n_train: int
    n_test: int
    mean: tuple[float, ...] = ()  # per-channel normalisation, in [0, 1] pixel units
    std: tuple[float, ...] = ()


# --------------------------------------------------------------------------- batching
def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A fresh generator per (seed, epoch): the order depends on nothing else (not on earlier draws).
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _sample_aug(n: int, pad: int, flip: bool, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Crop offsets in [0, 2*pad] and flip flags for n images."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    fl = torch.rand(n, generator=gen) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return dy, dx, fl


def _pad(x: torch.Tensor, pad: int, mode: str = "zeros") -> torch.Tensor:
    """`x` [..., H, W] with a `pad`-pixel border: zeros, or 'reflect' (mirrored about the edge pixel,
    which is not repeated: torch's and torchvision's 'reflect', Torch7's SpatialReflectionPadding)."""
    if mode == "zeros":
        return F.pad(x, (pad,) * 4)
    # By index rather than F.pad(mode='reflect'), which has no uint8 kernel; needs pad < H and W.
    rows, cols = (_reflect_index(n, pad, x.device) for n in x.shape[-2:])
    return x.index_select(-2, rows).index_select(-1, cols)


def _reflect_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(-pad, n + pad, device=device).abs()  # -k -> k
    return torch.where(i >= n, 2 * (n - 1) - i, i)  # n - 1 + k -> n - 1 - k


def _crop_flip(padded: torch.Tensor, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
               flip: torch.Tensor, size: int) -> torch.Tensor:
    """Images idx of a padded stack, each cropped at (dy, dx) and maybe mirrored.

    One index_select and one gather over flattened pixels: no per-image loop, and the
    index is [B, S*S] (not [B, C, S, S]), which keeps large images cheap.
    """
    p = padded.shape[-1]
    ar = torch.arange(size, device=padded.device)
    rows = dy[:, None] + ar  # [B, S]
    cols = dx[:, None] + torch.where(flip[:, None], size - 1 - ar, ar)  # mirrored: read right-to-left
    pix = (rows[:, :, None] * p + cols[:, None, :]).flatten(1)  # [B, S*S] positions in the padded image
    x = padded[idx].flatten(2)  # [B, C, P*P]
    return x.gather(2, pix[:, None, :].expand(-1, x.shape[1], -1)).view(-1, x.shape[1], size, size)


class _Normalise:
    """uint8 [B, C, H, W] -> float32 normalised (channels_last on request)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device, channels_last: bool):
        self.shift = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.scale = 1.0 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.shift) * self.scale).contiguous(memory_format=self.fmt)


class TensorLoader:
    """Batches of a device-resident uint8 image tensor, augmented on the device.

    Iterating draws the order and augmentation of epoch `self.epoch` and then
    advances it; `set_epoch(e)` pins it (as DistributedSampler does), which
    the trainer uses so a seed fixes the batches of every epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normalise: _Normalise, *, batch_size: int,
                 shuffle: bool = False, pad: int = 0, flip: bool = False, seed: int = 0,
                 padded: torch.Tensor | None = None, pad_mode: str = "zeros"):
        self.images, self.labels, self.normalise = images, labels, normalise
        self.batch_size, self.shuffle, self.pad, self.flip, self.seed = batch_size, shuffle, pad, flip, seed
        self.epoch = 0
        # Pad once up front, so each augmented batch is a single gather from this stack (`padded`: done already).
        self.padded = (padded if padded is not None else _pad(images, pad, pad_mode)) if pad else None
        n = len(labels)
        # A trailing training batch of one image would break BatchNorm; drop it (only when shuffling).
        self.n_batches = -(-n // batch_size) - int(shuffle and n > 1 and n % batch_size == 1)

    def __len__(self) -> int:
        return self.n_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        gen = _epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        n, dev, bs = len(self.labels), self.labels.device, self.batch_size
        order = torch.randperm(n, generator=gen).to(dev) if self.shuffle else None
        aug = [a.to(dev) for a in _sample_aug(n, self.pad, self.flip, gen)] if self.padded is not None else None
        for i in range(self.n_batches):
            sl = slice(i * bs, min(n, (i + 1) * bs))
            if order is None and aug is None:  # fixed order, no augmentation: plain slices, no gather
                yield self.normalise(self.images[sl]), self.labels[sl]
                continue
            idx = order[sl] if order is not None else torch.arange(sl.start, sl.stop, device=dev)
            if aug is not None:
                x = _crop_flip(self.padded, idx, aug[0][sl], aug[1][sl], aug[2][sl], self.images.shape[-1])
            else:
                x = self.images[idx]
            yield self.normalise(x), self.labels[idx]


class _EpochPermutation(torch.utils.data.Sampler[int]):
    """Sampler whose order is a function of (seed, epoch) only."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        gen = _epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=gen).tolist())


class FolderLoader:
    """A DataLoader of uint8 images (imagefolder), moved to the device and augmented there like TensorLoader."""

    def __init__(self, dataset: torch.utils.data.Dataset, normalise: _Normalise, device: torch.device, *,
                 batch_size: int, shuffle: bool = False, pad: int = 0, flip: bool = False, seed: int = 0,
                 num_workers: int = 0, pad_mode: str = "zeros"):
        self.pad_mode = pad_mode
        self.sampler = _EpochPermutation(len(dataset), seed) if shuffle else None
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
            pin_memory=device.type == "cuda", drop_last=shuffle and len(dataset) % batch_size == 1,
            persistent_workers=num_workers > 0)
        self.normalise, self.device, self.pad, self.flip, self.seed = normalise, device, pad, flip, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Batch]:
        gen = _epoch_generator(self.seed + 1, self.epoch)  # +1: augmentation stream apart from the sampler's
        if self.sampler is not None:
            self.sampler.epoch = self.epoch
        self.epoch += 1
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.pad:
                dy, dx, fl = (a.to(self.device) for a in _sample_aug(len(y), self.pad, self.flip, gen))
                x = _crop_flip(_pad(x, self.pad, self.pad_mode), torch.arange(len(y), device=self.device), dy, dx, fl,
                               x.shape[-1])
            yield self.normalise(x), y


# --------------------------------------------------------------------------- datasets
def _resize_u8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a uint8 stack, in chunks to bound float memory."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = [F.interpolate(c.float(), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < c.shape[-1]).round_().clamp_(0, 255).to(torch.uint8)
           for c in x.split(4096)]
    return torch.cat(out)


def _set_chans(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """1 -> 3 channels by repetition, 3 -> 1 by ITU-R 601 luma."""
    if x.shape[1] == in_chans:
        return x
    if in_chans == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return torch.cat([(c.float() * luma).sum(1, keepdim=True).round_().to(torch.uint8) for c in x.split(4096)])


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of a uint8 stack, in [0, 1] units (float64 sums, chunked)."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for c in x.split(4096):
        c = c.double().transpose(0, 1).reshape(x.shape[1], -1) / 255.0
        s += c.sum(1)
        s2 += (c * c).sum(1)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / m
    std = (s2 / m - mean**2).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def _digits() -> tuple[torch.Tensor, ...]:
    """scikit-learn's bundled 8x8 digits as uint8, with a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0))).to(torch.uint8)[:, None]  # 0..16 -> 0..255
    y = np.asarray(d.target)
    rng = np.random.RandomState(SPLIT_SEED)  # legacy RandomState: its stream is frozen across numpy versions
    test = np.zeros(len(y), dtype=bool)
    for k in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == k))
        test[members[: round(0.2 * len(members))]] = True
    yt = torch.from_numpy(y).long()
    tr, te = torch.from_numpy(~test), torch.from_numpy(test)
    return x[tr], yt[tr], x[te], yt[te]


def _synthetic(num_classes: int, chans: int, size: int) -> tuple[torch.Tensor, ...]:
    """Class-conditional images: a smooth random pattern per class plus pixel noise; fixed seed."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    patterns = F.interpolate(torch.randn(num_classes, chans, 4, 4, generator=gen), size=(size, size),
                             mode="bilinear", align_corners=False)
    patterns = patterns / patterns.flatten(1).std(1).view(-1, 1, 1, 1)
    out = []
    for n in SYNTHETIC_SIZES:
        y = torch.randperm(n, generator=gen) % num_classes
        img = patterns[y] + 1.5 * torch.randn(n, chans, size, size, generator=gen)
        out += [(128 + 32 * img).round().clamp(0, 255).to(torch.uint8), y]
    return tuple(out)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    # The CIFAR python files are pickles. Unpickling can run arbitrary code, so only the
    # globals needed to rebuild numpy arrays are allowed; anything else is refused.
    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        module = module.replace("numpy.core", "numpy._core") if hasattr(np, "_core") else module
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


# The largest CIFAR batch file: CIFAR-100's train file is 155 MB; a larger one is refused before it is unpickled
# (read whole) rather than after (issue 30: files were read whole before anything about them was checked).
MAX_CIFAR_FILE_BYTES = 256 * 2**20


# pickletools' argument lengths: a fixed byte count (>= 0), a line (-1), or a payload whose length comes first
# in 1, 4 (signed), 4 or 8 bytes (-2 .. -5)
_PICKLE_OPS = {op.code.encode("latin1")[0]: op for op in pickletools.opcodes}
_LENGTH_PREFIX = {-2: (1, False), -3: (4, True), -4: (4, False), -5: (8, False)}
_MAX_PICKLE_LINE = 1024  # a text argument (an int, a global's module and name) of a CIFAR batch is short
_EMPTY_DICT, _PROTO, _FRAME, _STOP = ord("}"), 0x80, 0x95, ord(".")


def _check_cifar_pickle(path: Path, size: int) -> None:
    """Check a CIFAR batch's pickle by its header and opcode structure before it is unpickled (read whole).

    The header must be a pickle of protocol 2 to 5 whose top level is a dict (`\\x80 N }`, a protocol-4+
    FRAME allowed between); every opcode must be one pickle knows, every payload (the images are one) must fit
    in the file, and STOP must be its last byte. Payloads are skipped, not read, so a file is refused after
    reading its opcodes only, whatever its size (issue 30: files were read whole before anything was checked).
    Which globals are allowed stays `_NumpyOnlyUnpickler`'s check.

    Raises:
        CorruptDatasetError: one line naming the file, the byte offset and what is wrong.
    """
    def bad(pos: int, what: str) -> CorruptDatasetError:
        return CorruptDatasetError(f"{path}: not a readable CIFAR batch (byte {pos}: {what}); delete it and untar "
                                   "the archive again")

    with open(path, "rb") as f:
        head = f.read(2)
        if len(head) < 2 or head[0] != _PROTO or not 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
            raise bad(0, f"starts with {head!r}, not a pickle header (\\x80 and protocol 2 to "
                         f"{pickle.HIGHEST_PROTOCOL})")
        first = True
        while True:
            pos = f.tell()
            code = f.read(1)
            if not code:
                raise bad(pos, "the file ends before the pickle's STOP")
            op = _PICKLE_OPS.get(code[0])
            if op is None:
                raise bad(pos, f"{code!r} is no pickle opcode")
            if first and code[0] != _FRAME:
                if code[0] != _EMPTY_DICT:
                    raise bad(pos, f"the top level is {op.name}, not the dict a CIFAR batch is")
                first = False
            if code[0] == _STOP:
                if pos + 1 != size:
                    raise bad(pos, f"STOP with {size - pos - 1} bytes after it")
                return
            n = op.arg.n if op.arg is not None else 0
            if n >= 0:
                got = f.read(n)
                if len(got) != n:
                    raise bad(pos, f"{op.name} is cut short by the end of the file")
            elif n == -1:  # a text argument ends at a newline (a global's module and name: two lines)
                for _ in range(2 if op.arg.name.endswith("_pair") else 1):
                    line = f.readline(_MAX_PICKLE_LINE)
                    if not line.endswith(b"\n"):
                        raise bad(pos, f"{op.name}'s argument is not a line of at most {_MAX_PICKLE_LINE} bytes")
            else:
                width, signed = _LENGTH_PREFIX[n]
                raw = f.read(width)
                length = int.from_bytes(raw, "little", signed=signed) if len(raw) == width else -1
                if length < 0 or f.tell() + length > size:
                    raise bad(pos, f"{op.name} promises {length} bytes where the file has {size - f.tell()} left")
                f.seek(length, 1)  # the payload (the images) is skipped, not read


def _read_cifar_file(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    size = path.stat().st_size
    if size > MAX_CIFAR_FILE_BYTES:
        raise CorruptDatasetError(f"{path}: not a readable CIFAR batch ({size} bytes, more than the "
                                  f"{MAX_CIFAR_FILE_BYTES} any CIFAR batch file holds); delete it and untar the "
                                  "archive again")
    _check_cifar_pickle(path, size)  # header and structure first, for every size
    try:
        with open(path, "rb") as f:
            raw = _NumpyOnlyUnpickler(f, encoding="latin1").load()  # latin1: the files come from Python 2
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[label_key], dtype=np.int64)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} images but {len(y)} labels")
    except Exception as e:  # any failure here means the file is not a CIFAR batch
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CorruptDatasetError(f"{path}: not a readable CIFAR batch ({type(e).__name__}: {msg}); "
                                  "delete it and untar the archive again") from None
    return torch.from_numpy(x.copy()), torch.from_numpy(y)


def check_cifar(name: str, data_dir: str | None) -> None:
    """Raise as loading would (DatasetNotFoundError, CorruptDatasetError), reading every file once."""
    root, files, label_key = _cifar_files(name, data_dir)
    for f in files[0] + files[1]:
        _read_cifar_file(root / f, label_key)


def cifar_identity(name: str, data_dir: str | None) -> tuple:
    """What fixes CIFAR's loaded tensors: the folder and the files' sizes and mtimes (raises as loading would)."""
    root, (train_files, test_files), _ = _cifar_files(name, data_dir)
    stats = [(root / f).stat() for f in train_files + test_files]
    return (str(root.resolve()), tuple((s.st_size, s.st_mtime_ns) for s in stats))


def _cifar(name: str, data_dir: str | None) -> tuple[torch.Tensor, ...]:
    root, (train_files, test_files), label_key = _cifar_files(name, data_dir)
    parts = [[_read_cifar_file(root / f, label_key) for f in files] for files in (train_files, test_files)]
    return tuple(torch.cat([p[i] for p in ps]) for ps in parts for i in (0, 1))


def _cifar_files(name: str, data_dir: str | None) -> tuple[Path, tuple[list[str], list[str]], str]:
    folder, train_files, test_files, label_key, url = CIFAR[name]
    expected = f"{', '.join(train_files + test_files)} in <data_dir>/{folder}/"
    how = f"download {url} and untar it into data_dir (nothing is downloaded at run time)"
    if data_dir is None:
        raise DatasetNotFoundError(f"dataset {name!r} needs field 'data_dir' (got None): expected {expected}; {how}")
    root = Path(data_dir).expanduser()
    root = root if (root / test_files[0]).is_file() else root / folder  # accept the folder itself too
    missing = [f for f in train_files + test_files if not (root / f).is_file()]
    if missing:
        raise DatasetNotFoundError(f"dataset {name!r}: missing {', '.join(missing)} in {root} (field 'data_dir' = "
                                   f"{data_dir!r}); expected {expected}; {how}")
    return root, (train_files, test_files), label_key


def _imagefolder(cfg: TrialConfig, device: torch.device) -> tuple:
    from torchvision import datasets, transforms

    root = Path(cfg.data_dir or ".").expanduser()
    test_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if cfg.data_dir is None or not (root / "train").is_dir() or test_dir is None:
        raise DatasetNotFoundError(f"dataset 'imagefolder': field 'data_dir' = {cfg.data_dir!r} must hold train/ and "
                                   "val/ (or test/), each with one subfolder of images per class")
    tf = [transforms.Grayscale(1)] if cfg.in_chans == 1 else []
    tf = transforms.Compose(tf + [transforms.Resize((cfg.image_size, cfg.image_size)), transforms.PILToTensor()])
    train, test = datasets.ImageFolder(str(root / "train"), tf), datasets.ImageFolder(str(test_dir), tf)
    if train.classes != test.classes:
        raise ValueError(f"dataset 'imagefolder': class folders differ between {root / 'train'} and {test_dir}")
    if cfg.train_samples is not None and cfg.train_samples < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED))[: cfg.train_samples]
        train = torch.utils.data.Subset(train, keep.tolist())
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if cfg.in_chans == 3 else ((0.449,), (0.226,))
    norm = _Normalise(mean, std, device, cfg.channels_last and device.type == "cuda")
    kw = dict(batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed)
    pad = cfg.image_size // 8 if cfg.augment else 0
    loaders = (FolderLoader(train, norm, device, shuffle=True, pad=pad, flip=True, pad_mode=cfg.crop_padding or "zeros",
                            **kw),
               FolderLoader(train, norm, device, **kw), FolderLoader(test, norm, device, **kw))
    return loaders, len(test.classes), len(train), len(test), mean, std


# --------------------------------------------------------------------------- resident cache
@dataclass
class _Resident:
    """One in-memory dataset as it sits on the device, plus its padded training copies by (pad width, mode)."""

    xtr: torch.Tensor
    ytr: torch.Tensor
    xte: torch.Tensor
    yte: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    own: int  # the dataset's own number of classes
    padded: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)


_RESIDENT: dict[tuple, _Resident] = {}  # at most one entry: the last dataset loaded in this process


def clear_resident() -> None:
    """Forget the resident dataset (its device memory is freed once no loader holds it)."""
    _RESIDENT.clear()


def _identity(cfg: TrialConfig, device: torch.device) -> tuple:
    """What fixes an in-memory dataset's tensors. For CIFAR also the files' sizes and mtimes, so a
    re-extracted archive is read again; the check raises as loading would when files are missing."""
    key: tuple = (cfg.dataset, cfg.image_size, cfg.in_chans, cfg.train_samples, str(device))
    identity = registry.get("dataset", cfg.dataset).meta["identity"]
    return key + tuple(identity(cfg)) if identity is not None else key


def _in_memory(cfg: TrialConfig, device: torch.device, reuse: bool) -> _Resident:
    """The tensors of an in-memory dataset on `device`, from the resident cache when `reuse` and it matches."""
    key = _identity(cfg, device) if reuse else None
    if key is not None and key in _RESIDENT:
        return _RESIDENT[key]
    if reuse:
        _RESIDENT.clear()  # release the previous dataset before the next one lands on the device
    entry = registry.get("dataset", cfg.dataset, field_name="dataset")
    own = (cfg.num_classes or entry.meta["classes"]) if entry.meta["any_classes"] else entry.meta["classes"]
    xtr, ytr, xte, yte = _checked(cfg.dataset, entry.obj(cfg), own)
    if own is None:  # a dataset that knows its classes only from its labels
        own = int(max(int(ytr.max()), int(yte.max()))) + 1
    xtr, xte = (_set_chans(_resize_u8(x, cfg.image_size), cfg.in_chans) for x in (xtr, xte))
    # Statistics of the whole training split, so a train_samples cap leaves the input scaling unchanged.
    mean, std = _channel_stats(xtr)
    if cfg.train_samples is not None and cfg.train_samples < len(ytr):
        keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(SPLIT_SEED))[: cfg.train_samples]
        xtr, ytr = xtr[keep], ytr[keep]
    xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))
    entry = _Resident(xtr, ytr, xte, yte, tuple(mean), tuple(std), own)
    if key is not None:
        _RESIDENT[key] = entry
    return entry


def _checked(name: str, parts: object, classes: int | None) -> tuple[torch.Tensor, ...]:
    """A reader's (x_train, y_train, x_test, y_test), labels as int64; else one line naming what is wrong."""
    where = f"dataset {name!r}: its reader returned"
    if not (isinstance(parts, (tuple, list)) and len(parts) == 4 and all(isinstance(t, torch.Tensor) for t in parts)):
        raise ValueError(f"{where} {type(parts).__name__}; allowed: a tuple (x_train, y_train, x_test, y_test) of "
                         "tensors")
    out = []
    for split, x, y in (("train", parts[0], parts[1]), ("test", parts[2], parts[3])):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
            raise ValueError(f"{where} x_{split} of {x.dtype} {tuple(x.shape)}; allowed: uint8 [N, C, H, W], N >= 1, "
                             "C 1 or 3")
        if y.dim() != 1 or len(y) != len(x) or y.is_floating_point() or y.is_complex():
            raise ValueError(f"{where} y_{split} of {y.dtype} {tuple(y.shape)}; allowed: integer labels [N] with N = "
                             f"{len(x)} (one per image)")
        y = y.long()
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (classes is not None and hi >= classes):
            raise ValueError(f"{where} y_{split} labels {lo}..{hi}; allowed: 0..{classes - 1 if classes else 'n'} "
                             f"(classes={classes})")
        out += [x, y]
    return tuple(out)


def load_data(cfg: TrialConfig, device: torch.device | str, *, reuse: bool = True) -> DataBundle:
    """Load cfg.dataset and serve it on `device` (see the module docstring).

    Args:
        cfg: the trial; only its data fields, batch size, seed and channels_last matter here.
        device: where the batches live.
        reuse: serve an in-memory dataset from (and keep it in) the process's resident cache.

    Raises:
        DatasetNotFoundError: on-disk files missing (one line: which files, where, how to get them).
        CorruptDatasetError: a dataset file cannot be read (one line naming it).
        ValueError: cfg.num_classes smaller than the dataset's number of classes.
    """
    device = torch.device(device)
    entry = registry.get("dataset", cfg.dataset, field_name="dataset")
    if entry.meta["streams"]:  # it serves its own batches (imagefolder)
        loaders, own, n_train, n_test, mean, std = entry.obj(cfg, device)
    else:
        r = _in_memory(cfg, device, reuse)
        own, mean, std, n_train, n_test = r.own, r.mean, r.std, len(r.ytr), len(r.yte)
        norm = _Normalise(mean, std, device, cfg.channels_last and device.type == "cuda")
        pad = cfg.image_size // 8 if cfg.augment else 0
        mode = cfg.crop_padding or "zeros"
        if pad and (pad, mode) not in r.padded:
            r.padded[pad, mode] = _pad(r.xtr, pad, mode)
        loaders = (TensorLoader(r.xtr, r.ytr, norm, batch_size=cfg.batch_size, shuffle=True, pad=pad,
                                flip=entry.meta["flip"], seed=cfg.seed, padded=r.padded.get((pad, mode))),
                   TensorLoader(r.xtr, r.ytr, norm, batch_size=cfg.batch_size),
                   TensorLoader(r.xte, r.yte, norm, batch_size=cfg.batch_size))
    num_classes = cfg.num_classes or own
    if num_classes < own:
        raise ValueError(f"field 'num_classes' = {cfg.num_classes!r} is below dataset {cfg.dataset!r}'s {own} "
                         f"classes (allowed: None or >= {own})")
    return DataBundle(*loaders, num_classes=num_classes, in_chans=cfg.in_chans, image_size=cfg.image_size,
                      n_train=n_train, n_test=n_test, mean=tuple(mean), std=tuple(std))
