"""The nn.Module that runs a dropout kind, and `make_dropout(name, rate)`.

Probes recognise dropout sites by `VarianceDropout`. A kind registered as a torch-free
`DropoutKind` runs inside `VarianceDropout`; a kind registered (as before) as a
`VarianceDropout` subclass is instantiated directly; any other registered nn.Module class
(timm's `DropBlock2d`, torch's `nn.Dropout2d`, a researcher's own) runs inside `ModuleDropout`.

Drop-rate schedules (TrialConfig.dropout_schedule; search.trial.train moves the rate every step) reach a site
one of two ways. Where the kind can draw its noise from a tensor rate (`reads_rate_tensor`: every built-in kind,
through `DropoutKind.apply_rate`), the trainer binds one 0-dim device tensor to every site (`bind_rate`) and
updates it in place; forward then reads it on the device with no Python branch on its value, so one CUDA graph,
captured once, replays at whatever rate the tensor holds. This was chosen over re-capturing the graph at each
change because a linear decay changes the rate at every step: re-capture per step costs more than the eager
step it replaces, while the tensor costs one `fill_` kernel per change and no host-device sync. Other sites
(ModuleDropout, a kind without `apply_rate`, a subclass with its own forward) get a host float (`set_rate`)
before each step; a graph would bake that value in, so the trainer runs those schedules eagerly.
"""
from __future__ import annotations

import torch
from torch import nn

from search import registry
from search.trial.dropout.kinds import DropoutKind

__all__ = ["VarianceDropout", "ModuleDropout", "make_dropout", "list_dropout_kinds", "kind_class", "RATE_ATTRS"]


class VarianceDropout(nn.Module):
    """A dropout site: identity in eval mode (or at rate 0), the kind's noise in train mode.

    Subclass it and override `noise(x)` (or `forward`) to write a kind as an nn.Module.

    Attributes:
        rate: the rate in force (forward's, unless a tensor is bound); a schedule's final rate after training.
        peak_rate: the rate the site was built with (TrialConfig.dropout_rate), whatever a schedule does to `rate`:
            the probes mark a BN layer as fed by dropout by it (search.trial.probes.is_active_dropout).
        rate_t: None, or the bound 0-dim device tensor that is the rate in force while a schedule runs.
    """

    kind = "base"
    closed_form: str | None = None

    def __init__(self, rate: float, impl: DropoutKind | None = None) -> None:
        super().__init__()
        self.rate = float(rate)
        self.peak_rate = self.rate
        self.rate_t: torch.Tensor | None = None  # a plain attribute, not a buffer: state_dicts stay as they were
        self.impl = impl
        if impl is not None:
            self.kind = impl.kind

    def extra_repr(self) -> str:
        return f"kind={self.kind}, rate={self.rate}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        if self.rate_t is not None:  # scheduled: the rate is read on the device; no branch on its value
            return self.impl.apply_rate(x, self.rate_t)
        if self.rate == 0.0:
            return x
        if self.impl is not None:
            return self.impl.apply(x)
        return x * self.noise(x)

    def reads_rate_tensor(self) -> bool:
        """Whether a schedule's rate can stay on the device here (`bind_rate`): this class's forward runs a kind
        that implements `apply_rate`."""
        return type(self).forward is VarianceDropout.forward and self.impl is not None and \
            type(self.impl).reads_rate_tensor()

    def bind_rate(self, rate_t: torch.Tensor | None) -> None:
        """Read the rate from `rate_t` (a 0-dim float tensor on the model's device, updated in place) in train
        mode; None unbinds (forward reads `rate` again).

        Raises:
            ValueError: this site cannot read a tensor rate (`reads_rate_tensor` is False).
        """
        if rate_t is not None and not self.reads_rate_tensor():
            raise ValueError(f"dropout kind {self.kind!r} cannot read its rate from a device tensor (no apply_rate);"
                             " use set_rate")
        self.rate_t = rate_t

    def set_rate(self, rate: float) -> None:
        """Make `rate` (a host float) the rate in force; `peak_rate` stays."""
        self.rate = float(rate)
        if self.impl is not None:
            self.impl.rate = self.rate

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl is not None:
            return self.impl.noise(x)
        raise NotImplementedError  # pragma: no cover - subclasses define it


def list_dropout_kinds() -> list[str]:
    return sorted(registry.names("dropout"))


def kind_class(name: str) -> type:
    """The registered class of dropout kind `name`.

    Raises:
        ValueError: unknown kind (names the allowed ones).
    """
    return registry.get("dropout", name, field_name="dropout_type").obj


RATE_ATTRS = ("drop_prob", "p")  # where nn.Module dropouts keep their rate: timm's DropBlock2d / DropPath, torch's


class ModuleDropout(VarianceDropout):
    """A registered plain nn.Module dropout class, wrapped so the probes and contracts find it.

    The wrapped module runs in train mode at rate > 0 only; the wrapper is the identity otherwise,
    whatever the module does in eval mode (the framework's promise for every site).

    A schedule sets the module's own rate attribute (the first float of RATE_ATTRS it has) as a host float
    before each step: such modules read it in Python (timm's `if not self.drop_prob`), so it cannot be a
    device tensor, and the trainer runs their schedules without CUDA graphs. A module exposing neither
    attribute cannot be scheduled (`set_rate` refuses it).
    """

    def __init__(self, kind: str, rate: float, inner: nn.Module) -> None:
        super().__init__(rate)
        self.kind = kind
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        return self.inner(x)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.ones_like(x))  # the multiplier, for a module that multiplies its input

    def rate_attr(self) -> str | None:
        """The wrapped module's rate attribute (RATE_ATTRS: the first holding a float), None without one."""
        for name in RATE_ATTRS:
            if type(getattr(self.inner, name, None)) is float:
                return name
        return None

    def set_rate(self, rate: float) -> None:
        """Set the rate in force here and on the wrapped module.

        Raises:
            ValueError: the module has no float `drop_prob` or `p` (one line, naming its class).
        """
        attr = self.rate_attr()
        if attr is None:
            raise ValueError(f"dropout kind {self.kind!r} wraps {type(self.inner).__name__}, which has no float"
                             f" {' or '.join(RATE_ATTRS)} to set each step (allowed: a module exposing one)")
        super().set_rate(rate)
        setattr(self.inner, attr, float(rate))


def make_dropout(kind: str, rate: float, *, block_size: int | None = None) -> VarianceDropout:
    """Build a dropout module of a registered kind.

    Args:
        block_size: the kind's block size (TrialConfig.dropout_block_size); None: the kind's default.

    Raises:
        ValueError: unknown kind, rate outside [0, max_rate), or a block size for a kind that takes none.
    """
    entry = registry.get("dropout", kind, field_name="dropout_type")
    cls = entry.obj
    top = float(getattr(cls, "max_rate", 1.0))
    if not 0.0 <= float(rate) < top:
        raise ValueError(f"field 'dropout_rate' must be in [0, {top:g}), got {rate!r}")
    kwargs = {}
    if block_size is not None:
        if entry.meta.get("block_size") is None:
            raise ValueError(f"field 'dropout_block_size' = {block_size!r}: dropout kind {kind!r} takes no block size"
                             " (allowed: None)")
        kwargs["block_size"] = int(block_size)
    if isinstance(cls, type) and issubclass(cls, VarianceDropout):
        return cls(float(rate), **kwargs)
    if isinstance(cls, type) and issubclass(cls, nn.Module):
        return ModuleDropout(kind, float(rate), cls(float(rate), **kwargs))
    return VarianceDropout(float(rate), cls(float(rate), **kwargs))
