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


S = "--space smoke"
CASES = [
    # search.run: arguments
    Case("no-space", "search.run", "", ("--space is required", "--list")),
    Case("unknown-profile", "search.run", "--space wrn_widths --profile fast",
         ("--profile 'fast'", "space 'wrn_widths'", "allowed: quick, fashion, paper"), debug=True),
    Case("seeds-zero", "search.run", f"{S} --seeds 0", ("--seeds 0", ">= 1")),
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
    Case("trial-depth", "search.trial.runner", "--backbone cifar_wrn --depth 12",
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
    Case("report-unknown-profile", "analysis.report", "--space smoke --root {smoke_store} --profile fashion",
         ("--profile 'fashion'", "no trials of that profile in smoke", "profiles there: smoke: quick")),
]


# --------------------------------------------------------------------------- fixtures outside the cwd
def _parquet_root(root: Path, kind: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from search.schema import LAYERS_SCHEMA, TRIALS_SCHEMA

    for name in ("trials", "layers"):
        (root / "smoke" / name).mkdir(parents=True)
    part = root / "smoke" / "trials" / "part-0.parquet"
    if kind == "corrupt":
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
        "idx_corrupt": _idx_corrupt(base / "idx"),
        "smoke_store": _profile_store(base / "store"),
    }


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
         capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `module`.main(argv) run in `cwd`."""
    import search.sweep.driver
    import search.trial.runner

    for k in [k for k in os.environ if k.startswith("DBN_")]:
        monkeypatch.delenv(k)
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
    rc, out, err = _run(cwd, case.module, _argv(case, inputs), monkeypatch, capsys)
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
        _run(cwd, case.module, _argv(case, inputs) + ["--debug"], monkeypatch, capsys)
    assert not isinstance(info.value, LateCheck)
    assert case.expect[0] in str(info.value), str(info.value)


def _doc_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        if line.startswith("|") and not set(line) <= set("|- :"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:]  # drop the header


def test_every_documented_error_is_tested() -> None:
    """Each row of docs/errors.md names its test: a CASES id here, or a pattern of tests/test_run_cli.py."""
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
        m = re.fullmatch(r"`test_run_cli\.py` \(`(.+)`\)", test)
        assert m, f"row {row[0]!r}: the test column must cite test_errors.py[id] or test_run_cli.py (`args`)"
        assert m.group(1) in run_cli, f"{m.group(1)!r} is not in tests/test_run_cli.py"
    assert ids <= documented, f"cases missing from docs/errors.md: {sorted(ids - documented)}"
