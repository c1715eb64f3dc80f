"""The recipe fields (issue 29): multistep milestones and factor, weight decay on norm layers and biases,
crop padding by reflection; their defaults keep every stored hash; the paper profile's published recipes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from search.config import ConfigError, TrialConfig
from search.trial.data import TensorLoader, _pad, clear_resident, load_data
from search.trial.train import _optimizer, lr_at, train

CPU = torch.device("cpu")
PINNED = json.loads((Path(__file__).parent / "data" / "config_hashes.json").read_text())
RECIPE_FIELDS = ("lr_milestones", "lr_factor", "weight_decay_norm_bias", "crop_padding")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads on the shared 2-core machine (as tests/test_train.py).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_data(cfg(), CPU)


def cfg(**kw) -> TrialConfig:
    base = dict(dataset="digits", image_size=8, in_chans=1, batch_size=64, epochs=4, lr=0.1, seed=0)
    return TrialConfig(**{**base, **kw})


def small_cnn() -> nn.Module:
    """Conv(bias)-BN-ReLU-pool, linear: weights, biases and BN affine parameters, for 8x8 digits."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Flatten(), nn.Linear(8 * 2 * 2, 10))


# --------------------------------------------------------------------------- config
def test_defaults_and_their_spelled_out_values_keep_the_old_hashes() -> None:
    base = TrialConfig()
    assert base.config_hash == "ccfedd86282c3105"  # the pinned default (tests/test_config.py)
    assert all(getattr(base, f) is None for f in RECIPE_FIELDS)
    multi = TrialConfig(schedule="multistep")
    # A value meaning the old behaviour is stored as None: the same trial, the same hash.
    same = [TrialConfig(crop_padding="zeros"), TrialConfig(weight_decay_norm_bias=False)]
    assert {c.config_hash for c in same} == {base.config_hash}
    assert TrialConfig(schedule="multistep", lr_factor=0.1).config_hash == multi.config_hash
    assert all(getattr(c, f) is None for c in same for f in RECIPE_FIELDS)
    changed = [TrialConfig(crop_padding="reflect"), TrialConfig(weight_decay_norm_bias=True),
               TrialConfig(schedule="multistep", lr_factor=0.2), TrialConfig(schedule="multistep", lr_milestones="2")]
    assert len({c.config_hash for c in changed} | {base.config_hash, multi.config_hash}) == 6


def test_every_pinned_space_hash_outside_the_paper_profile_is_unchanged() -> None:
    from spaces import get_space

    for key, hashes in PINNED.items():
        if key == "paper_cifar/paper":  # moved to the published recipes on purpose: the next test
            continue
        name, profile = key.split("/")
        grid = [d for d in get_space(name).grid(profile) if d.get("seed", 0) == 0]
        assert {TrialConfig.from_dict(d).config_hash for d in grid} == set(hashes), key
        assert all(getattr(TrialConfig.from_dict(d), f) is None for d in grid for f in RECIPE_FIELDS), key


def test_milestones_are_normalised_and_round_trip() -> None:
    c = cfg(schedule="multistep", epochs=164, lr_milestones=" 81, 122")
    assert c.lr_milestones == "81,122" and c.milestone_epochs() == (81, 122)
    assert c.config_hash == cfg(schedule="multistep", epochs=164, lr_milestones="81,122").config_hash
    assert TrialConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="multistep", lr_milestones="3,2"),
     "field 'lr_milestones' = '3,2' is not allowed (allowed: comma-separated increasing epochs in 1..3, e.g. '81,122')"),
    (dict(schedule="multistep", lr_milestones="2,4"), "field 'lr_milestones' = '2,4' is not allowed (allowed: "
                                                       "comma-separated increasing epochs in 1..3, e.g. '81,122')"),
    (dict(schedule="multistep", lr_milestones="0"), "field 'lr_milestones' = '0' is not allowed"),
    (dict(schedule="multistep", lr_milestones="one"), "field 'lr_milestones' = 'one' is not allowed"),
    (dict(schedule="multistep", lr_milestones="1", epochs=1),
     "field 'lr_milestones' = '1' is not allowed (allowed: None (one epoch leaves no epoch to change the lr after))"),
    (dict(lr_milestones="2"), "field 'lr_milestones' = '2' applies to schedule 'multistep' only (schedule is 'cosine';"
                              " allowed: None)"),
    (dict(lr_factor=0.2), "field 'lr_factor' = 0.2 applies to schedule 'multistep' only"),
    (dict(schedule="multistep", lr_factor=0.0), "field 'lr_factor' = 0.0 is out of range (allowed: (0, 1], or None"
                                                " for 0.1)"),
    (dict(schedule="multistep", lr_factor=1.5), "field 'lr_factor' = 1.5 is out of range"),
    (dict(schedule="multistep", lr_factor=float("nan")), "field 'lr_factor' = nan is not a finite number (allowed:"
                                                         " (0, 1])"),
    (dict(crop_padding="edge"), "field 'crop_padding' = 'edge' is not allowed (allowed: zeros, reflect)"),
    (dict(crop_padding="reflect", augment=False), "field 'crop_padding' = 'reflect' applies with augment=True only"
                                                  " (augment is False; allowed: None)"),
    (dict(weight_decay_norm_bias="yes"), "field 'weight_decay_norm_bias' expects bool | None, got 'yes' (str)"),
])
def test_bad_recipe_values_name_field_value_and_allowed(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg(**kwargs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- schedule
def test_multistep_lr_is_peak_times_factor_to_the_milestones_passed() -> None:
    # Milestones in steps: the lr changes at the first step of epoch m (0-based), as MultiStepLR stepped per epoch.
    spe, milestones = 10, (3, 5, 8)
    for step in range(100):
        k = sum(step >= m * spe for m in milestones)
        assert lr_at(step, 100, 0, 0.1, "multistep", [m * spe for m in milestones], 0.2) == pytest.approx(0.1 * 0.2**k)
    assert lr_at(29, 100, 0, 0.1, "multistep", [30], 0.2) == 0.1 and lr_at(30, 100, 0, 0.1, "multistep", [30], 0.2) \
        == pytest.approx(0.02)
    # Unset: x0.1 at 50% and 75% of the steps, as before the fields existed.
    assert [lr_at(s, 100, 0, 0.1, "multistep") for s in (49, 50, 74, 75)] == pytest.approx([0.1, 0.01, 0.01, 0.001])


def test_trained_lr_per_epoch_matches_the_closed_form(digits) -> None:
    c = cfg(schedule="multistep", epochs=5, lr_milestones="1,3", lr_factor=0.5, warmup_epochs=0.0)
    seen: list[float] = []
    torch.manual_seed(0)
    out = train(small_cnn(), digits, c, CPU, on_epoch=lambda row: seen.append(row["lr"]))
    assert out.status == "ok"
    # Each epoch's row carries its last step's lr: 0.1 * 0.5**(milestones <= the 0-based epoch).
    assert seen == pytest.approx([0.1 * 0.5 ** sum(e >= m for m in (1, 3)) for e in range(5)])
    assert seen == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025])


def test_paper_wrn_schedule_epoch_by_epoch() -> None:
    from spaces import get_space

    wrn = next(TrialConfig.from_dict(d) for d in get_space("paper_cifar").grid("paper") if d["backbone"] == "cifar_wrn")
    spe = 391  # CIFAR's 50,000 images at batch 128
    steps = [m * spe for m in wrn.milestone_epochs()]
    by_epoch = [lr_at(e * spe, wrn.epochs * spe, 0, wrn.lr, wrn.schedule, steps, wrn.lr_factor) for e in range(200)]
    # Zagoruyko & Komodakis: 0.1, then x0.2 from 1-based epochs 60, 120 and 160 on.
    expect = [0.1 * 0.2 ** sum(e + 1 >= m for m in (60, 120, 160)) for e in range(200)]
    assert by_epoch == pytest.approx(expect)
    assert by_epoch[58] == pytest.approx(0.1) and by_epoch[59] == pytest.approx(0.02)


# --------------------------------------------------------------------------- optimizer
def test_weight_decay_on_norm_and_bias_is_opt_in() -> None:
    model = small_cnn()
    names = dict((id(p), n) for n, p in model.named_parameters())
    for flag, decayed in ((None, {"0.weight", "5.weight"}), (True, set(names.values()))):
        groups = _optimizer(model, cfg(weight_decay=0.5, weight_decay_norm_bias=flag)).param_groups
        got = {names[id(p)] for g in groups if g["weight_decay"] == 0.5 for p in g["params"]}
        assert got == decayed, flag
        assert all(g["weight_decay"] in (0.0, 0.5) for g in groups)
        assert sum(len(g["params"]) for g in groups) == len(names)


def test_decay_of_a_bn_scale_follows_sgd_with_l2() -> None:
    # One step on a zero gradient: a decayed parameter moves by -lr * wd * w, an undecayed one not at all.
    for flag in (None, True):
        bn = nn.BatchNorm1d(3)
        with torch.no_grad():
            bn.weight.fill_(2.0)
        opt = _optimizer(bn, cfg(weight_decay=0.5, momentum=0.0, weight_decay_norm_bias=flag))
        for p in bn.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        expect = 2.0 * (1 - 0.1 * 0.5) if flag else 2.0
        assert torch.allclose(bn.weight, torch.full((3,), expect)), flag


def test_nesterov_flag_reaches_the_optimizer() -> None:
    model = small_cnn()
    assert all(g["nesterov"] for g in _optimizer(model, cfg(nesterov=True)).param_groups)
    assert not any(g["nesterov"] for g in _optimizer(model, cfg(nesterov=False)).param_groups)
    assert cfg(nesterov=False).config_hash != cfg().config_hash


# --------------------------------------------------------------------------- crop padding
def test_reflect_pad_mirrors_about_the_edge_pixel() -> None:
    img = torch.arange(2 * 3 * 5 * 6, dtype=torch.uint8).view(2, 3, 5, 6)
    got = _pad(img, 2, "reflect")
    assert got.dtype == torch.uint8 and got.shape == (2, 3, 9, 10)
    ref = np.pad(img.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")  # numpy's: edge not repeated
    assert np.array_equal(got.numpy(), ref)
    assert torch.equal(got, F.pad(img.float(), (2,) * 4, mode="reflect").to(torch.uint8))
    # By hand: padded row 0 is image row 2, padded column 1 image column 1, the last column image column 3.
    assert torch.equal(got[..., 0, 2:-2], img[..., 2, :]) and torch.equal(got[..., 2:-2, 1], img[..., :, 1])
    assert torch.equal(got[..., 2:-2, -1], img[..., :, 3])
    assert torch.equal(_pad(img, 2, "zeros"), F.pad(img, (2,) * 4))


def mirror(i: int, n: int) -> int:
    """Reflect index i into 0..n-1 about the edge pixels (which are not repeated)."""
    i = abs(i)
    return 2 * (n - 1) - i if i >= n else i


def test_reflect_crops_have_reflected_borders() -> None:
    img = torch.arange(4 * 1 * 8 * 8, dtype=torch.uint8).view(4, 1, 8, 8)  # every pixel value distinct
    loader = TensorLoader(img, torch.arange(4), lambda x: x.float(), batch_size=4, shuffle=True, pad=2, flip=False,
                          seed=0, pad_mode="reflect")
    ref = torch.from_numpy(np.pad(img.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")).float()
    offsets = set()
    for epoch in range(20):
        loader.set_epoch(epoch)
        x, y = next(iter(loader))
        for xi, yi in zip(x, y):
            hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(xi, ref[yi, :, dy:dy + 8, dx:dx + 8])]
            assert len(hits) == 1  # one window of the reflected image, borders included
            dy, dx = hits[0]
            offsets.add((dy, dx))
            # Pixel by pixel against the closed form: crop pixel (r, c) is image pixel (mirror(dy-2+r), mirror(dx-2+c)).
            want = [[int(img[yi, 0, mirror(dy - 2 + r, 8), mirror(dx - 2 + c, 8)]) for c in range(8)] for r in range(8)]
            assert xi[0].tolist() == want
    assert any(dy in (0, 4) or dx in (0, 4) for dy, dx in offsets)  # crops reached the outermost border


def test_load_data_pads_by_the_configured_mode_and_keeps_both_copies(digits) -> None:
    clear_resident()
    zeros = load_data(cfg(augment=True), CPU)
    reflect = load_data(cfg(augment=True, crop_padding="reflect"), CPU)
    assert reflect.train.images is zeros.train.images  # one resident dataset, two padded copies
    zp, rp = zeros.train.padded, reflect.train.padded
    assert zeros.train.pad == reflect.train.pad == 1
    assert (zp[..., 0, :] == 0).all() and (zp[..., :, -1] == 0).all()
    assert torch.equal(rp[..., 0, 1:-1], reflect.train.images[..., 1, :])  # row -1 is row 1
    assert torch.equal(rp[..., 1:-1, -1], reflect.train.images[..., :, -2])  # column 8 is column 6
    assert load_data(cfg(augment=True), CPU).train.padded is zp  # the zero-padded copy is still resident
    clear_resident()


# --------------------------------------------------------------------------- the paper profile
def test_paper_profile_uses_the_published_recipes() -> None:
    from spaces import get_space

    grid = get_space("paper_cifar").grid("paper")
    recipe = {d["backbone"]: TrialConfig.from_dict(d) for d in grid}
    wrn, pre = recipe["cifar_wrn"], recipe["cifar_preresnet"]
    assert (wrn.epochs, wrn.lr, wrn.momentum, wrn.nesterov, wrn.weight_decay, wrn.batch_size) == (
        200, 0.1, 0.9, True, 5e-4, 128)
    assert (wrn.schedule, wrn.milestone_epochs(), wrn.lr_factor) == ("multistep", (59, 119, 159), 0.2)
    assert wrn.weight_decay_norm_bias is True and wrn.crop_padding == "reflect"
    assert (pre.epochs, pre.lr, pre.momentum, pre.nesterov, pre.weight_decay, pre.batch_size) == (
        164, 0.1, 0.9, False, 1e-4, 128)
    assert (pre.schedule, pre.milestone_epochs(), pre.lr_factor) == ("multistep", (81, 122), None)  # None: x0.1
    assert pre.weight_decay_norm_bias is True and pre.crop_padding is None  # zeros
    for name, (epochs, batch, wd) in {"cifar_resnext": (300, 128, 5e-4), "cifar_densenet_bc": (300, 64, 1e-4)}.items():
        c = recipe[name]
        assert (c.epochs, c.batch_size, c.weight_decay, c.milestone_epochs(), c.nesterov) == (
            epochs, batch, wd, (150, 225), False), name
    # The quick profile keeps the framework's defaults.
    for d in get_space("paper_cifar").grid("quick"):
        c = TrialConfig.from_dict(d)
        assert c.nesterov and all(getattr(c, f) is None for f in RECIPE_FIELDS)


def test_paper_profile_hashes_moved_only_by_the_recipe_fields() -> None:
    """Deliberate: the paper profile's trials are new experiments (new hashes); put back the old recipe
    (the recipe fields unset, Nesterov on, as every network ran before) and the pinned hashes return."""
    from spaces import get_space

    from _pinned import as_pinned

    grid = [d for d in get_space("paper_cifar").grid("paper") if d.get("seed", 0) == 0]
    new = {TrialConfig.from_dict(d).config_hash for d in grid}
    old = {TrialConfig.from_dict(as_pinned("paper_cifar/paper", d)).config_hash for d in grid}
    assert {k for k, v in as_pinned("paper_cifar/paper", {}).items() if v is not None} == {"nesterov"}
    assert set(as_pinned("paper_cifar/paper", {})) == {*RECIPE_FIELDS, "nesterov"}  # nothing else put back
    assert old == set(PINNED["paper_cifar/paper"])
    assert not new & old and len(new) == len(old) == len(grid)


def test_the_fields_are_cli_flags_and_overrides() -> None:
    import subprocess
    import sys

    from search.config import parse_override

    # argparse %-formats help text: a literal '%' in a field's help broke --help (it did in a draft).
    out = subprocess.run([sys.executable, "-m", "search.trial", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--lr-milestones", "--lr-factor", "--weight-decay-norm-bias", "--crop-padding"):
        assert flag in out.stdout
    assert parse_override("lr_milestones=81,122") == ("lr_milestones", "81,122")
    assert parse_override("weight_decay_norm_bias=true") == ("weight_decay_norm_bias", True)
    assert parse_override("crop_padding=none") == ("crop_padding", None)


def test_recipe_survives_the_mlflow_params_round_trip() -> None:
    # The tracker logs str(v) of each non-None field and rebuild_parquet reads them back with parse_value.
    import dataclasses

    from search.config import parse_value
    from spaces import get_space

    types = {f.name: str(f.type) for f in dataclasses.fields(TrialConfig)}
    for d in get_space("paper_cifar").grid("paper"):
        c = TrialConfig.from_dict(d)
        params = {k: str(v) for k, v in c.to_dict().items() if v is not None}
        back = TrialConfig.from_dict({k: parse_value(k, types[k], v) for k, v in params.items()})
        assert back == c and back.config_hash == c.config_hash, d["backbone"]
