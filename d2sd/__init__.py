"""d2sd: a thin PyTorch trainer for DFlash / D2SD (variable-prefix) drafters on top of ``d2kernels``.

Submodules: ``config`` (DrafterConfig, TrainConfig, presets), ``models`` (build_drafter,
load_drafter), ``target``, ``data``, ``train``, ``eval``, ``export``. Imported lazily so that
``import d2sd`` stays cheap.
"""
__version__ = "0.1.0"
