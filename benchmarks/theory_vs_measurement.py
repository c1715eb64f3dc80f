"""The theory's shift against the frozen measurement, per family x placement x dropout kind (issue 13's target).

Trains small CPU-sized networks with `run_trial` (no Ray, no MLflow), then reads, per BN
layer fed by dropout, `shift_frozen` (measured: dropout on, BN frozen, over eval mode) and
`shift_theory` (predicted from eval-mode quantities: search/trial/mechanism.py). Prints one
row per (backbone, placement, kind): the median and maximum of
|shift_theory - shift_frozen| / shift_frozen over those layers, the layer count, and the
mean local / inherited parts of the predicted excess. Target: median <= 5% in every row.

    PYTHONPATH=. .venv/bin/python benchmarks/theory_vs_measurement.py            # ~3 min on 1 core
    PYTHONPATH=. .venv/bin/python benchmarks/theory_vs_measurement.py --epochs 15 --rate 0.3

Needs no ray, optuna or mlflow.
"""
from __future__ import annotations

import argparse
import statistics
import time

TARGET = 0.05
KINDS = ("bernoulli", "gaussian", "uout")
# PreResNet-8-1 is WRN-10-1 (one basic block per stage, same block): PreResNet-14 has two per stage.
NETS = (("cifar_wrn", 10, 1.0), ("cifar_wrn", 10, 2.0), ("cifar_preresnet", 14, 1.0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rate", type=float, default=0.5, help="drop rate (uout: beta)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    from search.config import TrialConfig
    from search.trial.runner import run_trial

    torch.set_num_threads(args.threads)
    print(f"data: {args.dataset}, {args.epochs} epochs, rate {args.rate:g}; probe: the whole training set, "
          "mechanism on every 8th batch; target: median |theory - frozen| / frozen <= 5%")
    print(f"{'backbone':<16} {'depth':>5} {'width':>5} {'placement':<9} {'kind':<9} {'layers':>6} "
          f"{'median err':>10} {'max err':>8} {'frozen':>7} {'theory':>7} {'paper shift':>11} {'local':>6} "
          f"{'inherit':>7}  verdict")
    worst = 0.0
    t0 = time.perf_counter()
    for backbone, depth, width in NETS:
        for placement in ("pre_bn", "pre_conv"):
            for kind in KINDS:
                cfg = TrialConfig(backbone=backbone, depth=depth, width=width, dataset=args.dataset, image_size=8,
                                  in_chans=1, epochs=args.epochs, batch_size=64, lr=0.05, dropout_type=kind,
                                  dropout_placement=placement, dropout_rate=args.rate, device="cpu", seed=0)
                r = run_trial(cfg)
                fed = [x for x in r.layers if x.fed_by_dropout]
                err = [abs(x.shift_theory - x.shift_frozen) / x.shift_frozen for x in fed]
                med, top = statistics.median(err), max(err)
                worst = max(worst, med)
                mean = lambda k: statistics.fmean(getattr(x, k) for x in fed)  # noqa: E731
                print(f"{backbone:<16} {depth:>5} {width:>5g} {placement:<9} {kind:<9} {len(fed):>6} "
                      f"{100 * med:>9.2f}% {100 * top:>7.2f}% {mean('shift_frozen'):>7.3f} "
                      f"{mean('shift_theory'):>7.3f} {mean('shift'):>11.3f} {mean('excess_local'):>6.3f} "
                      f"{mean('excess_inherited'):>7.3f}  {'ok' if med <= TARGET else 'ABOVE TARGET'}", flush=True)
    print(f"worst median error {100 * worst:.2f}% (target <= {100 * TARGET:.0f}%); "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
