"""The orchestration of a sweep: CLI, preflight, lock, Ray Tune, MLflow tracking, Parquet writing.

Entry point: `python -m search.run` (search.sweep.cli). Modules import ray, mlflow and
torch lazily, so `--list`, `--help` and `--dry-run` answer without them.
"""
