"""Loads diagnose.py (beside this file) into `vramfit train`, a calibration aid outside the product.

With this folder first on PYTHONPATH and VRAMFIT_DIAGNOSE=PREFIX in the training processes'
environment (set both before `vramfit train`: the launcher's ranks inherit them),
the first transformers.Trainer built in the process gets diagnose.install(trainer, PREFIX).
vramfit.train runs as __main__ (python -m), so the hook is on transformers.trainer's import,
not on vramfit.train's. Does nothing without VRAMFIT_DIAGNOSE. Note: it shadows any other
sitecustomize on sys.path (the venv has none).
"""
import os
import sys

if os.environ.get("VRAMFIT_DIAGNOSE"):
    import importlib.abc
    import importlib.util

    def _patch(mod):
        Trainer = mod.Trainer
        orig = Trainer.__init__

        def __init__(self, *a, **k):
            orig(self, *a, **k)
            if not getattr(Trainer, "_vramfit_diagnosed", False):
                Trainer._vramfit_diagnosed = True
                sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
                import diagnose

                diagnose.install(self, os.environ["VRAMFIT_DIAGNOSE"])

        Trainer.__init__ = __init__

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "transformers.trainer":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                _patch(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _Finder())
