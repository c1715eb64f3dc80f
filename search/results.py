"""What a trial returns: summary metrics plus one record per BatchNorm layer.

Plain dataclasses with no torch import, so the driver, tracking and analysis
can read and write them without loading a deep-learning stack.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

__all__ = ["LayerShift", "TrialResult", "STATUSES", "Status", "noise_floor", "FLOOR_LIMIT", "column_meta",
           "column_info", "column_names", "LayerProbe", "register_layer_metric", "layer_metrics", "compute_layer_metrics"]

# A noise-free BN layer's shift above this means its running statistics have not caught up with the
# weights (momentum 0.1 lags the last steps' drift); docs/theory.md, "Noise floor".
FLOOR_LIMIT = 1.10

Status = Literal["ok", "diverged", "failed", "stopped"]
STATUSES: tuple[str, ...] = ("ok", "diverged", "failed", "stopped")  # stopped: early-stopped by ASHA


def column_meta(description: str, unit: str = "", group: str = "", table: bool = False) -> dict[str, Any]:
    """A result column declared once, as its dataclass field's `metadata` (`field(default=..., metadata=...)`).

    Args:
        description: what the value is, with its convention (range, direction, which layers it averages).
        unit: "" where none (a ratio, a flag, a name); else e.g. "fraction", "images/s", "s", "images".
        group: what it belongs to ("accuracy", "shift", "mechanism", "cost", "data", "provenance", ...).
        table: a LayerShift field the MLflow run's `layers.json` table view shows.

    The Parquet schemas (search/schema.py: field metadata `description`, `unit`, `group`), the MLflow
    table view (search/sweep/artifacts.py), analysis' MECHANISM_COLUMNS and docs/columns.md
    (`python -m search.schema --markdown`) are derived from it.
    """
    return {"description": description, "unit": unit, "group": group, "table": table}


def column_info(cls: type, name: str) -> dict[str, Any]:
    """The `column_meta` of dataclass `cls`'s field `name` (KeyError: no such field, or none declared)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if "description" not in f.metadata:
                raise KeyError(f"{cls.__name__}.{name} has no column_meta")
            return dict(f.metadata)
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def column_names(cls: type, *, group: str | None = None, table: bool | None = None) -> tuple[str, ...]:
    """`cls`'s declared fields in declaration order; only those of `group`, or (table=True) the table view's."""
    return tuple(f.name for f in dataclasses.fields(cls)
                 if (group is None or f.metadata.get("group") == group)
                 and (table is None or bool(f.metadata.get("table")) == table))


@dataclass
class LayerShift:
    """Variance shift at one BatchNorm layer (PAPER.md, "The empirical metric").

    `moving_var` and `real_var` are channel means; `shift` is
    max(real/moving, moving/real) of those means; `shift_channelwise` is the
    channel mean of the per-channel max ratio.
    """

    name: str = field(metadata=column_meta(
        "module path of the BN layer in the model, as this trial's placement names it (a pre_bn dropout wrapper "
        "adds a level: bn2 becomes bn2.1); bn_name is the same layer under every placement", group="layer",
        table=True))
    index: int = field(metadata=column_meta(
        "execution order among the BN layers in the first forward pass, from 0; BN layers the forward never "
        "reaches come last, with NaN statistics", group="layer", table=True))
    rel_depth: float = field(metadata=column_meta(
        "index / (number of BN layers - 1), 0 for a single layer", unit="fraction", group="layer"))
    channels: int = field(metadata=column_meta("channels of the BN layer (num_features)", group="layer", table=True))
    fan_in: int | None = field(metadata=column_meta(
        "d: fan-in of the weight layer feeding this BN, in_channels * kh * kw / groups (in_features for a linear); "
        "null when no conv or linear feeds it", group="layer", table=True))
    fed_by_dropout: bool = field(metadata=column_meta(
        "a dropout module runs between the previous BN layer and this one", group="layer", table=True))
    moving_var: float = field(metadata=column_meta(
        "channel mean of BN's running (moving) variance after training: what eval mode normalises with",
        group="shift", table=True))
    real_var: float = field(metadata=column_meta(
        "channel mean of the variance of the BN layer's input in eval mode (dropout off) over the probe images "
        "(n_probe)", group="shift", table=True))
    shift: float = field(metadata=column_meta(
        "the paper's variance shift: max(real_var / moving_var, moving_var / real_var) of the channel means; >= 1, "
        "1 is no shift; the max loses the direction (compare moving_var and real_var for it)",
        group="shift", table=True))
    shift_channelwise: float = field(metadata=column_meta(
        "mean over channels (both variances > 0) of the per-channel max(real / moving, moving / real); >= 1, "
        "direction lost as in shift", group="shift", table=True))
    real_mean: float = field(default=float("nan"), metadata=column_meta(
        "channel mean of the BN input's mean in eval mode over the probe images (the paper's c at this layer)",
        group="shift", table=True))
    cos2: float = field(default=float("nan"), metadata=column_meta(
        "mean over the feeding weight layer's output units of cos^2 between the unit's weight vector and "
        "all-ones, (sum w)^2 / (d ||w||^2) (the paper's cos^2 theta); NaN without a feeding weight layer",
        group="shift", table=True))
    # The mechanism (search/trial/mechanism.py, docs/theory.md). Where a quantity does not apply: NaN.
    c_in: float = field(default=float("nan"), metadata=column_meta(
        "dropout-fed BN layers: channel mean of the mean of the feeding dropout's input, eval mode (the paper's c); "
        "NaN elsewhere", group="mechanism", table=True))
    v_in: float = field(default=float("nan"), metadata=column_meta(
        "dropout-fed BN layers: channel mean of the variance of the feeding dropout's input, eval mode (the "
        "paper's v); NaN elsewhere", group="mechanism", table=True))
    d_cos2: float = field(default=float("nan"), metadata=column_meta(
        "D: mean over the feeding weight layer's output units j of D_j = (sum_i w_ji)^2 / ||w_j||^2 = d cos^2 "
        "theta_j, read from the weights after training; NaN without a feeding conv or linear",
        group="mechanism", table=True))
    rho: float = field(default=float("nan"), metadata=column_meta(
        "dropout-fed BN layers: effective pairwise correlation of the feeding weight layer's inputs, least "
        "squares of Var_eval(Wx)_j = v ||w_j||^2 (1 + rho (D_j - 1)) over units j (docs/theory.md)",
        group="mechanism", table=True))
    shift_frozen: float = field(default=float("nan"), metadata=column_meta(
        "measured: BN input variance with every dropout in train mode and every BN frozen (eval mode) over its "
        "eval-mode variance on the same batches (ratio of channel sums; every 8th probe batch); 1 without "
        "active dropout", group="mechanism", table=True))
    shift_theory: float = field(default=float("nan"), metadata=column_meta(
        "predicted shift_frozen from eval-mode quantities (the propagation): 1 + excess_local + excess_inherited",
        group="mechanism", table=True))
    excess_local: float = field(default=float("nan"), metadata=column_meta(
        "the propagation's extra BN input variance from the dropout feeding this BN (the local identity), over the "
        "eval-mode variance (0 where no dropout is active)", group="mechanism", table=True))
    excess_inherited: float = field(default=float("nan"), metadata=column_meta(
        "the propagation's extra variance from earlier dropouts (residual stream, concatenation, its amplification "
        "by the local mask, the ReLU mean shift), over the eval-mode variance", group="mechanism", table=True))
    bn_name: str | None = field(default=None, metadata=column_meta(
        "the BN module's own path, the same under every placement (name without the level a dropout wrapper "
        "adds: bn2 where name is bn2.1 under pre_bn): the key to compare one layer across placements; null in "
        "files written before it was recorded (analysis.load_study fills it)", group="layer"))
    norm_type: str | None = field(default=None, metadata=column_meta(
        "the layer's normalization (TrialConfig.normalization): batchnorm, or groupnorm, which has no running "
        "statistics and so no variance shift (moving_var, shift, shift_channelwise NaN; shift_frozen is its "
        "train-vs-eval input variance ratio); null in files written before it was recorded (batchnorm)",
        group="layer", table=True))

    def __post_init__(self) -> None:
        # The registered per-layer metrics' values (register_layer_metric), by name: not fields, so the
        # declared columns above stay what they are; to_dict flattens them into the row, one column each.
        self.metrics: dict[str, float] = {}

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), **self.metrics}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerShift":
        """Inverse of to_dict: the fields, and every other key as a registered metric's value."""
        names = {f.name for f in dataclasses.fields(cls)}
        layer = cls(**{k: v for k, v in d.items() if k in names})
        layer.metrics = {k: float(v) if v is not None else math.nan for k, v in d.items() if k not in names}
        return layer


# ---------------------------------------------------------------------------- per-layer metrics
@dataclass(frozen=True)
class LayerProbe:
    """What the shift probe measured at one BN layer: what a registered per-layer metric computes from.

    Attributes:
        layer: the layer's record, its declared columns filled (shift, fan_in, fed_by_dropout, ...).
        moving_var: per channel, BN's running variance after training (numpy float64 [C]; None: no running stats).
        real_var: per channel, the variance of BN's input in eval mode over the probe images (None: never reached).
        real_mean: per channel, the mean of BN's input in eval mode over the probe images.
    """

    layer: LayerShift
    moving_var: Any
    real_var: Any
    real_mean: Any


def register_layer_metric(name: str, *, description: str, unit: str = "", group: str = "metric",
                          table: bool = True, report: bool = True) -> Callable[[Callable[[LayerProbe], float]],
                                                                              Callable[[LayerProbe], float]]:
    """Decorator: a per-layer metric, `fn(probe: LayerProbe) -> float`, declared once.

    The shift probe (search/trial/probes.py) calls it at every BN layer of every trial; its value becomes the
    column `name` of the `layers` Parquet dataset (with `description`, `unit` and `group` as field metadata;
    optional, so older files still load), of the MLflow run's `layers.json` table view (`table=True`), and of
    the report's per-layer metrics table (`report=True`: its median per configuration; analysis/layer_metrics.py).
    A value that is not finite is stored as NaN.

    Raises:
        RegistryError: `name` is not an identifier, is registered twice, or is already a column of `layers`.
    """
    from search import registry  # core: the one registry
    from search.config import TrialConfig

    taken = {f.name for f in dataclasses.fields(LayerShift)} | set(TrialConfig.field_names()) | {
        "run_id", "config_hash", "space"}
    if name in taken:
        raise registry.RegistryError(f"layer_metric {name!r} is already a column of the layers dataset (allowed: a "
                                     "new name)")
    if not description.strip():
        raise registry.RegistryError(f"layer_metric {name!r}: description is empty (allowed: what the value is, "
                                     "with its convention)")

    def deco(fn: Callable[[LayerProbe], float]) -> Callable[[LayerProbe], float]:
        registry.register("layer_metric", name, fn, module=getattr(fn, "__module__", None),
                          **column_meta(description, unit=unit, group=group, table=table), report=report)
        return fn

    return deco


def layer_metrics() -> tuple[Any, ...]:
    """The registered per-layer metrics (registry entries: name, obj = the function, meta = column_meta + report)."""
    from search import registry

    return registry.entries("layer_metric")


def compute_layer_metrics(probe: LayerProbe) -> dict[str, float]:
    """Every registered per-layer metric at one layer (NaN where it is not a finite number)."""
    out = {}
    for e in layer_metrics():
        value = float(e.obj(probe))
        out[e.name] = value if math.isfinite(value) else math.nan
    return out


@dataclass
class TrialResult:
    """Summary of one trial; `layers` holds the per-BN records."""

    status: str = field(default="ok", metadata=column_meta(
        "ok | diverged (non-finite training loss) | failed (an exception: see error) | stopped (early-stopped "
        "by ASHA)", group="outcome"))
    error: str | None = field(default=None, metadata=column_meta(
        "why the trial failed (status failed); null otherwise", group="outcome"))
    test_acc: float = field(default=float("nan"), metadata=column_meta(
        "test accuracy, a fraction in [0, 1] (not %), eval mode, after the last completed epoch and before BN "
        "re-estimation; one test image is 1 / n_test", unit="fraction", group="accuracy"))
    test_loss: float = field(default=float("nan"), metadata=column_meta(
        "mean cross-entropy per test image (natural log, no label smoothing), eval mode, before BN re-estimation",
        unit="nats", group="accuracy"))
    test_acc_reest: float = field(default=float("nan"), metadata=column_meta(
        "test accuracy after BN statistics re-estimation on n_reest training images (dropout off, weights "
        "frozen), a fraction in [0, 1]", unit="fraction", group="accuracy"))
    test_loss_reest: float = field(default=float("nan"), metadata=column_meta(
        "mean cross-entropy per test image after BN re-estimation", unit="nats", group="accuracy"))
    train_loss: float = field(default=float("nan"), metadata=column_meta(
        "mean training loss over the last completed epoch's steps, train mode (dropout on, batch statistics, "
        "augmentation and label smoothing as configured)", unit="nats", group="accuracy"))
    train_acc: float = field(default=float("nan"), metadata=column_meta(
        "fraction in [0, 1] of training images classified right during the last completed epoch's steps "
        "(train mode, augmented)", unit="fraction", group="accuracy"))
    mean_shift: float = field(default=float("nan"), metadata=column_meta(
        "mean over BN layers of the layers' shift (>= 1; the layers dataset has each)",
        group="shift"))
    max_shift: float = field(default=float("nan"), metadata=column_meta(
        "max over BN layers of shift", group="shift"))
    mean_shift_fed: float = field(default=float("nan"), metadata=column_meta(
        "mean shift over the BN layers fed by dropout; NaN where dropout feeds none", group="shift"))
    mean_shift_reest: float = field(default=float("nan"), metadata=column_meta(
        "mean shift over BN layers after BN re-estimation (should be ~1)", group="shift"))
    # The noise floor (docs/theory.md): mean `shift` over BN layers no dropout noise reaches (shift_theory == 1),
    # before and after re-estimation; above FLOOR_LIMIT the running statistics have not converged.
    shift_floor: float = field(default=float("nan"), metadata=column_meta(
        "the noise floor: mean shift over the BN layers no dropout noise reaches (shift_theory == 1; without the "
        "mechanism columns, those not fed by dropout); NaN when there is none", group="shift"))
    shift_floor_reest: float = field(default=float("nan"), metadata=column_meta(
        "shift_floor after BN re-estimation", group="shift"))
    bn_unconverged: bool = field(default=False, metadata=column_meta(
        f"shift_floor > {FLOOR_LIMIT:.2f} (FLOOR_LIMIT): the running statistics lag the weights", group="shift"))
    throughput: float = field(default=float("nan"), metadata=column_meta(
        "training images per second over the training steps only (evaluation, probes and data loading excluded)",
        unit="images/s", group="cost"))
    wall_time_s: float = field(default=float("nan"), metadata=column_meta(
        "the whole trial: data loading, model build, training, evaluation and probes", unit="s", group="cost"))
    train_time_s: float = field(default=float("nan"), metadata=column_meta(
        "training steps only, summed over epochs (evaluation excluded)", unit="s", group="cost"))
    probe_time_s: float = field(default=float("nan"), metadata=column_meta(
        "after training: the shift and mechanism probes, BN re-estimation, its evaluation and the second probe",
        unit="s", group="cost"))
    params: int = field(default=0, metadata=column_meta(
        "parameters of the model (every tensor of model.parameters())", unit="parameters", group="cost"))
    epochs_completed: int = field(default=0, metadata=column_meta(
        "epochs trained to their end (fewer than epochs: diverged, stopped or failed)", unit="epochs",
        group="outcome"))
    # D = d cos^2(theta) read from the weights (no data; docs/theory.md, "D over training"): the mean over BN
    # layers of their feeding weight layer's mean D_j (LayerShift.d_cos2), at initialisation and after the last
    # completed epoch. `d_cos2_*`: the dropout-fed BN layers (NaN when dropout feeds none: placements none,
    # head); `d_cos2_all_*`: every BN layer with a feeding weight layer. Per epoch: history's `d_cos2`, `d_cos2_all`.
    d_cos2_init: float = field(default=float("nan"), metadata=column_meta(
        "D = d cos^2 theta at initialisation: mean over the dropout-fed BN layers of their feeding weight layer's "
        "mean D_j (the layers' d_cos2); NaN where dropout feeds no BN (placements none, head)", group="mechanism"))
    d_cos2_final: float = field(default=float("nan"), metadata=column_meta(
        "d_cos2_init's D after the last completed epoch", group="mechanism"))
    d_cos2_all_init: float = field(default=float("nan"), metadata=column_meta(
        "D at initialisation over every BN layer with a feeding weight layer (the controls' D: defined for every "
        "placement)", group="mechanism"))
    d_cos2_all_final: float = field(default=float("nan"), metadata=column_meta(
        "d_cos2_all_init's D after the last completed epoch", group="mechanism"))
    # The drop-rate schedule's end (TrialConfig.dropout_schedule): the probes measure the network at this rate.
    dropout_rate_final: float = field(default=float("nan"), metadata=column_meta(
        "the drop rate every dropout site applied at the last training step, which the probes and the mechanism "
        "then see: dropout_rate without a schedule, 0 after early dropout, dropout_rate after late dropout; 0 "
        "without dropout sites (placement none); per epoch: history's dropout_rate_applied; NaN in files written "
        "before it was recorded", group="dropout"))
    # Images each stage used (None: the stage did not run). The probes take whole batches, so n_probe is
    # probe_samples rounded up to a batch (capped at n_train); the mechanism sees every 8th of those batches.
    n_train: int | None = field(default=None, metadata=column_meta(
        "training images (after the train_samples cap)", unit="images", group="data"))
    n_test: int | None = field(default=None, metadata=column_meta(
        "test images evaluated: one image is 1 / n_test of test_acc (100 / n_test percentage points)",
        unit="images", group="data"))
    n_probe: int | None = field(default=None, metadata=column_meta(
        "training images the shift probes passed over: probe_samples rounded up to whole batches, capped at "
        "n_train (the mechanism uses every 8th of those batches); null: the probes did not run",
        unit="images", group="data"))
    n_reest: int | None = field(default=None, metadata=column_meta(
        "training images BN re-estimation used; null: it did not run", unit="images", group="data"))
    device: str = field(default="", metadata=column_meta(
        "where the trial ran (e.g. cpu, cuda:0; the trials dataset's ran_on); the config's device is what it "
        "asked for", group="provenance"))
    history: list[dict[str, float]] = field(default_factory=list, metadata=column_meta(
        "one dict per completed epoch (search.trial.train.EPOCH_KEYS): MLflow's per-epoch series (step = epoch); "
        "SERIES_KEYS are also the trials' *_by_epoch columns", group="series"))
    layers: list[LayerShift] = field(default_factory=list, metadata=column_meta(
        "one LayerShift per BN layer: the rows of the layers dataset", group="layers"))

    SUMMARY_KEYS = (
        "test_acc", "test_loss", "test_acc_reest", "test_loss_reest", "train_loss", "train_acc",
        "mean_shift", "max_shift", "mean_shift_fed", "mean_shift_reest", "shift_floor", "shift_floor_reest",
        "bn_unconverged", "throughput",
        "wall_time_s", "train_time_s", "probe_time_s", "params", "epochs_completed",
        "d_cos2_init", "d_cos2_final", "d_cos2_all_init", "d_cos2_all_final", "dropout_rate_final", "n_train",
        "n_test", "n_probe", "n_reest",
    )
    # Epoch keys kept whole as list columns of the trials dataset (`<key>_by_epoch`, `series`): value 0 is
    # `<key>_init`, value e the history's after epoch e.
    SERIES_KEYS = ("d_cos2", "d_cos2_all")
    # Their columns' declaration (search.schema.series_column), as column_meta declares a field's.
    SERIES_META = {
        "d_cos2": column_meta("d_cos2_init's D per epoch: value 0 at initialisation, value e after epoch e "
                              "(NaN where not recorded); null where all NaN", group="mechanism"),
        "d_cos2_all": column_meta("d_cos2_all_init's D per epoch: value 0 at initialisation, value e after epoch e "
                                  "(NaN where not recorded); null where all NaN", group="mechanism"),
    }

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
        layers = [LayerShift.from_dict(x) for x in d.pop("layers", [])]
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
