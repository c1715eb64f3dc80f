"""Results -> tables, theory, fits, guidelines and reports.

    from analysis import load_study, analyse
    from analysis.guidelines import guidelines  # the module shares the function's name
    study = load_study("wrn_widths")            # results/wrn_widths/{trials,layers}
    for g in guidelines(analyse(study)):
        print(g.text)

`python -m analysis.report --space wrn_widths` writes reports/wrn_widths/.
Names are re-exported lazily, so `import analysis.theory` stays light
(no pyarrow or scipy import for the closed forms).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Study": "load", "load_study": "load",
    "ShiftFit": "fit", "CostCell": "fit", "CriticalWidth": "fit", "ReestRow": "fit", "Correlation": "fit",
    "shift_vs_dim": "fit", "accuracy_cost": "fit", "bn_reestimation": "fit", "mean_ci": "fit", "holm": "fit",
    "FactorRow": "guidelines", "factor_importance": "guidelines", "Analysis": "guidelines", "analyse": "guidelines",
    "Guideline": "guidelines",
    "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
