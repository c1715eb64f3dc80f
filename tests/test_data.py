"""search.trial.data: datasets, splits, caps, augmentation and on-disk formats (CPU, no network)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from _idx import idx_bytes, write_idx

from search.config import TrialConfig
from search.trial.data import (CorruptDatasetError, DatasetNotFoundError, TensorLoader, _Normalise, load_data,
                         resolve_device)

CPU = torch.device("cpu")


def cfg(**kw) -> TrialConfig:
    base = dict(dataset="digits", image_size=16, in_chans=1, batch_size=64, augment=False)
    return TrialConfig(**{**base, **kw})


def all_batches(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("in_chans,size", [(1, 8), (3, 32)])
def test_digits_shapes_ranges_classes(in_chans, size):
    b = load_data(cfg(in_chans=in_chans, image_size=size), CPU)
    assert (b.num_classes, b.in_chans, b.image_size) == (10, in_chans, size)
    assert b.n_train + b.n_test == 1797 and abs(b.n_test - 0.2 * 1797) < 10
    for loader, n in ((b.train, b.n_train), (b.train_eval, b.n_train), (b.test, b.n_test)):
        x, y = all_batches(loader)
        assert x.shape == (n, in_chans, size, size) and x.dtype == torch.float32 and x.device == CPU
        assert y.dtype == torch.long and set(y.tolist()) == set(range(10))
        assert len(loader) == -(-n // 64)
    x, _ = all_batches(b.train_eval)  # normalised by the training split's own statistics
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-2
    if in_chans == 3:
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_channels_last_only_on_cuda():
    x, _ = next(iter(load_data(cfg(in_chans=3, channels_last=True), CPU).train))
    assert x.is_contiguous()  # CPU keeps NCHW whatever cfg.channels_last says
    norm = _Normalise((0.5,) * 3, (0.25,) * 3, CPU, channels_last=True)  # what CUDA batches go through
    y = norm(torch.full((2, 3, 4, 4), 255, dtype=torch.uint8))
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.allclose(y, torch.full_like(y, 2.0))


def test_digits_split_deterministic_disjoint_and_seed_independent():
    a, b = load_data(cfg(seed=0), CPU), load_data(cfg(seed=5), CPU)
    xa, ya = all_batches(a.train_eval)
    xb, yb = all_batches(b.train_eval)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xt, _ = all_batches(a.test)
    train_rows = {tuple(r) for r in xa.flatten(1).tolist()}
    overlap = sum(tuple(r) in train_rows for r in xt.flatten(1).tolist())
    assert overlap <= 5  # digits holds a handful of exact duplicate images; the split itself is disjoint
    # Stratified: every class keeps ~20% of its images in the test split.
    _, yt = all_batches(a.test)
    counts = torch.bincount(yt, minlength=10).float() / torch.bincount(torch.cat([ya, yt]), minlength=10)
    assert torch.all((counts - 0.2).abs() < 0.02)


def test_train_samples_cap_is_shared_subset():
    b = load_data(cfg(train_samples=100), CPU)
    assert b.n_train == 100 and len(b.train) == 2
    x, _ = all_batches(b.train_eval)
    assert x.shape[0] == 100
    assert torch.equal(x, all_batches(load_data(cfg(train_samples=100, seed=9), CPU).train_eval)[0])


def test_train_shuffles_per_epoch_and_train_eval_is_fixed():
    b = load_data(cfg(seed=1), CPU)
    _, y1 = all_batches(b.train)
    _, y2 = all_batches(b.train)
    assert not torch.equal(y1, y2)  # a new order each epoch
    assert torch.equal(torch.sort(y1).values, torch.sort(y2).values)
    e1, e2 = all_batches(b.train_eval), all_batches(b.train_eval)
    assert torch.equal(e1[0], e2[0]) and torch.equal(e1[1], e2[1])


def test_augmentation_changes_pixels_keeps_labels_and_is_seeded():
    plain = load_data(cfg(seed=3, batch_size=2000), CPU)
    aug = load_data(cfg(seed=3, augment=True, batch_size=2000), CPU)
    aug2 = load_data(cfg(seed=3, augment=True, batch_size=2000), CPU)
    other = load_data(cfg(seed=4, augment=True, batch_size=2000), CPU)
    xp, yp = next(iter(plain.train))
    xa, ya = next(iter(aug.train))
    assert xa.shape == xp.shape and torch.equal(ya, yp)  # same order for a seed; only pixels differ
    assert (xa != xp).any(dim=(1, 2, 3)).float().mean() > 0.5
    xa2, _ = next(iter(aug2.train))
    assert torch.equal(xa, xa2)
    assert not torch.equal(xa, next(iter(other.train))[0])
    # train_eval never augments.
    assert torch.equal(all_batches(aug.train_eval)[0], all_batches(plain.train_eval)[0])


def test_crop_is_a_shift_and_flip_a_mirror():
    img = torch.arange(2 * 1 * 8 * 8, dtype=torch.uint8).view(2, 1, 8, 8)
    ident = lambda x: x.float()  # noqa: E731
    loader = TensorLoader(img, torch.tensor([0, 1]), ident, batch_size=2, shuffle=True, pad=1, flip=True, seed=0)
    padded = torch.nn.functional.pad(img.float(), (1, 1, 1, 1))
    for _ in range(10):  # every output is some crop of the padded image, possibly mirrored
        x, y = next(iter(loader))
        for xi, yi in zip(x, y):
            crops = [padded[yi, :, i:i + 8, j:j + 8] for i in range(3) for j in range(3)]
            assert any(torch.equal(xi, c) or torch.equal(xi, c.flip(-1)) for c in crops)


def test_digits_are_never_flipped():
    assert not load_data(cfg(augment=True), CPU).train.flip
    assert load_data(cfg(augment=True), CPU).train.pad == 2  # image_size // 8


@pytest.mark.parametrize("size,chans,classes", [(8, 1, None), (20, 3, 4)])
def test_synthetic_any_shape(size, chans, classes):
    b = load_data(cfg(dataset="synthetic", image_size=size, in_chans=chans, num_classes=classes), CPU)
    k = classes or 10
    assert (b.n_train, b.n_test, b.num_classes) == (2048, 512, k)
    x, y = all_batches(b.test)
    assert x.shape == (512, chans, size, size) and set(y.tolist()) == set(range(k))
    again = all_batches(load_data(cfg(dataset="synthetic", image_size=size, in_chans=chans, num_classes=classes,
                                      seed=7), CPU).test)
    assert torch.equal(x, again[0])


def test_num_classes_below_dataset_is_an_error():
    with pytest.raises(ValueError, match="num_classes"):
        load_data(cfg(num_classes=5), CPU)


def _write_fake_cifar10(root, per_file=4):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        data[:, 0] = i  # first red pixel tags the file
        with open(d / name, "wb") as f:
            pickle.dump({b"batch_label": b"fake", b"data": data, b"labels": list(range(i, i + per_file))}, f)
    return d


def test_cifar10_reads_the_on_disk_format(tmp_path):
    _write_fake_cifar10(tmp_path)
    b = load_data(cfg(dataset="cifar10", data_dir=str(tmp_path), image_size=32, in_chans=3, batch_size=8), CPU)
    assert (b.n_train, b.n_test, b.num_classes) == (20, 4, 10) and b.train.flip
    x, y = all_batches(b.train_eval)
    assert x.shape == (20, 3, 32, 32) and y.tolist() == [i + j for i in range(5) for j in range(4)]
    # Undo normalisation: the tagged pixel of each image equals its file index.
    px = x[:, 0, 0, 0] * b.std[0] * 255 + b.mean[0] * 255
    assert torch.allclose(px, torch.tensor([float(i) for i in range(5) for _ in range(4)]), atol=1e-3)
    # The folder itself is accepted as data_dir, and resizing / grayscale work.
    small = load_data(cfg(dataset="cifar10", data_dir=str(tmp_path / "cifar-10-batches-py"), image_size=16), CPU)
    assert next(iter(small.test))[0].shape == (4, 1, 16, 16)


@pytest.mark.parametrize("data_dir", [None, "missing"])
def test_missing_cifar_is_one_line_naming_files(tmp_path, data_dir):
    d = None if data_dir is None else str(tmp_path / data_dir)
    with pytest.raises(FileNotFoundError) as e:
        load_data(cfg(dataset="cifar100", data_dir=d), CPU)
    msg = str(e.value)
    assert "\n" not in msg and "data_dir" in msg and "cifar-100-python" in msg and "train, test" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in msg
    assert isinstance(e.value, DatasetNotFoundError)


def test_corrupt_cifar_file_is_one_line_naming_it(tmp_path):
    d = _write_fake_cifar10(tmp_path)
    (d / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(CorruptDatasetError) as e:
        load_data(cfg(dataset="cifar10", data_dir=str(tmp_path)), CPU)
    assert "\n" not in str(e.value) and str(d / "data_batch_3") in str(e.value)


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path):
    d = _write_fake_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(CorruptDatasetError, match="refusing global builtins.print"):
        load_data(cfg(dataset="cifar10", data_dir=str(tmp_path)), CPU)


def test_imagefolder_tree(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("val", 2)):
        for cls in ("cat", "dog", "eel"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    b = load_data(cfg(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, in_chans=3, batch_size=4,
                      augment=True), CPU)
    assert (b.n_train, b.n_test, b.num_classes) == (15, 6, 3)
    x, y = all_batches(b.train)
    assert x.shape == (15, 3, 8, 8) and sorted(y.tolist()) == sorted([0, 1, 2] * 5)
    assert len(b.train) == 4 and len(b.test) == 2
    e1, e2 = all_batches(b.train_eval), all_batches(b.train_eval)
    assert torch.equal(e1[0], e2[0]) and e1[1].tolist() == sorted(e1[1].tolist())
    g = load_data(cfg(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, in_chans=1), CPU)
    assert next(iter(g.test))[0].shape == (6, 1, 8, 8)
    with pytest.raises(FileNotFoundError, match="train/"):
        load_data(cfg(dataset="imagefolder", data_dir=str(tmp_path / "nope")), CPU)


# --------------------------------------------------------------------------- resident across trials (issue 18)
def test_resident_dataset_is_reused_by_the_next_trial_on_the_same_data(monkeypatch):
    import search.trial.data as data_mod

    data_mod.clear_resident()
    reads = []
    real = data_mod._digits
    monkeypatch.setattr(data_mod, "_digits", lambda: reads.append(1) or real())
    first = load_data(cfg(augment=True, seed=0), CPU)
    # Another trial of the same worker: other seed, batch size and augmentation; same images.
    second = load_data(cfg(augment=True, seed=3, batch_size=32, lr=0.01), CPU)
    assert len(reads) == 1, "the second trial read the dataset again"
    assert second.train.images is first.train.images and second.test.images is first.test.images
    assert second.train.padded is first.train.padded  # the padded training copy is shared too
    # Served batches are exactly those of an uncached load.
    fresh = load_data(cfg(augment=True, seed=3, batch_size=32), CPU, reuse=False)
    assert len(reads) == 2
    for a, b in zip(second.train, fresh.train):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (second.mean, second.std, second.n_train) == (fresh.mean, fresh.std, fresh.n_train)
    # A different dataset identity (image size) replaces the entry: an LRU of one, never two resident.
    other = load_data(cfg(image_size=8), CPU)
    assert len(reads) == 3 and len(data_mod._RESIDENT) == 1 and other.train.images.shape[-1] == 8
    load_data(cfg(augment=True), CPU)
    assert len(reads) == 4  # the 16 px set was released, so it is read again
    data_mod.clear_resident()
    assert not data_mod._RESIDENT


def test_resident_cifar_is_read_again_when_its_files_change(tmp_path):
    import os

    import search.trial.data as data_mod

    d = _write_fake_cifar10(tmp_path)
    c = cfg(dataset="cifar10", data_dir=str(tmp_path), image_size=32, in_chans=3, batch_size=8)
    a = load_data(c, CPU)
    assert load_data(c, CPU).train.images is a.train.images
    # Re-extracting the archive (new contents, new mtime) must not serve the old images.
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.full((3, 3072), 7, dtype=np.uint8), b"labels": [0, 1, 2]}, f)
    st = (d / "test_batch").stat()
    os.utime(d / "test_batch", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    b = load_data(c, CPU)
    assert b.n_test == 3 and b.test.images is not a.test.images and int(b.test.images.max()) == 7
    # Files gone: the cache does not hide it, the error is the usual one-liner.
    (d / "data_batch_2").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_2"):
        load_data(c, CPU)
    data_mod.clear_resident()


# --------------------------------------------------------------------------- MNIST-format idx files
REAL_FASHION = "/usr/share/datasets/fashion-mnist"


def _icfg(data_dir, dataset="fashion_mnist", **kw) -> TrialConfig:
    return cfg(dataset=dataset, data_dir=None if data_dir is None else str(data_dir), image_size=12, batch_size=8,
               **kw)


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision", "raw"])
def test_idx_files_read_in_every_layout(tmp_path, dataset, gz, layout):
    folder = {"flat": tmp_path, "torchvision": tmp_path / ("FashionMNIST" if dataset == "fashion_mnist" else "MNIST")
              / "raw", "raw": tmp_path / "raw"}[layout]
    arrays = write_idx(folder, gz=gz)
    b = load_data(_icfg(tmp_path, dataset), CPU)
    assert (b.n_train, b.n_test, b.num_classes, b.in_chans) == (20, 10, 10, 1)
    x, y = all_batches(b.train_eval)
    assert x.shape == (20, 1, 12, 12) and y.tolist() == [i % 10 for i in range(20)]
    # Undo the normalisation: every pixel of image i is i, as written; test images carry 100 + i.
    px = x * b.std[0] * 255 + b.mean[0] * 255
    assert torch.allclose(px, torch.arange(20.0).view(-1, 1, 1, 1).expand_as(px), atol=1e-3)
    xt, yt = all_batches(b.test)
    assert torch.allclose(xt * b.std[0] * 255 + b.mean[0] * 255,
                          torch.arange(100.0, 110.0).view(-1, 1, 1, 1).expand_as(xt), atol=1e-3)
    assert yt.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # The training split's own statistics normalise (images 0..19 -> mean 9.5 / 255).
    assert b.mean[0] == pytest.approx(9.5 / 255) and b.std[0] == pytest.approx(np.arange(20).std() / 255)
    assert b.train.flip == (dataset == "fashion_mnist")  # a mirrored garment is still one; a mirrored digit is not


def test_idx_resize_and_three_channels(tmp_path):
    write_idx(tmp_path, gz=True)
    b = load_data(cfg(dataset="mnist", data_dir=str(tmp_path), image_size=8, in_chans=3, batch_size=8), CPU)
    x, _ = next(iter(b.test))
    assert x.shape == (8, 3, 8, 8) and torch.equal(x[:, 0], x[:, 2])


def test_idx_default_dir_is_the_debian_folder(tmp_path, monkeypatch):
    from search.trial import mnist

    write_idx(tmp_path / "debian", gz=True)
    monkeypatch.setitem(mnist.DEBIAN_DIRS, "fashion_mnist", (str(tmp_path / "debian"), "dataset-fashion-mnist"))
    assert load_data(_icfg(None), CPU).n_train == 20
    monkeypatch.setitem(mnist.DEBIAN_DIRS, "fashion_mnist", (str(tmp_path / "absent"), "dataset-fashion-mnist"))
    with pytest.raises(DatasetNotFoundError) as e:
        load_data(_icfg(None), CPU)
    msg = str(e.value)
    assert "\n" not in msg and "field 'data_dir'" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte" in msg and "FashionMNIST/raw/" in msg


@pytest.mark.parametrize("dataset,how", [("fashion_mnist", "apt-get install dataset-fashion-mnist"),
                                         ("mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/")])
def test_missing_idx_file_is_one_line_naming_it_and_how_to_get_it(tmp_path, dataset, how):
    write_idx(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_data(_icfg(tmp_path, dataset), CPU)
    msg = str(e.value)
    assert isinstance(e.value, DatasetNotFoundError) and "\n" not in msg
    assert "missing t10k-labels-idx1-ubyte" in msg and "train-images" not in msg.split("missing")[1].split("(")[0]
    assert str(tmp_path) in msg and how in msg
    if dataset == "mnist":  # no Debian package: data_dir None is an error naming the field
        with pytest.raises(DatasetNotFoundError, match="needs field 'data_dir'"):
            load_data(_icfg(None, dataset), CPU)


def _corrupt(folder, case: str) -> str:
    """Damage one file as `case` says; returns the file's name."""
    import gzip

    img, lab = folder / "train-images-idx3-ubyte", folder / "train-labels-idx1-ubyte"
    if case == "not gzip":
        (folder / "t10k-images-idx3-ubyte").unlink()
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(b"plain bytes, no gzip stream")
        return "t10k-images-idx3-ubyte.gz"
    if case == "truncated gzip":
        (folder / "t10k-images-idx3-ubyte").unlink()
        data = gzip.compress((folder / "t10k-labels-idx1-ubyte").read_bytes() * 50)
        (folder / "t10k-images-idx3-ubyte.gz").write_bytes(data[: len(data) // 2])
        return "t10k-images-idx3-ubyte.gz"
    if case == "magic":  # a labels file where images belong
        img.write_bytes(lab.read_bytes())
        return img.name
    if case == "short":
        img.write_bytes(img.read_bytes()[:-7])
        return img.name
    if case == "header":
        img.write_bytes(img.read_bytes()[:10])
        return img.name
    if case == "count":
        lab.write_bytes(idx_bytes(np.zeros(19, dtype=np.uint8)))
        return lab.name
    if case == "label":
        lab.write_bytes(idx_bytes(np.full(20, 10, dtype=np.uint8)))
        return lab.name
    raise AssertionError(case)


@pytest.mark.parametrize("case,why", [("not gzip", "BadGzipFile"), ("truncated gzip", "EOFError"),
                                      ("magic", "magic number 0x00000801, expected 0x00000803"),
                                      ("short", "file holds 2873"), ("header", "shorter than the 16-byte header"),
                                      ("count", "19 labels for the 20 images"), ("label", "label 10, expected 0..9")])
def test_corrupt_idx_file_is_one_line_naming_it(tmp_path, case, why):
    write_idx(tmp_path, gz=False)
    name = _corrupt(tmp_path, case)
    with pytest.raises(CorruptDatasetError) as e:
        load_data(_icfg(tmp_path), CPU)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / name) + ":") and why in msg
    assert "dataset-fashion-mnist" in msg  # says how to get a good copy


def test_idx_header_is_checked_before_the_file_is_read_whole(tmp_path, monkeypatch):
    """A header promising more data than any idx dataset holds is refused from its 16 bytes, and a gzip stream
    holding more than its header promises is read only up to that length plus one byte (issue 30: files were
    read, and decompressed, whole before their header was checked)."""
    import gzip

    from search.trial import mnist

    huge = tmp_path / "huge-idx3-ubyte"
    huge.write_bytes((0x0803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (100_000, 1000, 1000)))
    with pytest.raises(CorruptDatasetError, match=r"header says 100000 x 1000 x 1000 = 100000000000 bytes of data, "
                                                  r"more than the 2147483648 an idx dataset may hold"):
        mnist.read_idx(huge, 3)
    longer = tmp_path / "longer-idx1-ubyte.gz"
    longer.write_bytes(gzip.compress((0x0801).to_bytes(4, "big") + (4).to_bytes(4, "big") + bytes(10**6)))
    reads = []
    real = gzip.GzipFile.read
    monkeypatch.setattr(gzip.GzipFile, "read", lambda self, n=-1: (reads.append(n), real(self, n))[1])
    with pytest.raises(CorruptDatasetError, match="header says 4 = 4 bytes of data, file holds more than 4"):
        mnist.read_idx(longer, 1)
    assert reads == [8, 5]  # the header, then the promised data and one byte: never the whole stream


def test_cifar_file_larger_than_any_batch_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """A CIFAR batch file is a pickle, read whole to be unpickled: one larger than any CIFAR batch (CIFAR-100's
    train file, 155 MB) is refused from its size, one line, before a byte of it is read (issue 30)."""
    import builtins

    from search.trial import data

    big = tmp_path / "data_batch_1"
    with open(big, "wb") as fh:
        fh.truncate(data.MAX_CIFAR_FILE_BYTES + 1)  # sparse: no disk used
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    with pytest.raises(CorruptDatasetError, match=rf"data_batch_1: not a readable CIFAR batch \({big.stat().st_size} "
                                                  r"bytes, more than the 268435456 any CIFAR batch file holds\)"):
        data._read_cifar_file(big, "labels")
    assert str(big) not in opened


class _Counted:
    """A binary file that counts the bytes read from it (seeks past payloads are not reads)."""

    def __init__(self, fh, counts):
        self.fh, self.counts = fh, counts

    def read(self, n=-1):
        got = self.fh.read(n)
        self.counts.append(len(got))
        return got

    def readline(self, n=-1):
        got = self.fh.readline(n)
        self.counts.append(len(got))
        return got

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _cifar_pickle_cases():
    data = np.random.default_rng(0).integers(0, 256, (64, 3072), dtype=np.uint8)
    good = pickle.dumps({b"batch_label": b"fake", b"data": data, b"labels": list(range(64))})
    cut = good[:len(good) // 2]  # ends inside the images' payload
    return {
        # 64 MiB of zeros (sparse), under the size cap: refused from its first two bytes
        "not-a-pickle": (None, r"byte 0: starts with b'\\x00\\x00', not a pickle header"),
        "images-past-the-end": (cut, r"byte \d+: BINBYTES8? promises 196608 bytes where the file has \d+ left"),
        "not-a-dict": (pickle.dumps([data, list(range(64))]), r"the top level is EMPTY_LIST, not the dict"),
        "bytes-after-stop": (good + b"junk", r"STOP with 4 bytes after it"),
        "no-stop": (good[:-1], r"the file ends before the pickle's STOP"),
    }


@pytest.mark.parametrize("case", ["not-a-pickle", "images-past-the-end", "not-a-dict", "bytes-after-stop", "no-stop"])
def test_cifar_pickle_is_checked_by_header_and_structure_before_it_is_unpickled(tmp_path, monkeypatch, case):
    """Every CIFAR batch file, whatever its size under the cap, is checked by its pickle header and opcode
    structure before it is unpickled (read whole): the payloads (the images) are skipped, not read, the
    unpickler never runs, one line names the file, the byte and what is wrong (issue 30)."""
    import builtins

    from search.trial import data

    content, match = _cifar_pickle_cases()[case]
    path = tmp_path / "data_batch_1"
    if content is None:
        with open(path, "wb") as fh:
            fh.truncate(64 * 2**20)
    else:
        path.write_bytes(content)
    counts: list[int] = []
    monkeypatch.setattr(data, "open", lambda f, *a, **k: _Counted(builtins.open(f, *a, **k), counts), raising=False)

    class NoUnpickling:
        def __init__(self, *a, **k):
            raise AssertionError("unpickled before its structure was checked")

    monkeypatch.setattr(data, "_NumpyOnlyUnpickler", NoUnpickling)
    with pytest.raises(CorruptDatasetError, match=match) as e:
        data._read_cifar_file(path, "labels")
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{path}: not a readable CIFAR batch (byte ")
    assert sum(counts) < 4096 < path.stat().st_size  # the opcodes only: the images were never read


def test_cifar_pickle_structure_check_accepts_every_protocol_a_batch_is_written_in(tmp_path):
    """Protocols 2 (the published files, written by Python 2) to 5 pass the structure check and load."""
    from search.trial import data

    x = np.random.default_rng(1).integers(0, 256, (3, 3072), dtype=np.uint8)
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"batch_{proto}"
        path.write_bytes(pickle.dumps({b"data": x, b"labels": [1, 2, 3]}, protocol=proto))
        data._check_cifar_pickle(path, path.stat().st_size)
        if proto >= 3:  # Python 3 writes bytes at protocol 2 through _codecs.encode, a global the reader refuses
            imgs, labels = data._read_cifar_file(path, "labels")
            assert imgs.shape == (3, 3, 32, 32) and labels.tolist() == [1, 2, 3]
            assert torch.equal(imgs.reshape(3, -1), torch.from_numpy(x))


def test_preflight_checks_idx_files_before_anything_runs(tmp_path, monkeypatch):
    from search.sweep import preflight

    monkeypatch.setattr(preflight, "_check_models", lambda configs: None)  # the files are what is tested here
    check_trials = preflight.check_trials
    write_idx(tmp_path, gz=True)
    good = _icfg(tmp_path).to_dict()
    check_trials([good])  # reads every file once
    _corrupt(tmp_path, "count")
    with pytest.raises(CorruptDatasetError, match="train-labels-idx1-ubyte"):
        check_trials([good])
    with pytest.raises(DatasetNotFoundError, match="missing"):
        check_trials([{**good, "data_dir": str(tmp_path / "nowhere")}])


def test_idx_resident_copy_follows_the_files(tmp_path):
    for sub in ("a", "b"):
        write_idx(tmp_path / sub, gz=False, n_train=20 if sub == "a" else 30)
    assert load_data(_icfg(tmp_path / "a"), CPU).n_train == 20
    assert load_data(_icfg(tmp_path / "b"), CPU).n_train == 30  # another data_dir is another dataset
    write_idx(tmp_path / "a", gz=False, n_train=40)  # files rewritten in place: read again
    assert load_data(_icfg(tmp_path / "a"), CPU).n_train == 40


@pytest.mark.skipif(not __import__("os").path.isdir(REAL_FASHION),
                    reason=f"real Fashion-MNIST not installed ({REAL_FASHION} absent; apt-get install "
                           "dataset-fashion-mnist to run this test)")
def test_real_fashion_mnist_files():
    from search.trial.mnist import load_idx

    xtr, ytr, xte, yte = load_idx("fashion_mnist", None)  # the Debian folder is the default
    assert xtr.shape == (60000, 1, 28, 28) and xte.shape == (10000, 1, 28, 28) and xtr.dtype == torch.uint8
    assert torch.bincount(ytr).tolist() == [6000] * 10 and torch.bincount(yte).tolist() == [1000] * 10
    # Fashion-MNIST's published training-set statistics (pixel mean 0.2860, std 0.3530).
    assert xtr.double().mean().item() / 255 == pytest.approx(0.2860, abs=5e-4)
    assert xtr.double().std().item() / 255 == pytest.approx(0.3530, abs=5e-4)
