"""Fault injection from outside the product: on PYTHONPATH, this runs at the start of every Python
process of a test's sweep (driver and Ray workers inherit the environment) and, only when
DBN_FAULTS or DBN_GATHER is set, wraps `search.trial.runner.run_trial` as that module loads,
with tests/_faults.py's rules. No product module knows about it.
"""
import os
import sys

if os.environ.get("DBN_FAULTS") or os.environ.get("DBN_GATHER"):
    import importlib.abc
    import importlib.machinery

    _TARGET = "search.trial.runner"

    class _WrapOnLoad(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
            if name != _TARGET:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            run = spec.loader.exec_module

            def exec_module(module):  # noqa: ANN001, ANN202
                run(module)
                import _faults  # tests/ is on PYTHONPATH beside this folder

                _faults.wrap_run_trial(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _WrapOnLoad())
