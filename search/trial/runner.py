"""One trial, measured: data -> model with dropout -> train -> probes -> BN re-estimation.

`run_trial` needs no Ray, Optuna or MLflow, so it runs the same inside a Tune
worker, in a benchmark, or from `python -m search.trial` on a bare GPU image
(its command line: search/trial/cli.py).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping

from search.config import TrialConfig
from search.results import TrialResult, noise_floor

__all__ = ["run_trial", "format_result"]

Report = Callable[[dict[str, float]], None]


def run_trial(cfg: TrialConfig | Mapping[str, Any], report: Report | None = None) -> TrialResult:
    """Train one configuration and measure its variance shift.

    Args:
        cfg: the trial (a TrialConfig or a flat dict of its fields).
        report: called once per epoch with that epoch's metrics (Ray Tune's
            `tune.report`, or anything else).

    Returns:
        The summary metrics and one `LayerShift` per BatchNorm layer. A NaN/inf
        loss gives status "diverged" with the metrics so far; it does not raise.

    Raises:
        ConfigError: a bad configuration. Other errors (a dataset missing, out
        of memory) propagate so the caller can record and retry them.
    """
    import torch

    from search.trial.data import load_data, resolve_device
    from search.trial.models import build_model
    from search.trial.probes import measure_variance_shift, reestimate_bn
    from search.trial.train import evaluate, seed_everything, train

    if not isinstance(cfg, TrialConfig):
        cfg = TrialConfig.from_dict(cfg)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_data(cfg, device)
    model = build_model(cfg, num_classes=data.num_classes).to(device)
    result = TrialResult(params=sum(p.numel() for p in model.parameters()), device=str(device),
                         n_train=data.n_train)

    outcome = train(model, data, cfg, device, on_epoch=report)
    result.status = outcome.status
    result.history = outcome.history
    result.epochs_completed = outcome.epochs_completed
    result.train_loss, result.train_acc = outcome.train_loss, outcome.train_acc
    result.train_time_s, result.throughput = outcome.train_time_s, outcome.throughput
    result.dropout_rate_final = outcome.dropout_rate_final  # the sites now hold it: the probes measure that network
    result.d_cos2_init = outcome.weights_init.get("d_cos2", math.nan)
    result.d_cos2_all_init = outcome.weights_init.get("d_cos2_all", math.nan)
    if outcome.history:
        last = outcome.history[-1]
        result.test_loss, result.test_acc = last["test_loss"], last["test_acc"]
        result.n_test = data.n_test  # the per-epoch evaluation's: the whole test set
        result.d_cos2_final, result.d_cos2_all_final = last["d_cos2"], last["d_cos2_all"]

    if outcome.status == "ok":
        amp = cfg.amp and device.type == "cuda"
        t_probe = time.perf_counter()
        # The paper's protocol: training data, eval mode, dropout off (probe_samples None: all of it).
        probe_data = _first(data.train_eval, cfg.probe_samples)
        result.layers = measure_variance_shift(model, probe_data, device)
        result.n_probe = probe_data.seen or None  # None: no normalization layer, the probe read no batch
        if not outcome.history:  # no per-epoch eval happened
            result.test_loss, result.test_acc = evaluate(model, data.test, device, amp=amp)
        result.n_test = data.n_test
        after = []
        # No BN with running statistics (normalization groupnorm or none): nothing to re-estimate, so the
        # *_reest columns stay NaN and n_reest None (a gain of 0 would claim a re-estimation that never ran).
        if reestimate_bn(model, probe_data, device):
            result.n_reest = probe_data.seen
            result.test_loss_reest, result.test_acc_reest = evaluate(model, data.test, device, amp=amp)
            after = measure_variance_shift(model, probe_data, device, mechanism=False)
        result.probe_time_s = time.perf_counter() - t_probe
        _summarise_shift(result, after)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.wall_time_s = time.perf_counter() - t0
    return result


class _first:
    """The leading batches of a loader holding at least `n` images (all of it when n is None).

    `seen`: the images the last pass over it yielded (whole batches: n rounded up to a batch).
    """

    def __init__(self, loader: Any, n: int | None) -> None:
        self.loader, self.n, self.seen = loader, n, 0

    def __iter__(self):  # noqa: ANN204
        self.seen = 0
        for x, y in self.loader:
            if self.n is not None and self.seen >= self.n:
                return
            self.seen += len(x)
            yield x, y


def _summarise_shift(result: TrialResult, after: list) -> None:
    shifts = [x.shift for x in result.layers if math.isfinite(x.shift)]
    fed = [x.shift for x in result.layers if x.fed_by_dropout and math.isfinite(x.shift)]
    reest = [x.shift for x in after if math.isfinite(x.shift)]
    result.mean_shift = sum(shifts) / len(shifts) if shifts else float("nan")
    result.max_shift = max(shifts) if shifts else float("nan")
    result.mean_shift_fed = sum(fed) / len(fed) if fed else float("nan")
    result.mean_shift_reest = sum(reest) / len(reest) if reest else float("nan")
    result.shift_floor, result.shift_floor_reest, result.bn_unconverged = noise_floor(result.layers, after)


def format_result(cfg: TrialConfig, r: TrialResult, layers: bool = False) -> str:
    """A readable multi-line summary of one trial."""
    lines = [
        f"trial {cfg.config_hash}: {cfg.backbone} depth={cfg.depth} width={cfg.width:g} "
        f"{'' if cfg.normalization is None else cfg.normalization + ' '}"
        f"{cfg.dropout_placement}/{cfg.dropout_type}@{cfg.dropout_rate:g} on {cfg.dataset} ({r.device})",
        f"  status            {r.status}" + (f" ({r.error})" if r.error else ""),
        f"  epochs            {r.epochs_completed}/{cfg.epochs}   params {r.params:,}",
        f"  test acc          {r.test_acc:.4f}   loss {r.test_loss:.4f}",
        f"  after BN re-est.  {r.test_acc_reest:.4f}   loss {r.test_loss_reest:.4f}",
        f"  variance shift    mean {r.mean_shift:.4f}  max {r.max_shift:.4f}  "
        f"fed-by-dropout mean {r.mean_shift_fed:.4f}  after re-est. {r.mean_shift_reest:.4f}",
        f"  throughput        {r.throughput:,.0f} img/s   train {r.train_time_s:.1f}s  "
        f"probes {r.probe_time_s:.1f}s  wall {r.wall_time_s:.1f}s",
        f"  images            train {_count(r.n_train)}  test {_count(r.n_test)}  probes {_count(r.n_probe)}  "
        f"BN re-est. {_count(r.n_reest)}",
        f"  d cos^2 (D)       fed-by-dropout {r.d_cos2_init:.3f} -> {r.d_cos2_final:.3f}   "
        f"all BN {r.d_cos2_all_init:.3f} -> {r.d_cos2_all_final:.3f}   (initialisation -> last epoch)",
    ]
    if cfg.normalization is not None and r.status == "ok":  # why the re-estimation and shift lines read nan
        lines.append(f"  normalization     {cfg.normalization}: no running statistics, so no variance shift to"
                     " measure and no BN re-estimation (nan above; docs/normalization.md)")
    if cfg.dropout_schedule is not None:  # what the probes above measured: the network at the final rate
        lines.append(f"  dropout schedule  {cfg.dropout_schedule} (cutoff epoch {cfg.dropout_cutoff:g}"
                     f"{', linear' if cfg.dropout_decay == 'linear' else ''}): rate {cfg.dropout_rate:g}, at the"
                     f" last step {r.dropout_rate_final:g}")
    if layers and r.layers:
        lines.append(f"  {'idx':>3} {'layer':<34} {'ch':>5} {'d':>6} {'drop':>4} {'moving':>9} {'real':>9} "
                     f"{'shift':>7} {'chan':>7}")
        for x in r.layers:
            lines.append(
                f"  {x.index:>3} {x.name[-34:]:<34} {x.channels:>5} {x.fan_in if x.fan_in else '-':>6} "
                f"{'yes' if x.fed_by_dropout else '':>4} {x.moving_var:>9.4g} {x.real_var:>9.4g} "
                f"{x.shift:>7.4f} {x.shift_channelwise:>7.4f}")
    return "\n".join(lines)


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"
