"""What a trial returns: summary metrics plus one record per BatchNorm layer.

Plain dataclasses with no torch import, so the driver, tracking and analysis
can read and write them without loading a deep-learning stack.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["LayerShift", "TrialResult", "STATUSES", "Status"]

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
    throughput: float = float("nan")  # training images / s, excluding evaluation
    wall_time_s: float = float("nan")
    train_time_s: float = float("nan")
    probe_time_s: float = float("nan")
    params: int = 0
    epochs_completed: int = 0
    device: str = ""
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    layers: list[LayerShift] = field(default_factory=list)

    SUMMARY_KEYS = (
        "test_acc", "test_loss", "test_acc_reest", "test_loss_reest", "train_loss", "train_acc",
        "mean_shift", "max_shift", "mean_shift_fed", "mean_shift_reest", "throughput",
        "wall_time_s", "train_time_s", "probe_time_s", "params", "epochs_completed",
    )

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
