"""Files shipped inside the package: the miniature Qwen3 target (``tiny-target/``).

``tiny-target`` is built by ``scripts/make_tiny_target.py`` (corpus, tokenizer and weights all
made in this repo); its ``d2sd_tiny_target.json`` records how and the held-out accuracy.
"""
from __future__ import annotations

import os

_HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_target_path() -> str:
    """Path of the shipped tiny Qwen3 target (HF dir: config, safetensors, tokenizer + chat template)."""
    path = os.path.join(_HERE, "tiny-target")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"the tiny target is missing at {path}; rebuild it with "
                                "`python scripts/make_tiny_target.py`")
    return path
