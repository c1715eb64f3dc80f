"""TrialConfig: the one flat, frozen description of a trial.

Field names are the public vocabulary: MLflow params and Parquet columns use
them unchanged. This module imports no torch; dropout kinds, placements and
backbone families are the names registered in `search.registry`, and other backbone
names are checked against timm's registry lazily (timm is imported only when a config
with a backbone outside the registered families is validated).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from search import registry

__all__ = [
    "TrialConfig",
    "ConfigError",
    "DATASETS",
    "NORMALIZATIONS",
    "backbone_family",
    "family_names",
    "parse_override",
]


class ConfigError(ValueError):
    """A bad configuration value. The message names field, value and what is allowed."""


SCHEDULES = ("cosine", "multistep")
DEVICES = ("auto", "cpu", "cuda")
STEMS = ("auto", "cifar", "imagenet")
CUDA_GRAPHS = ("auto", "on", "off")
CROP_PADDINGS = ("zeros", "reflect")
# The drop-rate schedule axis (issue 29), after Liu et al. 2023's drop_scheduler (facebookresearch/dropout):
# `dropout_schedule` is their drop_mode (standard = constant), `dropout_decay` their drop_schedule.
DROPOUT_SCHEDULES = ("constant", "early", "late")
DROPOUT_DECAYS = ("constant", "linear")
# The normalization axis (issue 29; docs/normalization.md); a config's None means batchnorm, the families' own.
NORMALIZATIONS = ("batchnorm", "groupnorm", "none")
DEFAULT_NORM_GROUPS = 32  # norm_groups None: each layer gets gcd(32, its channels) groups


def backbone_family(name: str) -> registry.Entry | None:
    """The registered family named `name` (None for a stock timm model name)."""
    entry = dict((e.name, e) for e in registry.entries("backbone")).get(name)
    return None if entry is None or entry.meta.get("stock") else entry


def family_names() -> tuple[str, ...]:
    """Names of the registered backbone families (not the stock-timm stand-in)."""
    return tuple(e.name for e in registry.entries("backbone") if not e.meta.get("stock"))


def __getattr__(name: str) -> Any:
    # Read-only views kept for code written against the old constants; the registry is the source.
    if name == "PLACEMENTS":
        return registry.names("placement")
    if name == "DROPOUT_TYPES":
        return registry.names("dropout")
    if name == "DATASETS":  # the registered datasets (search/trial/datasets.py and plugins)
        return registry.names("dataset")
    if name == "DATASET_CLASSES":  # classes per dataset when TrialConfig.num_classes is None (None: counted)
        return {e.name: e.meta["classes"] for e in registry.entries("dataset") if e.meta["classes"] is not None}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _meta(hashed: bool = True, help: str = "", hash_none: bool = False, auto: bool = False,
          unit: str = "") -> dict[str, Any]:
    # `unit`: the Parquet column's (search/schema.py; "" where none). Metadata never enters config_hash.
    return {"hashed": hashed, "help": help, "hash_none": hash_none, "auto": auto, "unit": unit}


@dataclass(frozen=True)
class TrialConfig:
    """Everything that defines one trial. Frozen; build variants with `replace`."""

    backbone: str = field(default="cifar_wrn", metadata=_meta(help="timm model name or a CIFAR family"))
    # None resolves to the family's default depth (None for stock timm models). Hashed even when None, as
    # before the default changed from 16, so stored hashes of stock-timm trials stay valid.
    depth: int | None = field(default=None, metadata=_meta(
        help="family depth; None: the family's default (stock timm models fix their own)", hash_none=True))
    width: float = field(default=1.0, metadata=_meta(help="width multiplier (WRN: widen factor k)"))
    dropout_type: str = field(default="bernoulli", metadata=_meta(help="a registered dropout kind"))
    dropout_placement: str = field(default="none", metadata=_meta(help="a registered placement"))
    dropout_rate: float = field(default=0.0, metadata=_meta(help="drop rate 1-p (uout: beta), in [0, 1)"))
    # The drop-rate schedule (issue 29; docs/training.md, "Drop-rate schedules"). None (constant, as before)
    # stays out of the hash, and 'constant' written out is stored as None, so it is the same trial.
    dropout_schedule: str | None = field(default=None, metadata=_meta(
        help="|".join(DROPOUT_SCHEDULES) + ": early = dropout_rate for the steps before dropout_cutoff, then 0;"
             " late = 0 before it, then dropout_rate (Liu et al. 2023's drop_mode); None: constant"))
    dropout_cutoff: float | None = field(default=None, metadata=_meta(
        help="early/late only: the epoch (> 0, fractions allowed) where early dropout ends / late dropout starts;"
             " round(cutoff x steps per epoch) steps come before it", unit="epochs"))
    dropout_decay: str | None = field(default=None, metadata=_meta(
        help="|".join(DROPOUT_DECAYS) + ": the rate within early dropout's phase: linear = from dropout_rate down"
             " to 0 at the phase's last step (Liu et al.'s drop_schedule); None: constant"))
    # A kind's setting (issue 29). None (the kind's default, or a kind without one) stays out of the hash, and
    # the kind's default written out is stored as None, so it is the same trial.
    dropout_block_size: int | None = field(default=None, metadata=_meta(
        help="block side of kinds that take one (dropblock: 7, clipped to the feature map); None: the kind's"
             " default", unit="px"))
    # The normalization axis (issue 29). None (batchnorm, the families' own) stays out of the hash, and
    # 'batchnorm' written out is stored as None, so it is the same trial; likewise norm_groups 32.
    normalization: str | None = field(default=None, metadata=_meta(
        help="|".join(NORMALIZATIONS) + ": what every BatchNorm of the built model (after dropout placement)"
             " becomes: groupnorm = torch GroupNorm with the BN's affine init, none = Identity (a norm-act layer"
             " keeps its activation); None: batchnorm (docs/normalization.md)"))
    norm_groups: int | None = field(default=None, metadata=_meta(
        help="groupnorm only: G; a layer of C channels gets gcd(G, C) groups, and G must divide the channels"
             f" of at least one layer; None: {DEFAULT_NORM_GROUPS}"))
    dataset: str = field(default="digits", metadata=_meta(
        help="a registered dataset (search/trial/datasets.py, or a plugin's register_dataset)"))
    image_size: int = field(default=32, metadata=_meta(help="input side in pixels", unit="px"))
    in_chans: int = field(default=3, metadata=_meta(help="input channels (1 or 3)"))
    stem: str = field(default="auto", metadata=_meta(help="auto|cifar|imagenet: stock timm stem; auto = cifar below 64 px"))
    num_classes: int | None = field(default=None, metadata=_meta(help="None: the dataset's"))
    train_samples: int | None = field(default=None, metadata=_meta(help="cap on training images; None: all",
                                                                   unit="images"))
    probe_samples: int | None = field(default=None, metadata=_meta(
        help="training images the shift probes and BN re-estimation see; None: all (the paper's protocol)",
        unit="images"))
    epochs: int = field(default=5, metadata=_meta(help="training epochs", unit="epochs"))
    batch_size: int = field(default=128, metadata=_meta(help="images per step", unit="images"))
    lr: float = field(default=0.1, metadata=_meta(help="peak learning rate"))
    momentum: float = field(default=0.9, metadata=_meta(help="SGD momentum"))
    nesterov: bool = field(default=True, metadata=_meta(help="Nesterov momentum"))
    weight_decay: float = field(default=5e-4, metadata=_meta(help="L2 weight decay"))
    schedule: str = field(default="cosine", metadata=_meta(help="|".join(SCHEDULES)))
    # Recipe fields (issue 29). None means the behaviour before they existed and stays out of the hash; a
    # value equal to that behaviour is stored as None (`_canonical_recipe`), so it is the same trial.
    lr_milestones: str | None = field(default=None, metadata=_meta(
        help="multistep only: epochs, comma-separated and increasing, after which the lr is multiplied by"
             " lr_factor (torch MultiStepLR's milestones: '81,122' runs epochs 0-80 at lr); None: at half and"
             " three quarters of the steps", unit="epochs"))
    lr_factor: float | None = field(default=None, metadata=_meta(
        help="multistep only: the lr's multiplier at each milestone, in (0, 1]; None: 0.1"))
    weight_decay_norm_bias: bool | None = field(default=None, metadata=_meta(
        help="also decay the tensors with ndim < 2 (norm layers' scales and shifts, biases); None/False: only"
             " conv and linear weights"))
    crop_padding: str | None = field(default=None, metadata=_meta(
        help="|".join(CROP_PADDINGS) + ": how the random crop pads its image_size // 8 border;"
             " None: zeros"))
    warmup_epochs: float = field(default=0.0, metadata=_meta(help="linear warm-up length in epochs",
                                                             unit="epochs"))
    label_smoothing: float = field(default=0.0, metadata=_meta(help="in [0, 1)"))
    augment: bool = field(default=True, metadata=_meta(help="random crop + flip (flip off for digits)"))
    seed: int = field(default=0, metadata=_meta(help="seeds weights, data order and dropout"))
    # Set automatically (search/plugins.py): 'name:sha' of each plugin whose names this trial uses, so an
    # edited plugin hashes apart from the old one. None (built-ins only) stays out of the hash.
    plugins: str | None = field(default=None, metadata=_meta(
        help="plugin identities (name:sha, sorted); set automatically from the registered names", auto=True))
    # Execution knobs: they change speed, not the experiment, so they stay out of the hash.
    device: str = field(default="auto", metadata=_meta(False, "|".join(DEVICES)))
    data_dir: str | None = field(default=None, metadata=_meta(False, "where on-disk datasets live"))
    channels_last: bool = field(default=True, metadata=_meta(False, "NHWC memory format on CUDA"))
    amp: bool = field(default=True, metadata=_meta(False, "bf16 autocast on CUDA"))
    compile: bool = field(default=False, metadata=_meta(False, "torch.compile the model"))
    cuda_graphs: str = field(default="auto", metadata=_meta(
        False, "|".join(CUDA_GRAPHS) + ": CUDA-graph the training step and evaluation passes; auto = on for CUDA"
        " without compile, eager on CPU whatever the value"))
    num_workers: int = field(default=0, metadata=_meta(False, "DataLoader workers off the GPU-resident path"))

    def __post_init__(self) -> None:
        self._check_types()
        self._check_values()
        self._canonical_recipe()
        if self.plugins is None:  # a config read back from a store keeps the identity it was run with
            used = (("dropout", self.dropout_type), ("placement", self.dropout_placement), ("backbone", self.backbone),
                    ("dataset", self.dataset))
            object.__setattr__(self, "plugins", registry.identity_of(used))

    # ------------------------------------------------------------------ build
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrialConfig":
        """Build from a flat mapping; an unknown key is an error (with a suggestion).

        Raises:
            ConfigError: on an unknown key or a bad value.
        """
        names = cls.field_names()
        for key in d:
            if key not in names:
                extra = registry.did_you_mean(key, names, n=3)
                raise ConfigError(f"unknown field {key!r}{extra} (allowed: {', '.join(names)})")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """A flat dict of plain values (JSON-serialisable)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "TrialConfig":
        return dataclasses.replace(self, **changes)

    @property
    def config_hash(self) -> str:
        """16 hex chars of SHA-256 over the canonical JSON of the experiment fields.

        Stable across processes and Python versions: sorted keys, no whitespace,
        floats normalised so 1 and 1.0 hash alike, fields at a None default left out.
        """
        payload = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            # A field left at a None default is omitted, so adding such a field later keeps
            # every stored hash valid.
            if not f.metadata.get("hashed", True) or (v is None and f.default is None
                                                       and not f.metadata.get("hash_none")):
                continue
            if isinstance(v, float):
                v = float(repr(v)) if v != int(v) else int(v)
            payload[f.name] = v
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ------------------------------------------------------------- validation
    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want = str(f.type)
            optional = "None" in want
            if v is None:
                if not optional:
                    raise ConfigError(f"field {f.name!r} must not be None (expects {want})")
                continue
            base = want.replace(" | None", "")
            if base == "bool":
                ok = isinstance(v, bool)
            elif base == "int":
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif base == "float":
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
                if ok and isinstance(v, int):
                    object.__setattr__(self, f.name, float(v))
            else:
                ok = isinstance(v, str)
            if not ok:
                raise ConfigError(f"field {f.name!r} expects {want}, got {v!r} ({type(v).__name__})")

    def _check_values(self) -> None:
        self._check_numbers()
        _choice("dropout_placement", self.dropout_placement, registry.names("placement"))
        _choice("dropout_type", self.dropout_type, registry.names("dropout"))
        _choice("dataset", self.dataset, registry.names("dataset"))
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("stem", self.stem, STEMS)
        _choice("cuda_graphs", self.cuda_graphs, CUDA_GRAPHS)
        if self.cuda_graphs == "on" and self.compile:
            raise ConfigError("field 'cuda_graphs' = 'on' conflicts with compile=True (torch.compile captures its"
                              " own graphs; allowed with compile: auto, off)")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(f"field 'dropout_rate' must be in [0, 1), got {self.dropout_rate!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"field 'label_smoothing' must be in [0, 1), got {self.label_smoothing!r}")
        if self.width <= 0:
            raise ConfigError(f"field 'width' must be > 0, got {self.width!r}")
        if self.in_chans not in (1, 3):
            raise ConfigError(f"field 'in_chans' must be 1 or 3, got {self.in_chans!r}")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"field {name!r} must be >= 1, got {getattr(self, name)!r}")
        if self.image_size < 8:
            raise ConfigError(f"field 'image_size' must be >= 8, got {self.image_size!r}")
        for name in ("lr", "weight_decay", "momentum", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"field {name!r} must be >= 0, got {getattr(self, name)!r}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ConfigError(f"field 'num_classes' must be >= 2 or None, got {self.num_classes!r}")
        if self.train_samples is not None and self.train_samples < 1:
            raise ConfigError(f"field 'train_samples' must be >= 1 or None, got {self.train_samples!r}")
        if self.probe_samples is not None and self.probe_samples < 1:
            raise ConfigError(f"field 'probe_samples' must be >= 1 or None, got {self.probe_samples!r}")
        if self.num_workers < 0:
            raise ConfigError(f"field 'num_workers' must be >= 0, got {self.num_workers!r}")
        self._check_recipe()
        self._check_dropout_schedule()
        self._check_normalization()
        self._check_dropout_settings()
        self._check_backbone()

    def _check_dropout_settings(self) -> None:
        kind, place = registry.get("dropout", self.dropout_type), registry.get("placement", self.dropout_placement)
        if kind.meta.get("needs_map") and not place.meta.get("on_map", True):
            allowed = [e.name for e in registry.entries("placement") if e.meta.get("on_map", True)]
            raise ConfigError(f"field 'dropout_type' = {self.dropout_type!r} needs (N, C, H, W) feature maps, but"
                              f" placement {self.dropout_placement!r} feeds it vectors (allowed placements:"
                              f" {', '.join(allowed)})")
        if self.dropout_block_size is None:
            return
        takes = [e.name for e in registry.entries("dropout") if e.meta.get("block_size") is not None]
        if kind.meta.get("block_size") is None:
            raise ConfigError(f"field 'dropout_block_size' = {self.dropout_block_size!r} applies only to dropout kinds"
                              f" that take a block size ({', '.join(takes) or 'none registered'}); dropout_type is"
                              f" {self.dropout_type!r} (allowed: None)")

    def _check_normalization(self) -> None:
        if self.normalization is not None:
            _choice("normalization", self.normalization, NORMALIZATIONS)
        if self.norm_groups is not None and self.normalization != "groupnorm":
            raise ConfigError(f"field 'norm_groups' = {self.norm_groups!r} applies to normalization 'groupnorm' only"
                              f" (normalization is {self.normalization or 'batchnorm'!r}; allowed: None)")

    def _check_dropout_schedule(self) -> None:
        schedule, cutoff, decay = self.dropout_schedule, self.dropout_cutoff, self.dropout_decay
        if schedule is not None:
            _choice("dropout_schedule", schedule, DROPOUT_SCHEDULES)
        if decay is not None:
            _choice("dropout_decay", decay, DROPOUT_DECAYS)
        if schedule in (None, "constant"):
            if cutoff is not None:
                raise ConfigError(f"field 'dropout_cutoff' = {cutoff!r} applies to dropout_schedule early or late"
                                  f" only (dropout_schedule is {schedule!r}; allowed: None)")
            if decay not in (None, "constant"):
                raise ConfigError(f"field 'dropout_decay' = {decay!r} applies to dropout_schedule 'early' only"
                                  f" (dropout_schedule is {schedule!r}; allowed: None, constant)")
            return
        if self.dropout_placement == "none" or self.dropout_rate == 0.0:
            why = "dropout_placement is 'none'" if self.dropout_placement == "none" else "dropout_rate is 0"
            raise ConfigError(f"field 'dropout_schedule' = {schedule!r} needs dropout to schedule ({why}; allowed:"
                              " None, constant)")
        # Late dropout starting as training ends would never drop (cutoff < epochs); early may span every epoch.
        early = schedule == "early"
        if cutoff is None or not (0.0 < cutoff <= self.epochs if early else 0.0 < cutoff < self.epochs):
            rule = "<=" if early else "<"
            raise ConfigError(f"field 'dropout_cutoff' = {cutoff!r} is not allowed for dropout_schedule {schedule!r}"
                              f" (allowed: an epoch > 0 and {rule} epochs = {self.epochs})")
        if schedule == "late" and decay not in (None, "constant"):
            # Liu et al.'s drop_scheduler asserts a constant rate for late dropout; no linear form is published.
            raise ConfigError(f"field 'dropout_decay' = {decay!r} is not allowed with dropout_schedule 'late'"
                              " (Liu et al. define late dropout at a constant rate; allowed: None, constant)")

    def _check_recipe(self) -> None:
        if self.crop_padding is not None:
            _choice("crop_padding", self.crop_padding, CROP_PADDINGS)
            if not self.augment and self.crop_padding != "zeros":  # a hashed field that would change nothing
                raise ConfigError(f"field 'crop_padding' = {self.crop_padding!r} applies with augment=True only"
                                  " (augment is False; allowed: None)")
        if self.lr_factor is not None and not 0.0 < self.lr_factor <= 1.0:
            raise ConfigError(f"field 'lr_factor' = {self.lr_factor!r} is out of range (allowed: (0, 1], or None"
                              " for 0.1)")
        for name in ("lr_milestones", "lr_factor"):
            if getattr(self, name) is not None and self.schedule != "multistep":
                raise ConfigError(f"field {name!r} = {getattr(self, name)!r} applies to schedule 'multistep' only"
                                  f" (schedule is {self.schedule!r}; allowed: None)")
        if self.lr_milestones is not None:
            self.milestone_epochs()  # raises on a malformed list

    def milestone_epochs(self) -> tuple[int, ...] | None:
        """`lr_milestones` as integers (None when unset: 50% and 75% of the steps).

        Raises:
            ConfigError: not comma-separated integers, not strictly increasing, or outside 1..epochs-1.
        """
        if self.lr_milestones is None:
            return None
        allowed = (f"comma-separated increasing epochs in 1..{self.epochs - 1}, e.g. '81,122'"
                   if self.epochs > 1 else "None (one epoch leaves no epoch to change the lr after)")
        try:
            epochs = tuple(int(t) for t in self.lr_milestones.split(","))
        except ValueError:
            epochs = ()
        if not epochs or any(b <= a for a, b in zip(epochs, epochs[1:])) or not all(
                1 <= m < self.epochs for m in epochs):
            raise ConfigError(f"field 'lr_milestones' = {self.lr_milestones!r} is not allowed (allowed: {allowed})")
        return epochs

    def _canonical_recipe(self) -> None:
        # A value that means the behaviour before these fields existed is stored as None, so the trial keeps
        # its old hash whichever way it was written (as `depth` resolves to the family's default).
        if self.lr_milestones is not None:
            object.__setattr__(self, "lr_milestones", ",".join(map(str, self.milestone_epochs())))
        for name, old in (("lr_factor", 0.1), ("weight_decay_norm_bias", False), ("crop_padding", "zeros"),
                          ("dropout_schedule", "constant"), ("dropout_decay", "constant")):
            if getattr(self, name) == old:
                object.__setattr__(self, name, None)
        if self.normalization == "batchnorm":  # the default written out
            object.__setattr__(self, "normalization", None)
        if self.norm_groups == DEFAULT_NORM_GROUPS:
            object.__setattr__(self, "norm_groups", None)
        if self.dropout_block_size == registry.get("dropout", self.dropout_type).meta.get("block_size"):
            object.__setattr__(self, "dropout_block_size", None)  # the kind's default

    def _check_numbers(self) -> None:
        """Every number finite and inside its field's range, checked before any rule that compares it.

        NaN compares False with everything, so without this `lr=nan` passed `lr >= 0` and
        failed later in `config_hash` ("cannot convert float NaN to integer"); `lr=inf` ended
        in an OverflowError. Integers must fit Parquet's int64 (and seeds NumPy's uint32).
        """
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None or isinstance(v, (bool, str)):
                continue
            lo, hi = _RANGES.get(f.name, (None, None))
            if isinstance(v, float) and not math.isfinite(v):
                allowed = _OPEN_RANGES.get(f.name) or _range_text(lo, hi)
                raise ConfigError(f"field {f.name!r} = {v!r} is not a finite number (allowed: {allowed})")
            if isinstance(v, int) and not (lo is not None or hi is not None):
                lo, hi = -_INT_MAX, _INT_MAX
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ConfigError(f"field {f.name!r} = {v!r} is out of range (allowed: {_range_text(lo, hi)})")

    def _check_backbone(self) -> None:
        family = backbone_family(self.backbone)
        if family is not None:
            default, rule, ok = (family.meta.get(k) for k in ("default_depth", "depth_rule", "depth_ok"))
            if default is None and ok is None:  # a family without a depth knob
                if self.depth is not None:
                    raise ConfigError(f"field 'depth' = {self.depth!r}: backbone {self.backbone!r} takes no depth;"
                                      " leave depth unset")
                return
            depth = default if self.depth is None else self.depth
            if ok is not None and not ok(depth):
                raise ConfigError(
                    f"field 'depth' = {depth!r} is invalid for backbone {self.backbone!r}: depth must be {rule}"
                )
            object.__setattr__(self, "depth", depth)
            return
        families = family_names()
        known = timm_model_names()
        if self.backbone not in known:
            extra = registry.did_you_mean(self.backbone, list(families) + sorted(known), n=3)
            raise ConfigError(
                f"field 'backbone' = {self.backbone!r} is not a timm model nor a registered family"
                f" ({', '.join(families)}){extra}"
            )
        if self.depth is not None:
            raise ConfigError(
                f"field 'depth' = {self.depth!r} is only for the registered families ({', '.join(families)});"
                f" stock timm model {self.backbone!r} fixes its own depth: set depth=None (or leave it unset)"
            )


_INT_MAX = 2**31 - 1
# Closed ranges of the numeric fields; rules with open ends (dropout_rate < 1, width > 0) stay below
# in _check_values with their own messages. These bound what the hardware or Parquet can take.
_RANGES: dict[str, tuple[float | None, float | None]] = {
    "depth": (1, 10_000), "width": (None, 1e4), "image_size": (8, 8192),
    "in_chans": (1, 3), "num_classes": (2, 10**6), "train_samples": (1, _INT_MAX), "probe_samples": (1, _INT_MAX),
    "dropout_block_size": (1, 8192), "norm_groups": (1, 8192),
    "epochs": (1, 100_000), "batch_size": (1, 2**20), "lr": (0.0, 1e6), "momentum": (0.0, 1.0),
    "weight_decay": (0.0, 1e3), "warmup_epochs": (0.0, 100_000.0),
    "seed": (0, 2**32 - 1), "num_workers": (0, 1024),
}


_OPEN_RANGES = {"dropout_rate": "[0, 1)", "dropout_cutoff": "an epoch > 0 and <= epochs", "label_smoothing": "[0, 1)",
                "width": "> 0 and <= 10000", "lr_factor": "(0, 1]"}


def _range_text(lo: float | None, hi: float | None) -> str:
    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else f"{x:g}"

    if lo is None and hi is None:
        return "a finite number"
    if hi is None:
        return f">= {num(lo)}"
    if lo is None:
        return f"<= {num(hi)}"
    return f"{num(lo)} to {num(hi)}"


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(str(registry.not_allowed(f"field {name!r}", value, allowed)))


_TIMM_NAMES: frozenset[str] | None = None


def timm_model_names() -> frozenset[str]:
    """All model names in timm's registry (cached).

    Read from timm's source (the functions it marks `@register_model`) so that validating
    a stock backbone imports neither timm nor torch; timm's own `list_models()` when timm
    is already imported. A test checks the two agree.
    """
    global _TIMM_NAMES
    if _TIMM_NAMES is None:
        import sys

        if "timm" in sys.modules:
            _TIMM_NAMES = frozenset(sys.modules["timm"].list_models())
        else:
            _TIMM_NAMES = _scan_timm_sources()
    return _TIMM_NAMES


def _scan_timm_sources() -> frozenset[str]:
    import importlib.util
    import os
    import re

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.origin:
        raise ConfigError("field 'backbone': timm is not installed, so stock timm models cannot be checked"
                          " (pip install timm)")
    folder = os.path.join(os.path.dirname(spec.origin), "models")
    pattern = re.compile(r"@register_model\s*(?:\([^)]*\))?\s*\ndef\s+(\w+)")
    names: set[str] = set()
    for name in os.listdir(folder):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                names.update(pattern.findall(fh.read()))
    return frozenset(names)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a `key=value` override, typed by TrialConfig's field type. Never evaluates code.

    Raises:
        ConfigError: unknown key, missing '=', or a value that does not parse as the field's type.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    types = {f.name: str(f.type) for f in dataclasses.fields(TrialConfig)}
    if key not in types:
        extra = registry.did_you_mean(key, list(types), n=3)
        raise ConfigError(f"override {text!r}: unknown field {key!r}{extra} (allowed: {', '.join(types)})")
    return key, parse_value(key, types[key], raw)


def parse_value(key: str, type_text: str, raw: str) -> Any:
    optional = "None" in type_text
    base = type_text.replace(" | None", "")
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        if base == "bool":
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base == "int":
            return int(raw)
        if base == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"field {key!r} expects {type_text}, got {raw!r}") from None
    return raw
