"""A benchmark-only plugin: trials that train nothing, for timing the control plane (benchmarks/control_plane.py).

    python -m search.run --plugin benchmarks/_synthetic_trials.py --space control_plane --seeds 10 ...

It registers the backbone `synthetic` (a two-layer net that passes the backbone contract and is
never trained) and the space `control_plane` (100 configurations per seed). In every process
that loads it (the driver, and each Ray worker through `search.plugins.setup_worker`), it wraps
`search.trial.runner.run_trial`: a `synthetic` trial returns at once a TrialResult shaped like a
real one (`depth` BatchNorm layers with every LayerShift field set, `epochs` per-epoch rows with
every EPOCH_KEYS key, every summary value), and any other backbone runs as usual. So a
synthetic trial goes through the same path as a real one after `run_trial`: Tune's trainable and
reports, the driver's Tune callback, MLflow's runs, params, metrics, tags and artifacts, Parquet
staging and compaction. Only the training is missing, which is what the benchmark subtracts.

`DBN_SYNTHETIC_SLEEP` (seconds, default 0) makes each synthetic trial sleep that long, to see a
trial of known length through the control plane.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from typing import Any

from search import register_backbone
from spaces import Profile, Space, register_space

WIDTHS = (1.0, 2.0, 4.0, 8.0)
RATES = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
# Per width: `none` + 2 placements x 2 kinds x 6 rates = 25; x 4 widths = 100 configurations per seed.
PER_SEED = len(WIDTHS) * (1 + 2 * 2 * len(RATES))
LAYERS = 50  # BN layers per synthetic trial (the 20-50; WRN-28-10 has 25, PreResNet-110 has 55)


@register_backbone("synthetic", default_depth=LAYERS, depth_rule="1 to 200 (the number of BN layers reported)",
                   depth_ok=lambda d: 1 <= d <= 200,
                   blocks={"search.trial.models.cifar_wrn:WideBasicBlock": ("shortcut",)})
def synthetic(*, depth: int, width: float, num_classes: int, in_chans: int) -> Any:
    """For the contract and the driver's placement check only (a WRN-10-1): synthetic trials never train one."""
    import timm

    import search.trial.models  # noqa: F401 - registers cifar_wrn in timm

    return timm.create_model("cifar_wrn", depth=10, width=1.0, num_classes=num_classes, in_chans=in_chans)


@register_space
def control_plane() -> Space:
    return Space(
        name="control_plane",
        description=f"benchmark only: {PER_SEED} synthetic configurations per seed that train nothing "
                    "(benchmarks/control_plane.py)",
        fixed=dict(backbone="synthetic", depth=LAYERS, dataset="digits", image_size=8, in_chans=1, epochs=10,
                   batch_size=64, lr=0.05, weight_decay=5e-4, schedule="cosine", seed=0),
        axes=dict(width=list(WIDTHS), dropout_placement=["none", "pre_bn", "pre_conv"],
                  dropout_type=["bernoulli", "gaussian"], dropout_rate=list(RATES)),
        profiles=dict(quick=Profile(text="synthetic"), paper=Profile(text="synthetic (same as quick)")),
    )


def synthetic_result(cfg: Any) -> Any:
    """A TrialResult shaped like a real one, with values drawn from the config's hash (deterministic)."""
    from search.results import LayerShift, TrialResult
    from search.trial.train import EPOCH_KEYS

    rng = random.Random(cfg.config_hash)
    rate = cfg.dropout_rate if cfg.dropout_placement != "none" else 0.0
    layers = []
    for i in range(cfg.depth):
        values: dict[str, Any] = {}
        for f in dataclasses.fields(LayerShift):
            kind = str(f.type)
            if f.name == "name":
                values[f.name] = f"body.{i // 4}.{i % 4}.bn"
            elif f.name == "bn_name":
                values[f.name] = f"body.{i // 4}.{i % 4}.bn"
            elif f.name == "index":
                values[f.name] = i
            elif f.name == "rel_depth":
                values[f.name] = i / max(1, cfg.depth - 1)
            elif kind.startswith("bool"):
                values[f.name] = rate > 0 and i % 2 == 1
            elif kind.startswith("int"):
                values[f.name] = 16 * int(cfg.width) * (1 + i * 3 // cfg.depth)
            elif kind.startswith("float"):
                values[f.name] = 1.0 + rate * rng.random() if "shift" in f.name else rng.random()
            elif kind.startswith("str"):
                values[f.name] = ""
        layers.append(LayerShift(**values))
    acc = 0.9 - 0.2 * rate / math.sqrt(cfg.width) + 0.01 * rng.random()
    history = [{k: (float(e) if k == "epoch" else acc * e / cfg.epochs if "acc" in k else rng.random())
                for k in EPOCH_KEYS} for e in range(1, cfg.epochs + 1)]
    shifts = [x.shift for x in layers]
    return TrialResult(
        status="ok", test_acc=acc, test_loss=1 - acc, test_acc_reest=acc + 0.02 * rate,
        test_loss_reest=1 - acc - 0.02 * rate, train_loss=0.1, train_acc=0.99,
        mean_shift=sum(shifts) / len(shifts), max_shift=max(shifts), mean_shift_fed=max(shifts),
        mean_shift_reest=1.0, shift_floor=1.0, shift_floor_reest=1.0, throughput=1000.0, wall_time_s=0.0,
        train_time_s=0.0, probe_time_s=0.0, params=1000, epochs_completed=cfg.epochs, d_cos2_init=1.5,
        d_cos2_final=1.7, d_cos2_all_init=1.5, d_cos2_all_final=1.7, n_train=256, n_test=64, n_probe=256,
        n_reest=256, device="cpu", history=history, layers=layers)


def _install() -> None:
    """Wrap run_trial in this process: `synthetic` trials return `synthetic_result`, others run as usual."""
    import search.trial.runner as runner

    if getattr(runner.run_trial, "_synthetic", False):
        return
    real = runner.run_trial

    def run_trial(cfg: Any, report: Any = None) -> Any:
        from search.config import TrialConfig

        cfg = cfg if isinstance(cfg, TrialConfig) else TrialConfig.from_dict(cfg)
        if cfg.backbone != "synthetic":
            return real(cfg, report)
        time.sleep(float(os.environ.get("DBN_SYNTHETIC_SLEEP", "0") or 0))
        result = synthetic_result(cfg)
        for row in result.history:  # what a real trial reports after each epoch (the trainable's tune.report)
            if report is not None:
                report(dict(row))
        return result

    run_trial._synthetic = True  # type: ignore[attr-defined]
    runner.run_trial = run_trial


_install()
