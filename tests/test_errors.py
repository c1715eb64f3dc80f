"""Bad input, row by row from docs/errors.md: one clear line, non-zero exit, nothing written.

`CASES` is the table (docs/errors.md shows the same rows; `test_every_documented_error_is_tested`
keeps the two in step, and accepts rows tested in tests/test_run_cli.py). Each case calls the
command's `main(argv)` in this process, from an empty working directory: a subprocess per row
would spend seconds importing torch, Ray and MLflow for a check that takes milliseconds
(tests/test_run_cli.py runs its rows through `python -m`). Past validation, the sweep driver
and `run_trial` are replaced by a stub that fails the case: reaching them means a check came
too late, after the sweep would have started writing.
"""
from __future__ import annotations

import importlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from _cifar import write_cifar10
from _idx import write_idx

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"


@dataclass(frozen=True)
class Case:
    id: str
    module: str  # search.run | search.trial | analysis.report
    args: str  # shell words; {placeholders} name fixtures made outside the working directory
    expect: tuple[str, ...]  # substrings of the one stderr line (field, value, allowed values)
    debug: bool = False  # also check that --debug shows the traceback
    env: tuple[tuple[str, str], ...] = ()  # environment of the case (e.g. no GPU visible)


S = "--space smoke"
CASES = [
    # search.run: arguments
    Case("no-space", "search.run", "", ("--space is required", "--list")),
    Case("unknown-profile", "search.run", "--space wrn_widths --profile fast",
         ("--profile 'fast'", "space 'wrn_widths'", "allowed: quick, fashion, width, epochs, paper"), debug=True),
    Case("seeds-zero", "search.run", f"{S} --seeds 0", ("--seeds 0", ">= 1")),
    Case("until-ci-range", "search.run", f"{S} --until-ci 0", ("--until-ci 0 is not allowed",
                                                                "percentage points in (0, 100]")),
    Case("until-ci-nan", "search.run", f"{S} --until-ci nan", ("--until-ci nan is not allowed",)),
    Case("until-ci-optuna", "search.run", f"{S} --until-ci 5 --algo optuna", ("--until-ci is for --algo grid",)),
    Case("until-ci-of", "search.run", f"{S} --until-ci 5 --until-ci-of shift",
         ("--until-ci-of 'shift' is not allowed", "allowed: cost, reest")),
    Case("max-seeds-low", "search.run", f"{S} --until-ci 5 --max-seeds 2", ("--max-seeds 2 is not allowed",
                                                                             "allowed: 3 to 1000")),
    Case("cpus-per-trial-zero", "search.run", f"{S} --cpus-per-trial 0", ("--cpus-per-trial", "> 0")),
    Case("unknown-scheduler", "search.run", f"{S} --scheduler hyperband",
         ("--scheduler 'hyperband'", "allowed: fifo, asha")),
    Case("resume-and-force", "search.run", f"{S} --resume --force", ("--resume and --force exclude each other",),
         debug=True),
    # search.run: --set
    Case("set-without-equals", "search.run", f"{S} --set epochs", ("override 'epochs'", "key=value")),
    Case("set-bool-wrong-type", "search.run", f"{S} --set nesterov=maybe", ("field 'nesterov'", "expects bool", "'maybe'"),
         debug=True),
    Case("set-none-for-required-int", "search.run", f"{S} --set epochs=none", ("field 'epochs'", "expects int")),
    Case("unknown-dropout-type", "search.run", f"{S} --set dropout_type=bernouli",
         ("field 'dropout_type' = 'bernouli'", "allowed: bernoulli, gaussian, uout", "did you mean 'bernoulli'")),
    Case("unknown-placement", "search.run", f"{S} --set dropout_placement=pre-bn",
         ("field 'dropout_placement' = 'pre-bn'", "allowed: none, pre_bn, pre_conv, head"), debug=True),
    Case("rate-below-range", "search.run", f"{S} --set dropout_rate=-0.1", ("field 'dropout_rate'", "[0, 1)", "-0.1")),
    Case("width-not-positive", "search.run", f"{S} --set width=0", ("field 'width'", "> 0")),
    Case("preresnet-depth", "search.run", f"{S} --set backbone=cifar_preresnet --set depth=21",
         ("field 'depth' = 21", "cifar_preresnet", "6n+2", "9n+2")),
    Case("unknown-backbone-suggests", "search.run", f"{S} --set backbone=resnet5O --set depth=none",
         ("field 'backbone' = 'resnet5O'", "did you mean resnet50")),
    Case("depth-on-stock-backbone", "search.run", f"{S} --set backbone=resnet18",
         ("field 'depth' = 10", "resnet18", "set depth=None")),
    # search.run: combinations only a built model can judge (preflight builds it on the meta device)
    Case("placement-needs-batchnorm", "search.run",
         f"{S} --set backbone=convnext_atto --set depth=none --set dropout_placement=pre_bn "
         "--set image_size=32 --set in_chans=3",
         ("field 'dropout_placement' = 'pre_bn'", "convnext_atto", "allowed for it: none, head")),
    Case("image-too-small-for-backbone", "search.run",
         f"{S} --set backbone=convnext_atto --set depth=none --set dropout_placement=none",
         ("field 'image_size'", "convnext_atto")),
    # search.run: data
    Case("dataset-dir-empty", "search.run",
         f"{S} --set dataset=cifar10 --set image_size=32 --set in_chans=3 --data-dir {{empty_dir}}",
         ("dataset 'cifar10'", "missing", "data_batch_1", "cifar-10-batches-py")),
    Case("dataset-needs-data-dir", "search.run", f"{S} --set dataset=cifar10 --set image_size=32 --set in_chans=3",
         ("dataset 'cifar10'", "field 'data_dir'")),
    Case("cifar-file-corrupt", "search.run",
         f"{S} --set dataset=cifar10 --set image_size=32 --set in_chans=3 --data-dir {{cifar_corrupt}}",
         ("data_batch_3", "not a readable CIFAR batch")),
    Case("idx-dir-empty", "search.run", f"{S} --set dataset=fashion_mnist --set image_size=16 --data-dir {{empty_dir}}",
         ("dataset 'fashion_mnist'", "missing train-images-idx3-ubyte", "apt-get install dataset-fashion-mnist")),
    Case("mnist-needs-data-dir", "search.run", f"{S} --set dataset=mnist --set image_size=16",
         ("dataset 'mnist' needs field 'data_dir'", "ossci-datasets.s3.amazonaws.com/mnist")),
    Case("idx-file-corrupt", "search.run", f"{S} --set dataset=fashion_mnist --set image_size=16 --data-dir {{idx_corrupt}}",
         ("train-labels-idx1-ubyte", "not a readable idx file", "magic number")),
    Case("data-dir-uri-missing", "search.run", f"{S} --data-dir file:///nonexistent/dbn-data",
         ("--data-dir 'file:///nonexistent/dbn-data'", "does not exist")),
    # search.run: services
    Case("address-unreachable", "search.run", f"{S} --address 127.0.0.1:1",
         ("--address '127.0.0.1:1'", "no Ray cluster reachable")),
    Case("storage-uri-unknown-scheme", "search.run", f"{S} --storage foo://bar", ("--storage 'foo://bar'", "not reachable")),
    Case("tracking-db-under-a-file", "search.run", f"{S} --tracking-uri sqlite:///{{a_file}}/mlflow.db",
         ("--tracking-uri", "is a file, not a directory")),
    # search.trial
    Case("trial-depth", "search.trial.cli", "--backbone cifar_wrn --depth 12",
         ("field 'depth' = 12", "cifar_wrn", "6n+4"), debug=True),
    # analysis.report
    Case("report-no-results", "analysis.report", "--space smoke --root {empty_dir}",
         ("space 'smoke'", "no trial results under", "python -m search.run --space smoke")),
    Case("report-corrupt-parquet", "analysis.report", "--space smoke --root {parquet_corrupt}",
         ("not readable Parquet", "part-0.parquet")),
    Case("report-foreign-parquet", "analysis.report", "--space smoke --root {parquet_foreign}",
         ("part-0.parquet", "column 'run_id' is missing"), debug=True),
    Case("report-wrong-column-type", "analysis.report", "--space smoke --root {parquet_wrong_type}",
         ("part-0.parquet", "column 'test_acc' has type string, expected double")),
    Case("report-n-boot", "analysis.report", "--space smoke --n-boot 10", ("--n-boot must be >= 100",)),
    # non-finite and out-of-range numbers, in any field (issue 14)
    Case("set-lr-inf", "search.run", f"{S} --set lr=inf", ("field 'lr' = inf", "not a finite number",
                                                           "allowed: 0 to 1000000"), debug=True),
    Case("set-lr-nan", "search.run", f"{S} --set lr=nan", ("field 'lr' = nan", "not a finite number")),
    Case("set-rate-nan", "search.run", f"{S} --set dropout_rate=nan",
         ("field 'dropout_rate' = nan", "not a finite number", "[0, 1)")),
    Case("set-seed-out-of-range", "search.run", f"{S} --set seed=-1",
         ("field 'seed' = -1", "out of range", "0 to 4294967295")),
    Case("set-epochs-huge", "search.run", f"{S} --set epochs=100000000000000000000",
         ("field 'epochs' = 100000000000000000000", "out of range", "1 to 100000")),
    Case("trial-lr-inf", "search.trial.cli", "--lr inf", ("field 'lr' = inf", "not a finite number")),
    Case("trial-json-folder-missing", "search.trial.cli", "--json {empty_dir}/no/such/result.json",
         ("--json", "does not exist")),
    # settings that would be silently ignored
    Case("seeds-with-set-seed", "search.run", f"{S} --seeds 2 --set seed=5",
         ("--seeds 2 trains seeds 0..1", "--set seed=5", "ignored")),
    Case("samples-with-grid", "search.run", f"{S} --samples 3", ("--samples 3", "--algo random or optuna")),
    Case("search-seed-with-grid", "search.run", f"{S} --search-seed 1", ("--search-seed 1", "grid")),
    # reuse policy
    Case("reuse-unknown", "search.run", f"{S} --reuse sometimes",
         ("--reuse 'sometimes'", "allowed: same-code, any, none")),
    Case("force-and-reuse-any", "search.run", f"{S} --force --reuse any", ("--force means --reuse none",)),
    Case("resume-and-reuse-none", "search.run", f"{S} --resume --reuse none",
         ("--resume and --reuse none exclude each other",)),
    # requests that can never be met, refused before anything is written
    Case("cpus-per-trial-above-cluster", "search.run", f"{S} --cpus-per-trial 3 --num-cpus 2",
         ("--cpus-per-trial 3 can never be met", "2 CPU(s)"), debug=True),
    Case("gpus-on-machine-without-gpu", "search.run", f"{S} --gpus-per-trial 1",
         ("--gpus-per-trial 1 can never be met", "0 GPU(s)"), env=(("CUDA_VISIBLE_DEVICES", ""),)),
    Case("device-cuda-without-gpu", "search.run", f"{S} --set device=cuda",
         ("field 'device' = 'cuda'", "no GPU"), env=(("CUDA_VISIBLE_DEVICES", ""),)),
    Case("resource-wait-without-address", "search.run", f"{S} --resource-wait 60",
         ("--resource-wait 60 is for a cluster (--address)",)),
    Case("resource-wait-negative", "search.run", f"{S} --resource-wait -5 --address auto",
         ("--resource-wait -5 is not allowed", "seconds >= 0")),
    Case("address-auto-without-cluster", "search.run", f"{S} --address auto",
         ("--address 'auto'", "no Ray cluster reachable"), env=(("RAY_ADDRESS", "127.0.0.1:1"),)),
    # tracking stores that keep nothing, or that MLflow 3 no longer opens
    Case("tracking-in-memory", "search.run", f"{S} --tracking-uri sqlite:///:memory:",
         ("--tracking-uri 'sqlite:///:memory:'", "in-memory", "keeps nothing")),
    Case("tracking-file-store", "search.run", f"{S} --tracking-uri file:{{empty_dir}}/mlruns",
         ("MLflow 3 no longer supports file stores", "sqlite:///")),
    Case("report-unknown-profile", "analysis.report", "--space smoke --root {smoke_store} --profile fashion",
         ("--profile 'fashion'", "no trials of that profile in smoke", "profiles there: smoke: quick")),
    # every number a user can type is finite and bounded (issue 30): NaN passed `<= 0`, and the sweep waited
    # forever for nan CPUs holding the lock
    Case("cpus-per-trial-nan", "search.run", f"{S} --cpus-per-trial nan",
         ("--cpus-per-trial nan is not allowed", "allowed: > 0 and <= 4096"), debug=True),
    Case("cpus-per-trial-huge", "search.run", f"{S} --cpus-per-trial 1e9",
         ("--cpus-per-trial 1e+09 is not allowed", "<= 4096")),
    Case("gpus-per-trial-nan", "search.run", f"{S} --gpus-per-trial nan",
         ("--gpus-per-trial 'nan' is not allowed", "'auto' or a number >= 0 and <= 64")),
    Case("gpus-per-trial-huge", "search.run", f"{S} --gpus-per-trial 1e6",
         ("--gpus-per-trial '1e6' is not allowed", "<= 64")),
    Case("num-cpus-huge", "search.run", f"{S} --num-cpus 100000000",
         ("--num-cpus 100000000 is not allowed", "allowed: >= 1 and <= 4096")),
    Case("max-concurrent-negative", "search.run", f"{S} --max-concurrent -1",
         ("--max-concurrent -1 is not allowed", "allowed: >= 0 and <= 100000")),
    Case("retries-huge", "search.run", f"{S} --retries 1000000000",
         ("--retries 1000000000 is not allowed", "allowed: >= 0 and <= 100")),
    Case("seeds-huge", "search.run", f"{S} --seeds 100000", ("--seeds 100000 is not allowed", "<= 1000")),
    Case("samples-huge", "search.run", f"{S} --algo random --samples 100000000",
         ("--samples 100000000 is not allowed", "allowed: >= 1 and <= 1000000")),
    Case("trials-too-many", "search.run", f"{S} --algo random --samples 100000 --seeds 100",
         ("--samples 100000 x --seeds 100 = 10000000 trials is not allowed", "at most 1000000 trials")),
    Case("search-seed-negative", "search.run", f"{S} --algo random --search-seed -1",
         ("--search-seed -1 is not allowed", "allowed: >= 0 and <= 4294967295")),
    Case("resource-wait-huge", "search.run", f"{S} --resource-wait 1e12 --address auto",
         ("--resource-wait 1e+12 is not allowed", "seconds >= 0 and <= 604800")),
    Case("set-image-size-huge", "search.run", f"{S} --set image_size=1000000",
         ("field 'image_size' = 1000000 is out of range", "allowed: 8 to 8192")),
    Case("trial-batch-size-huge", "search.trial.cli", "--batch-size 100000000000",
         ("field 'batch_size' = 100000000000 is out of range", "allowed: 1 to 1048576")),
    # outputs are never renamed over something that is not a regular file (issue 30: --json /dev/full as root
    # replaced the device with a JSON file)
    Case("trial-json-device", "search.trial.cli", "--json /dev/null",
         ("--json '/dev/null' is a character device, not a regular file", "allowed: a new path or a regular file")),
    Case("trial-json-fifo", "search.trial.cli", "--json {fifo}", ("is a named pipe (FIFO), not a regular file",)),
    # search.trial's preflight, as search.run's (issue 30: this combination ended in a 75-line traceback)
    Case("trial-image-too-small", "search.trial.cli",
         "--backbone convnext_atto --depth none --dropout-placement none --image-size 8 --in-chans 1",
         ("field 'image_size' = 8: backbone 'convnext_atto' cannot run a 8x8 input", "use a larger image_size"),
         debug=True),
    Case("trial-data-dir-uri-missing", "search.trial.cli", "--data-dir file:///nonexistent/dbn-data",
         ("--data-dir 'file:///nonexistent/dbn-data' does not exist",)),
    Case("trial-corrupt-idx", "search.trial.cli",
         "--dataset fashion_mnist --image-size 16 --in-chans 1 --data-dir {idx_corrupt}",
         ("train-labels-idx1-ubyte: not a readable idx file of dataset 'fashion_mnist'",)),
    Case("trial-corrupt-idx-uri", "search.trial.cli",
         "--dataset fashion_mnist --image-size 16 --in-chans 1 --data-dir file://{idx_corrupt}",
         ("--data-dir 'file://", "(staged at ", "train-labels-idx1-ubyte: not a readable idx file of dataset "
          "'fashion_mnist'")),
    Case("report-out-not-regular", "analysis.report", "--space smoke --root {study} --out {out_fifo} --no-figures",
         ("--out", "report.md' is a named pipe (FIFO), not a regular file", "writing would replace it")),
    Case("tracking-db-not-regular", "search.run", f"{S} --tracking-uri sqlite:///{{fifo}}",
         ("--tracking-uri", "is a named pipe (FIFO), not a database file")),
    # a tracking store MLflow would not open, found before anything is written (issue 30: these were exit 3,
    # "the sweep failed while running", after the lock, logs and results/ were written)
    Case("tracking-not-a-database", "search.run", f"{S} --tracking-uri sqlite:///{{a_file}}",
         ("--tracking-uri", "is not an sqlite database", "allowed: a new path or an MLflow sqlite file"), debug=True),
    Case("tracking-foreign-sqlite", "search.run", f"{S} --tracking-uri sqlite:///{{foreign_db}}",
         ("--tracking-uri", "is an sqlite database but not an MLflow store (its tables: notes)",
          "allowed: a new path or an MLflow sqlite file")),
    Case("tracking-half-created", "search.run", f"{S} --tracking-uri sqlite:///{{half_db}}",
         ("--tracking-uri", "is an MLflow store cut short while being created",
          "if it holds no runs, delete it and run again")),
    Case("tracking-schema-newer", "search.run", f"{S} --tracking-uri sqlite:///{{newer_db}}",
         ("--tracking-uri", "schema revision 'ffffffffffff'", "does not know (a newer MLflow wrote it?)")),
    Case("tracking-schema-older", "search.run", f"{S} --tracking-uri sqlite:///{{older_db}}",
         ("--tracking-uri", "older schema", "then run `mlflow db upgrade sqlite:///")),
    Case("tracking-path-needs-quoting", "search.run", f"{S} --tracking-uri 'sqlite:///{{empty_dir}}/runs?v2.db'",
         ("--tracking-uri", "the path holds '?', which a database URL reads as a query",
          "allowed: sqlite:///PATH with no ?, # or % in PATH")),
    # where Ray keeps its files (a full or unwritable RAY_TMPDIR was exit 3, "rerun with --resume")
    Case("ray-tmpdir-unusable", "search.run", S,
         ("RAY_TMPDIR '/proc/nope'", "Ray keeps its session files there", "set RAY_TMPDIR to one"),
         env=(("RAY_TMPDIR", "/proc/nope"),)),
    Case("tracking-scheme-misspelled", "search.run", f"{S} --tracking-uri sqllite:///mlflow.db",
         ("--tracking-uri 'sqllite:///mlflow.db' is not a well-formed tracking URI",
          "did you mean 'sqlite:///mlflow.db'?", "allowed: sqlite:///PATH, http(s)://HOST:PORT")),
    # reading a store: nothing is created, and a store without the space's trials is said so (exit 2, not an
    # empty report with exit 0)
    Case("report-tracking-missing", "analysis.report",
         "--space smoke --root {empty_dir} --tracking-uri sqlite:///{empty_dir}/mlfow.db --no-figures",
         ("--tracking-uri", "no MLflow store at", "nothing is created when reading")),
    Case("report-tracking-unreachable", "analysis.report",
         "--space smoke --root {empty_dir} --tracking-uri http://127.0.0.1:1 --no-figures",
         ("--tracking-uri 'http://127.0.0.1:1' is not reachable",)),
    Case("report-tracking-not-a-database", "analysis.report",
         "--space smoke --root {empty_dir} --tracking-uri sqlite:///{a_file} --no-figures",
         ("--tracking-uri", "is not an sqlite database")),
    Case("report-tracking-no-experiment", "analysis.report",
         "--space uout_beta --root {empty_dir} --tracking-uri sqlite:///{renamed_db} --no-figures",
         ("space 'uout_beta'", "has no MLflow experiment of that name (experiments there: smoke, wrn_widths)",
          "nothing was rebuilt")),
    Case("report-tracking-empty-experiment", "analysis.report",
         "--space smoke --root {empty_dir} --tracking-uri sqlite:///{renamed_db} --no-figures",
         ("space 'smoke'", "holds no trial runs", "nothing was rebuilt")),
    Case("report-tracking-no-finished-trial", "analysis.report",
         "--space smoke --root {empty_dir} --tracking-uri sqlite:///{unfinished_db} --no-figures",
         ("space 'smoke'", "holds no finished trial run", "RUNNING or KILLED", "nothing was rebuilt")),
    Case("report-parquet-empty", "analysis.report", "--space smoke --root {parquet_empty} --no-figures",
         ("space 'smoke'", "smoke/trials holds no trial rows", "nothing was written")),
]


# --------------------------------------------------------------------------- fixtures outside the cwd
def _parquet_root(root: Path, kind: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from search.schema import LAYERS_SCHEMA, TRIALS_SCHEMA

    for name in ("trials", "layers"):
        (root / "smoke" / name).mkdir(parents=True)
    part = root / "smoke" / "trials" / "part-0.parquet"
    if kind == "empty":  # a dataset of the right schema and no row (a sweep stopped before any trial finished)
        pq.write_table(TRIALS_SCHEMA.empty_table(), part)
    elif kind == "corrupt":
        part.write_bytes(b"PAR1" + b"\0" * 64)  # magic at the start, no footer
    elif kind == "foreign":
        pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), part)
    else:  # every column, test_acc as text
        fields = [pa.field(f.name, pa.string()) if f.name == "test_acc" else f for f in TRIALS_SCHEMA]
        pq.write_table(pa.schema(fields).empty_table(), part)
    pq.write_table(LAYERS_SCHEMA.empty_table(), root / "smoke" / "layers" / "part-0.parquet")
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("inputs")
    (base / "empty").mkdir()
    (base / "a_file").write_text("not a directory\n")
    return {
        "empty_dir": base / "empty",
        "a_file": base / "a_file",
        "cifar_corrupt": write_cifar10(base / "cifar", corrupt="data_batch_3").parent,
        "parquet_corrupt": _parquet_root(base / "pq_corrupt", "corrupt"),
        "parquet_foreign": _parquet_root(base / "pq_foreign", "foreign"),
        "parquet_wrong_type": _parquet_root(base / "pq_type", "type"),
        "parquet_empty": _parquet_root(base / "pq_empty", "empty"),
        "idx_corrupt": _idx_corrupt(base / "idx"),
        "smoke_store": _profile_store(base / "store"),
        "study": _study(base / "study"),
        "fifo": _fifo(base / "pipe"),
        **_stores(base / "stores"),
        "out_fifo": _fifo(base / "out" / "report.md").parent,
    }


def _study(root: Path) -> Path:
    """A results root holding a real 4-trial smoke study (tests/data/legacy_smoke): one that reports."""
    import shutil

    shutil.copytree(ROOT / "tests" / "data" / "legacy_smoke" / "results", root)
    return root


def _stores(folder: Path) -> dict[str, Path]:
    """sqlite files MLflow would not open, or that hold no trials of space smoke (copies of the legacy store)."""
    import shutil
    import sqlite3

    from mlflow.tracking import MlflowClient

    from search.sweep.mlflow_store import mlflow_revisions

    folder.mkdir()
    legacy = ROOT / "tests" / "data" / "legacy_smoke" / "mlflow.db"
    out = {k: folder / f"{k}.db"
           for k in ("foreign_db", "newer_db", "older_db", "renamed_db", "half_db", "unfinished_db")}
    con = sqlite3.connect(out["foreign_db"])
    con.execute("CREATE TABLE notes (x)")
    con.commit()
    con.close()
    known, head, _version = mlflow_revisions()
    older = "0a8213491aaa"  # a revision MLflow 3 knows, before the legacy store's (MLflow's head)
    assert older in known and older != head
    for key, rev in (("newer_db", "ffffffffffff"), ("older_db", older)):  # a revision no MLflow knows; an older one
        shutil.copy(legacy, out[key])
        con = sqlite3.connect(out[key])
        con.execute("UPDATE alembic_version SET version_num = ?", (rev,))
        con.commit()
        con.close()
    shutil.copy(legacy, out["half_db"])  # MLflow's tables, no schema revision: a store cut short while created
    con = sqlite3.connect(out["half_db"])
    con.execute("DROP TABLE alembic_version")
    con.commit()
    con.close()
    shutil.copy(legacy, out["renamed_db"])  # smoke's trials now under wrn_widths; smoke an empty experiment
    client = MlflowClient(tracking_uri=f"sqlite:///{out['renamed_db']}")
    client.rename_experiment(client.get_experiment_by_name("smoke").experiment_id, "wrn_widths")
    client.create_experiment("smoke")
    shutil.copy(legacy, out["unfinished_db"])  # smoke's trial runs all KILLED: none the rebuild would take
    client = MlflowClient(tracking_uri=f"sqlite:///{out['unfinished_db']}")
    exp = client.get_experiment_by_name("smoke").experiment_id
    runs = client.search_runs([exp], filter_string="tags.config_hash LIKE '%'")
    assert runs
    for run in runs:
        client.set_terminated(run.info.run_id, "KILLED")
    return out


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _profile_store(root: Path) -> Path:
    """A results root whose space smoke holds one trial, of profile quick (other columns left null)."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from search.schema import LAYERS_SCHEMA, TRIALS_SCHEMA

    known = dict(run_id="r0", config_hash="h0", space="smoke", profile="quick", status="ok",
                 finished_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    for name in ("trials", "layers"):
        (root / "smoke" / name).mkdir(parents=True)
    pq.write_table(pa.table({f.name: pa.array([known.get(f.name)], f.type) for f in TRIALS_SCHEMA},
                            schema=TRIALS_SCHEMA), root / "smoke" / "trials" / "part-0.parquet")
    pq.write_table(LAYERS_SCHEMA.empty_table(), root / "smoke" / "layers" / "part-0.parquet")
    return root


def _idx_corrupt(folder: Path) -> Path:
    """Fashion-MNIST's four idx files with an images file where the training labels belong."""
    write_idx(folder, gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes((folder / "t10k-images-idx3-ubyte").read_bytes())
    return folder


def _tree(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


class LateCheck(AssertionError):
    pass


def _late(*_a: object, **_k: object) -> None:
    raise LateCheck("not refused up front: the input got past validation to the sweep driver / run_trial")


def _run(cwd: Path, module: str, argv: list[str], monkeypatch: pytest.MonkeyPatch,
         capsys: pytest.CaptureFixture[str], env: tuple[tuple[str, str], ...] = ()) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `module`.main(argv) run in `cwd`."""
    import search.sweep.driver
    import search.trial.runner

    for k in [k for k in os.environ if k.startswith("DBN_")]:
        monkeypatch.delenv(k)
    for k, v in env:
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(search.sweep.driver, "drive", _late)
    monkeypatch.setattr(search.trial.runner, "run_trial", _late)
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    try:
        rc = importlib.import_module(module).main(argv)
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def _argv(case: Case, inputs: dict[str, Path]) -> list[str]:
    return shlex.split(case.args.format(**{k: str(v) for k, v in inputs.items()}))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(case: Case, inputs: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    watched = {k: _tree(v) if v.is_dir() else v.stat().st_mtime_ns for k, v in inputs.items()}
    rc, out, err = _run(cwd, case.module, _argv(case, inputs), monkeypatch, capsys, case.env)
    assert rc == 2, (rc, out[-1500:], err[-1500:])
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err[-2000:]}"
    prefix = "analysis.report: error: " if case.module == "analysis.report" else "error: "
    assert lines[0].startswith(prefix), lines[0]
    for s in case.expect:
        assert s in lines[0], f"{s!r} not in {lines[0]!r}"
    assert "Traceback" not in err
    assert list(cwd.iterdir()) == [], "something was written into the working directory"
    assert {k: _tree(v) if v.is_dir() else v.stat().st_mtime_ns for k, v in inputs.items()} == watched


DEBUG_CASES = [c for c in CASES if c.debug]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", DEBUG_CASES, ids=[c.id for c in DEBUG_CASES])
def test_debug_flag_shows_the_traceback(case: Case, inputs: dict[str, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With --debug the error propagates (the interpreter prints its traceback) instead of one line."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    with pytest.raises(Exception) as info:  # noqa: PT011 - any error type, as long as it is the one described
        _run(cwd, case.module, _argv(case, inputs) + ["--debug"], monkeypatch, capsys, case.env)
    assert not isinstance(info.value, LateCheck)
    assert case.expect[0] in str(info.value), str(info.value)


def _doc_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        if line.startswith("|") and not set(line) <= set("|- :"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:]  # drop the header


def test_every_documented_error_is_tested() -> None:
    """Each row of docs/errors.md names its test: a CASES id here, a pattern of tests/test_run_cli.py, or
    test_FILE.py::test_name for what only a real cluster shows."""
    rows = _doc_rows()
    assert rows, f"no table in {DOC}"
    ids = {c.id for c in CASES}
    run_cli = (ROOT / "tests" / "test_run_cli.py").read_text()
    documented = set()
    for row in rows:
        test = row[-1]
        m = re.fullmatch(r"`test_errors\.py\[([\w-]+)\]`", test)
        if m:
            assert m.group(1) in ids, f"docs/errors.md cites an unknown case {m.group(1)!r}"
            documented.add(m.group(1))
            continue
        m = re.fullmatch(r"`(test_\w+\.py)::(\w+)`", test)  # an error only a real cluster shows (test_cluster)
        if m:
            assert f"def {m.group(2)}(" in (ROOT / "tests" / m.group(1)).read_text(), f"{test} does not exist"
            continue
        m = re.fullmatch(r"`test_run_cli\.py` \(`(.+)`\)", test)
        assert m, (f"row {row[0]!r}: the test column must cite test_errors.py[id], test_run_cli.py (`args`) or "
                   "test_FILE.py::test_name")
        assert m.group(1) in run_cli, f"{m.group(1)!r} is not in tests/test_run_cli.py"
    assert ids <= documented, f"cases missing from docs/errors.md: {sorted(ids - documented)}"


# --------------------------------------------------------------------------- exit codes of a sweep that ran
# 2 means bad input found before anything ran; what goes wrong later has its own code (search/sweep/cli.py).
_ONE = ["--space", "smoke", "--set", "dropout_placement=none", "--set", "dropout_type=bernoulli", "--set",
        "dropout_rate=0", "--set", "epochs=1", "--set", "train_samples=64", "--num-cpus", "2", "--quiet"]


def _driver_lines(log: str) -> list[str]:
    # Tune's and MLflow's loggers may print what they caught; the driver's own lines start with "error: ".
    return [ln for ln in log.splitlines() if ln.startswith("error: ")]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_where_every_trial_failed_exits_1(tmp_path: Path) -> None:
    from _sweeps import _dataset, _env, _runs, _sweep

    rc, log = _sweep(tmp_path, _ONE + ["--retries", "0"],
                     env=_env(DBN_FAULTS="raise:dropout_placement=none", DBN_SWEEP_REPORT="off"))
    assert rc == 1, (rc, log[-3000:])
    lines = _driver_lines(log)
    assert len(lines) == 1 and lines[0].startswith("error: every trial of this sweep failed (1 failed; first: ")
    assert "injected fault" in lines[0], lines[0]
    runs = [r for r in _runs(tmp_path) if "config_hash" in r.data.tags]
    assert [r.info.status for r in runs] == ["FAILED"]  # recorded, not lost
    assert _dataset(tmp_path / "results", "trials").column("status").to_pylist() == ["failed"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failed_write_during_the_sweep_stops_it_with_exit_3_and_a_log(tmp_path: Path) -> None:
    """A results folder that cannot be written (here: a file where the trials folder belongs) is not bad
    input: the sweep stops at the first failed write, exit 3, one line naming the log with the traceback."""
    from _sweeps import KILL_ARGS, N_KILL_TRIALS, _env, _runs, _sweep

    (tmp_path / "results" / "smoke").mkdir(parents=True)
    (tmp_path / "results" / "smoke" / "trials").write_text("not a folder\n")
    rc, log = _sweep(tmp_path, KILL_ARGS, env=_env(DBN_SWEEP_REPORT="off"))
    assert rc == 3, (rc, log[-3000:])
    lines = _driver_lines(log)
    assert len(lines) == 1, log[-3000:]
    m = re.search(r"full traceback in (\S+);", lines[0])
    assert m and "the sweep failed while running" in lines[0] and "--resume" in lines[0], lines[0]
    assert "Traceback (most recent call last)" in Path(m.group(1)).read_text()
    trials = [r for r in _runs(tmp_path) if "config_hash" in r.data.tags]
    assert len(trials) < N_KILL_TRIALS, "the sweep went on training after the first failed write"
