"""The search spaces: registry, grids, conditions, random and Optuna sampling. Fast; no torch needed."""
from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from analysis.theory import closed_form_kinds
from search.config import TrialConfig
from spaces import (
    DEFAULT_PROFILES,
    REQUIRED_FIELDS,
    Choice,
    Condition,
    Profile,
    Range,
    Space,
    SpaceError,
    get_space,
    list_spaces,
    register_space,
)
from spaces._defaults import PLACEMENTS

SHIPPED = ("backbones", "paper_cifar", "smoke", "uout_beta", "wrn_widths")
CASES = [(name, prof) for name in list_spaces() for prof in get_space(name).profiles]
GOVERNED = ("dropout_type", "dropout_rate", "dropout_placement")


def _check_condition(cfg: dict) -> None:
    if cfg["dropout_placement"] == "none":
        assert cfg["dropout_rate"] == 0.0 and cfg["dropout_type"] == "bernoulli", cfg
    else:
        assert cfg["dropout_rate"] > 0.0, cfg


# ------------------------------------------------------------------ registry
def test_registry_lists_the_shipped_spaces() -> None:
    assert set(SHIPPED) <= set(list_spaces())
    assert list_spaces() == sorted(list_spaces())
    assert list_spaces("wrn_*") == ["wrn_widths"]
    for name in SHIPPED:
        assert get_space(name).name == name
        assert set(DEFAULT_PROFILES) <= set(get_space(name).profiles)


def test_unknown_space_names_field_value_allowed_and_a_suggestion() -> None:
    with pytest.raises(ValueError) as e:
        get_space("wrn_width")
    msg = str(e.value)
    assert "'space'" in msg and "'wrn_width'" in msg and "did you mean 'wrn_widths'" in msg
    assert all(name in msg for name in SHIPPED)


def test_unknown_profile_names_field_value_and_allowed() -> None:
    space = get_space("wrn_widths")
    for call in (space.grid, space.size, space.axis_sizes, space.describe,
                 lambda p: space.sample(random.Random(0), p)):
        with pytest.raises(ValueError) as e:
            call("quik")
        msg = str(e.value)
        assert "'profile'" in msg and "'quik'" in msg and "quick" in msg and "paper" in msg
        assert "did you mean 'quick'" in msg


def test_import_pulls_in_no_heavy_modules() -> None:
    code = ("import sys, spaces; spaces.get_space('wrn_widths').grid('paper'); "
            "bad = [m for m in ('torch', 'ray', 'mlflow', 'optuna', 'timm') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------- grids
@pytest.mark.parametrize("name,profile", CASES)
def test_grid_configs_are_valid_unique_and_counted(name: str, profile: str) -> None:
    space = get_space(name)
    grid = space.grid(profile)
    assert grid and space.size(profile) == len(grid)
    assert grid == space.grid(profile)  # deterministic
    hashes = []
    for cfg in grid:
        assert set(REQUIRED_FIELDS) <= set(cfg), sorted(set(REQUIRED_FIELDS) - set(cfg))
        _check_condition(cfg)
        hashes.append(TrialConfig.from_dict(cfg).config_hash)
    assert len(set(hashes)) == len(hashes), [h for h, n in Counter(hashes).items() if n > 1]
    sizes = space.axis_sizes(profile)
    bound = 1
    for n in sizes.values():
        bound *= n
    assert len(grid) <= bound
    line = space.describe(profile)
    assert "\n" not in line and f"{len(grid)} trials" in line


@pytest.mark.parametrize("name,profile", CASES)
def test_placement_none_once_per_combination_of_relevant_axes(name: str, profile: str) -> None:
    space = get_space(name)
    grid = space.grid(profile)
    governed = set(GOVERNED).union(*(c.fields for c in space.conditions))  # e.g. literature's schedule fields
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cfg in grid:
        groups[tuple(sorted((k, repr(v)) for k, v in cfg.items() if k not in governed))].append(cfg)
    for group in groups.values():
        placements = Counter(c["dropout_placement"] for c in group)
        if "none" in {c["dropout_placement"] for c in grid}:
            assert placements["none"] == 1, placements
        else:
            assert placements["none"] == 0


def test_wrn_widths_quick_covers_placements_and_widths() -> None:
    grid = get_space("wrn_widths").grid("quick")
    assert len(grid) >= 12
    assert {c["dropout_placement"] for c in grid} == set(PLACEMENTS)
    assert len({c["width"] for c in grid}) >= 3
    assert {c["dataset"] for c in grid} == {"digits"}
    paper = get_space("wrn_widths").grid("paper")
    assert {(c["depth"], c["dataset"], c["epochs"]) for c in paper} == {(28, "cifar10", 200)}


def test_smoke_covers_every_placement_and_kind_and_is_tiny() -> None:
    for profile in get_space("smoke").profiles:
        grid = get_space("smoke").grid(profile)
        assert len(grid) <= 10
        assert {c["dropout_placement"] for c in grid} == set(PLACEMENTS)
        # Every kind with the paper's closed form; the structured kinds stay out, so smoke's hashes stay pinned.
        assert {c["dropout_type"] for c in grid if c["dropout_placement"] != "none"} == set(closed_form_kinds())
        assert all(c["epochs"] == 1 and c["dataset"] == "digits" for c in grid)


def test_backbone_links_give_each_family_its_depth() -> None:
    for profile in ("quick", "paper"):
        for cfg in get_space("backbones").grid(profile):
            assert (cfg["depth"] is None) == (not cfg["backbone"].startswith("cifar_")), cfg
    depths = {c["backbone"]: c["depth"] for c in get_space("paper_cifar").grid("paper")}
    assert depths == {"cifar_preresnet": 110, "cifar_resnext": 29, "cifar_wrn": 28, "cifar_densenet_bc": 100}
    # A profile's links merge over the space's: quick keeps the small depths, paper adds the recipes.
    epochs = {c["backbone"]: c["epochs"] for c in get_space("paper_cifar").grid("paper")}
    assert epochs["cifar_wrn"] == 200 and epochs["cifar_densenet_bc"] == 300
    quick_epochs = get_space("wrn_widths").grid("quick")[0]["epochs"]
    assert {c["epochs"] for c in get_space("paper_cifar").grid("quick")} == {quick_epochs}


# ------------------------------------------------------- random and Optuna
@pytest.mark.parametrize("name,profile", CASES)
def test_sample_honours_conditions(name: str, profile: str) -> None:
    space = get_space(name)
    rng = random.Random(0)
    axes = space.axis_sizes(profile)
    seen: dict[str, dict] = {}
    for _ in range(300):
        cfg = space.sample(rng, profile)
        _check_condition(cfg)
        seen[repr(sorted(cfg.items()))] = cfg
    for cfg in seen.values():
        TrialConfig.from_dict(cfg)
    placements = {c["dropout_placement"] for c in seen.values()}
    assert len(placements) == len({c["dropout_placement"] for c in space.grid(profile)})
    assert set(axes) <= set(next(iter(seen.values())))
    assert space.sample(random.Random(7), profile) == space.sample(random.Random(7), profile)


@pytest.mark.parametrize("name", ["wrn_widths", "backbones", "paper_cifar", "uout_beta"])
def test_suggest_with_a_real_optuna_study(name: str) -> None:
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = get_space(name)
    for profile in ("quick", "paper"):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        placements = set()
        for _ in range(25):
            trial = study.ask()
            cfg = space.suggest(trial, profile)
            _check_condition(cfg)
            TrialConfig.from_dict(cfg)
            placements.add(cfg["dropout_placement"])
            if cfg["dropout_placement"] == "none":
                assert "dropout_rate" not in trial.params and "dropout_type" not in trial.params
            elif space.axis_sizes(profile).get("dropout_rate", 1) > 1:
                assert "dropout_rate" in trial.params
            study.tell(trial, 0.5)
        assert len(placements) > 1


def test_sample_and_suggest_take_a_range_off_its_grid() -> None:
    optuna = pytest.importorskip("optuna")
    rate = get_space("wrn_widths").axes["dropout_rate"]
    assert isinstance(rate, Range)
    rng = random.Random(1)
    draws = {rate.sample(rng) for _ in range(200)}
    assert draws - set(rate.grid_values())  # random search explores between grid points
    assert all(rate.low <= d <= rate.high and abs(d / 0.05 - round(d / 0.05)) < 1e-9 for d in draws)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    lr = Range(low=1e-3, high=1.0, log=True, grid=(0.01, 0.1))
    depth = Range(low=10, high=40, step=6, integer=True, grid=(10, 16))
    for _ in range(20):
        t = study.ask()
        assert 1e-3 <= lr.suggest(t, "lr") <= 1.0
        d = depth.suggest(t, "depth")
        assert isinstance(d, int) and (d - 10) % 6 == 0
        assert 1e-3 <= lr.sample(rng) <= 1.0 and (depth.sample(rng) - 10) % 6 == 0


# ----------------------------------------------------------- the abstraction
def _toy(**kw) -> Space:
    base = dict(
        name="toy", description="toy",
        fixed=dict(depth=10, dataset="digits", image_size=8, in_chans=1, epochs=1, batch_size=8, lr=0.1,
                   weight_decay=0.0, schedule="cosine", seed=0),
        axes=dict(backbone=["cifar_wrn", "cifar_preresnet"], width=[1.0, 2.0],
                  dropout_placement=["none", "head"], dropout_type=["bernoulli", "uout"],
                  dropout_rate=Range(low=0.1, high=0.5, grid=(0.1, 0.5))),
        profiles=dict(quick=Profile(), paper=Profile(axes=dict(width=[4.0]))),
    )
    return Space(**{**base, **kw})


def test_extra_conditions_remove_irrelevant_axes() -> None:
    from spaces import dropout_condition

    only_wrn_width = Condition(on=("backbone",), when=lambda c: c["backbone"] == "cifar_wrn",
                               otherwise={"width": 1.0}, text="width only for WRN")
    space = _toy(conditions=(dropout_condition(), only_wrn_width),
                 links=dict(backbone={"cifar_preresnet": dict(depth=8)}))
    grid = space.grid("quick")
    # WRN: 2 widths x (1 + 2 types x 2 rates); PreResNet: 1 width x 5.
    assert len(grid) == 2 * 5 + 5 == space.size("quick")
    assert {c["depth"] for c in grid if c["backbone"] == "cifar_preresnet"} == {8}
    assert {c["width"] for c in grid if c["backbone"] == "cifar_preresnet"} == {1.0}
    for cfg in grid:
        TrialConfig.from_dict(cfg)
    rng = random.Random(0)
    for _ in range(100):
        cfg = space.sample(rng, "quick")
        assert cfg["backbone"] == "cifar_wrn" or cfg["width"] == 1.0
    assert space.axis_sizes("paper")["width"] == 1


def test_bad_spaces_are_rejected_at_definition() -> None:
    with pytest.raises(SpaceError, match="must come before"):
        _toy(axes=dict(backbone=["cifar_wrn"], width=[1.0], dropout_type=["uout"],
                       dropout_placement=["none", "head"], dropout_rate=[0.1]))
    with pytest.raises(SpaceError, match="required fields"):
        _toy(fixed=dict(depth=10))
    with pytest.raises(SpaceError, match="set axes"):
        _toy(links=dict(backbone={"cifar_wrn": dict(width=3.0)}))
    with pytest.raises(SpaceError, match="duplicate"):
        Choice((1.0, 1))
    with pytest.raises(SpaceError, match="outside"):
        Range(low=0.1, high=0.5, grid=(0.7,))
    with pytest.raises(SpaceError, match="log=True"):
        Range(low=0.1, high=0.5, log=True, step=0.1, grid=(0.1,))
    with pytest.raises(SpaceError, match="one name"):
        @register_space
        def not_toy() -> Space:
            return _toy()
    assert "toy" not in list_spaces()


# ------------------------------------------------------------------ profiles: seeds and the fashion study
def _configs(*argv: str) -> list[dict]:
    """The trial dicts `python -m search.run ARGV` would train (search.run's own parser and expansion)."""
    from search.sweep.cli import _parser, build_configs

    return build_configs(_parser().parse_args(list(argv)))[0]


def test_profile_seeds_must_be_a_positive_integer() -> None:
    assert Profile().seeds == 1 and get_space("smoke").seeds("quick") == 1
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(SpaceError) as e:
            Profile(seeds=bad)
        assert "field 'seeds'" in str(e.value) and repr(bad) in str(e.value) and "integer >= 1" in str(e.value)
    with pytest.raises(SpaceError, match="did you mean 'quick'"):
        get_space("wrn_widths").seeds("quik")


def test_quick_runs_two_seeds_and_keeps_its_seed_zero_hashes() -> None:
    import json
    from pathlib import Path

    space = get_space("wrn_widths")
    assert space.seeds("quick") >= 2
    grid = space.grid("quick")
    configs = _configs("--space", "wrn_widths")  # no --seeds: the profile's
    assert len(configs) == len(grid) * space.seeds("quick")
    assert Counter(c["seed"] for c in configs) == {s: len(grid) for s in range(space.seeds("quick"))}
    pinned = json.loads((Path(__file__).parent / "data" / "config_hashes.json").read_text())["wrn_widths/quick"]
    seed0 = {TrialConfig.from_dict(c).config_hash for c in configs if c["seed"] == 0}
    assert seed0 == set(pinned)  # adding seed 1 left the seed-0 trials (and their stored results) as they were
    # --seeds overrides the profile; --set seed=N pins one seed (no replicates).
    assert {c["seed"] for c in _configs("--space", "wrn_widths", "--seeds", "1")} == {0}
    assert len(_configs("--space", "wrn_widths", "--seeds", "3")) == 3 * len(grid)
    assert {c["seed"] for c in _configs("--space", "wrn_widths", "--set", "seed=5")} == {5}


def test_fashion_profile_is_the_real_image_study() -> None:
    space = get_space("wrn_widths")
    grid = space.grid("fashion")
    assert space.seeds("fashion") >= 3
    assert {c["dataset"] for c in grid} == {"fashion_mnist"} and {c["in_chans"] for c in grid} == {1}
    assert {c["dropout_placement"] for c in grid} == {"none", "pre_bn", "pre_conv", "head"}
    widths = sorted({c["width"] for c in grid})
    assert len(widths) >= 3 and widths[0] == 1.0
    rates = {(c["dropout_type"], c["dropout_rate"]) for c in grid if c["dropout_placement"] != "none"}
    kinds = {k for k, _ in rates}
    assert kinds == {"bernoulli", "uout"} and all(1 <= sum(k == kind for k, _ in rates) <= 2 for kind in kinds)
    # One baseline per width, every (placement, kind, rate) at every width: the cost of each has a partner.
    assert Counter(c["width"] for c in grid if c["dropout_placement"] == "none") == {w: 1 for w in widths}
    assert len(grid) == len(widths) * (1 + 3 * len(rates))
    assert len({(c["train_samples"], c["epochs"], c["image_size"], c["probe_samples"]) for c in grid}) == 1
    # Profiles of one space share its results and MLflow experiment: no fashion trial hashes like a quick one.
    quick = {TrialConfig.from_dict(c).config_hash for c in space.grid("quick")}
    assert not quick & {TrialConfig.from_dict(c).config_hash for c in grid}
    configs = _configs("--space", "wrn_widths", "--profile", "fashion")
    assert len(configs) == len(grid) * space.seeds("fashion")
