"""What a trial returns: summary metrics plus one record per BatchNorm layer.

Plain dataclasses with no torch import, so the driver, tracking and analysis
can read and write them without loading a deep-learning stack.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

__all__ = ["LayerShift", "TrialResult", "STATUSES", "Status", "noise_floor", "FLOOR_LIMIT"]

# A noise-free BN layer's shift above this means its running statistics have not caught up with the
# weights (momentum 0.1 lags the last steps' drift); docs/theory.md, "Noise floor".
FLOOR_LIMIT = 1.10

Status = Literal["ok", "diverged", "failed", "stopped"]
STATUSES: tuple[str, ...] = ("ok", "diverged", "failed", "stopped")  # stopped: early-stopped by ASHA


@dataclass
class LayerShift:
    """Variance shift at one BatchNorm layer (PAPER.md, "The empirical metric").

    `moving_var` and `real_var` are channel means; `shift` is
    max(real/moving, moving/real) of those means; `shift_channelwise` is the
    channel mean of the per-channel max ratio.
    """

    name: str  # module path in the model
    index: int  # execution order among BN layers, from 0
    rel_depth: float  # index / (n_bn - 1), 0 for a single layer
    channels: int
    fan_in: int | None  # d of the weight layer feeding this BN (in_ch*kh*kw/groups); None if none
    fed_by_dropout: bool  # a dropout module runs between the previous BN and this one
    moving_var: float
    real_var: float
    shift: float
    shift_channelwise: float
    real_mean: float = float("nan")  # channel mean of the input's mean in eval mode (PAPER's c)
    cos2: float = float("nan")  # mean over output channels of cos^2 between the feeding weight and all-ones
    # The mechanism (search/trial/mechanism.py, docs/theory.md). Where a quantity does not apply: NaN.
    c_in: float = float("nan")  # fed BNs: channel mean of the feeding dropout's input mean (eval mode; PAPER's c)
    v_in: float = float("nan")  # fed BNs: channel mean of that input's variance (PAPER's v)
    d_cos2: float = float("nan")  # mean over output units j of D_j = (sum_i w_ji)^2 / ||w_j||^2 = d cos^2 theta
    rho: float = float("nan")  # fed BNs: effective input correlation of the feeding weight layer (least squares)
    shift_frozen: float = float("nan")  # measured: Var(BN input), dropout on and BN frozen / Var in eval mode
    shift_theory: float = float("nan")  # predicted shift_frozen from eval-mode quantities: 1 + local + inherited
    excess_local: float = float("nan")  # the theory's extra variance from the dropout feeding this BN / Var_eval
    excess_inherited: float = float("nan")  # ... from earlier dropouts (the residual stream, concatenation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrialResult:
    """Summary of one trial; `layers` holds the per-BN records."""

    status: str = "ok"  # one of STATUSES
    error: str | None = None
    test_acc: float = float("nan")
    test_loss: float = float("nan")
    test_acc_reest: float = float("nan")  # after BN statistics re-estimation
    test_loss_reest: float = float("nan")
    train_loss: float = float("nan")  # last completed epoch
    train_acc: float = float("nan")
    mean_shift: float = float("nan")  # mean over BN layers of `shift`
    max_shift: float = float("nan")
    mean_shift_fed: float = float("nan")  # mean over BN layers fed by dropout
    mean_shift_reest: float = float("nan")  # after re-estimation (should be ~1)
    # The noise floor (docs/theory.md): mean `shift` over BN layers no dropout noise reaches (shift_theory == 1),
    # before and after re-estimation; above FLOOR_LIMIT the running statistics have not converged.
    shift_floor: float = float("nan")
    shift_floor_reest: float = float("nan")
    bn_unconverged: bool = False
    throughput: float = float("nan")  # training images / s, excluding evaluation
    wall_time_s: float = float("nan")
    train_time_s: float = float("nan")
    probe_time_s: float = float("nan")
    params: int = 0
    epochs_completed: int = 0
    # D = d cos^2(theta) read from the weights (no data; docs/theory.md, "D over training"): the mean over BN
    # layers of their feeding weight layer's mean D_j (LayerShift.d_cos2), at initialisation and after the last
    # completed epoch. `d_cos2_*`: the dropout-fed BN layers (NaN when dropout feeds none: placements none,
    # head); `d_cos2_all_*`: every BN layer with a feeding weight layer. Per epoch: history's `d_cos2`, `d_cos2_all`.
    d_cos2_init: float = float("nan")
    d_cos2_final: float = float("nan")
    d_cos2_all_init: float = float("nan")
    d_cos2_all_final: float = float("nan")
    # Images each stage used (None: the stage did not run). The probes take whole batches, so n_probe is
    # probe_samples rounded up to a batch (capped at n_train); the mechanism sees every 8th of those batches.
    n_train: int | None = None  # training images (after the train_samples cap)
    n_test: int | None = None  # test images evaluated: one image is 100 / n_test percentage points
    n_probe: int | None = None  # training images the shift probes and the mechanism passed over
    n_reest: int | None = None  # training images BN re-estimation used
    device: str = ""
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    layers: list[LayerShift] = field(default_factory=list)

    SUMMARY_KEYS = (
        "test_acc", "test_loss", "test_acc_reest", "test_loss_reest", "train_loss", "train_acc",
        "mean_shift", "max_shift", "mean_shift_fed", "mean_shift_reest", "shift_floor", "shift_floor_reest",
        "bn_unconverged", "throughput",
        "wall_time_s", "train_time_s", "probe_time_s", "params", "epochs_completed",
        "d_cos2_init", "d_cos2_final", "d_cos2_all_init", "d_cos2_all_final", "n_train", "n_test", "n_probe", "n_reest",
    )
    # Epoch keys kept whole as list columns of the trials dataset (`<key>_by_epoch`, `series`): value 0 is
    # `<key>_init`, value e the history's after epoch e.
    SERIES_KEYS = ("d_cos2", "d_cos2_all")

    def __post_init__(self) -> None:
        flag = self.bn_unconverged  # MLflow gives the flag back as 0.0 / 1.0 (NaN: never computed)
        self.bn_unconverged = bool(flag) and flag == flag
        for k in ("n_train", "n_test", "n_probe", "n_reest"):  # MLflow gives counts back as floats
            v = getattr(self, k)
            setattr(self, k, int(v) if isinstance(v, (int, float)) and math.isfinite(v) else None)

    def series(self, key: str) -> list[float] | None:
        """`key`'s value at initialisation, then after each epoch (a SERIES_KEYS key); None when all NaN."""
        values = [float(getattr(self, f"{key}_init"))] + [float(h.get(key, math.nan)) for h in self.history]
        return values if any(v == v for v in values) else None

    def restore_series(self, history_of: Callable[[str], dict[int, float]]) -> None:
        """Put the SERIES_KEYS back into an empty `history` from per-epoch series (step = epoch: MLflow's).

        `history_of(key)` gives {epoch: value}; only keys whose `_init` is recorded are asked for (a run
        logged before D was tracked costs no query). Epochs a series lacks (NaN is never logged) stay NaN.
        """
        if self.history:
            return
        got = {k: history_of(k) for k in self.SERIES_KEYS if math.isfinite(getattr(self, f"{k}_init"))}
        last = int(max([self.epochs_completed, *(max(s) for s in got.values() if s)]))
        self.history = [{"epoch": float(e), **{k: float(s.get(e, math.nan)) for k, s in got.items()}}
                        for e in range(1, last + 1)] if got else []

    def summary(self) -> dict[str, float]:
        """The numeric summary metrics as a flat dict."""
        return {k: getattr(self, k) for k in self.SUMMARY_KEYS}

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "layers"}
        d["layers"] = [layer.to_dict() for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialResult":
        d = dict(d)
        layers = [LayerShift(**x) for x in d.pop("layers", [])]
        return cls(**d, layers=layers)


def noise_floor(layers: list[LayerShift], after: list[LayerShift] | None = None) -> tuple[float, float, bool]:
    """(floor, floor after re-estimation, unconverged) over the BN layers no dropout noise reaches.

    Those are the layers whose theory predicts no extra variance (shift_theory == 1: every
    layer of a `none` trial, and the layers before the first dropout); without the mechanism
    columns, the layers not fed by dropout. NaN floor (and not flagged) when there is none.
    """
    def quiet(x: LayerShift) -> bool:
        if x.shift_theory == x.shift_theory:  # not NaN
            return abs(x.shift_theory - 1.0) < 1e-9
        return not x.fed_by_dropout

    idx = [i for i, x in enumerate(layers) if quiet(x) and math.isfinite(x.shift)]
    floor = sum(layers[i].shift for i in idx) / len(idx) if idx else math.nan
    post = [after[i].shift for i in idx if after is not None and i < len(after) and math.isfinite(after[i].shift)]
    return floor, (sum(post) / len(post) if post else math.nan), bool(idx) and floor > FLOOR_LIMIT
