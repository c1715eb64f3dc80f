"""The science of one trial: data, model, dropout placement, training, variance-shift probes.

Nothing here needs Ray, Optuna or MLflow: `run_trial` runs the same inside a Tune
worker, in a benchmark or on a bare GPU image (PYTHONPATH=.). Importing this package
imports no torch; `run_trial` does when called.
"""
from search.trial.runner import format_result, run_trial

__all__ = ["run_trial", "format_result"]  # the command line: search.trial.cli.main
