"""d2sd: a thin PyTorch trainer for DFlash / D2SD (variable-prefix) drafters on top of ``d2kernels``.

Submodules: ``config`` (DrafterConfig, TrainConfig, presets), ``models`` (build_drafter,
load_drafter, D2SDDrafterModel), ``target``, ``data`` (+ ``regenerate``), ``train`` (+ ``runconfig``,
``trackers``), ``eval``, ``export``. Imported lazily so that
``import d2sd`` stays cheap.
"""
import importlib.util

if importlib.util.find_spec("transformers") is None:  # a kernels-only install: say what is missing
    raise ImportError("d2sd (the trainer) needs its extra dependencies: pip install 'd2sd[train]' "
                      "(or -e '.[train]' from a checkout); d2kernels alone needs only torch and triton")

__version__ = "0.1.0"
