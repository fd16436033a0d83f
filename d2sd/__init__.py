"""d2sd: a thin PyTorch trainer for DFlash / D2SD (variable-prefix) drafters on top of ``d2kernels``.

Submodules: ``config`` (DrafterConfig, TrainConfig, presets), ``models`` (build_drafter,
load_drafter, D2SDDrafterModel), ``target``, ``data`` (+ ``regenerate``), ``train`` (+ ``runconfig``,
``trackers``), ``eval``, ``export``. Imported lazily so that
``import d2sd`` stays cheap.
"""
__version__ = "0.1.0"
