"""Convert drafter checkpoints between DeepSpec's format and the z-lab/SpecForge DFlash format.

The deepspec format is DeepSpec's own (``Qwen3DSparkModel`` / ``Gemma4DSparkModel``): folders its
``save_pretrained`` writes are read, and what we write loads with its ``from_pretrained``.

    python -m d2sd.export CKPT OUT --format dflash            # for z-lab / SpecForge / vLLM DFlash
    python -m d2sd.export CKPT OUT --format deepspec --target TARGET_DIR

The dflash format (``DFlashDraftModel``) has no embed_tokens / lm_head: reading one needs the target
(``--target``). It only holds same-position drafters (D2 / VP drafters, or DFlash trained with
``dflash_labels='same'``); a shifted-label DeepSpec drafter is refused with the reason. A VP
drafter exported to dflash is marked (``"d2sd_trained_as": "vp"``, ``"d2sd_untrained_slots": [1]``
in config.json) and a warning says so: slot 1 was always visible in training, never predicted.

The output is written to a temp folder and renamed into place: it never touches its input, and
an existing non-empty ``OUT`` is only replaced with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Optional, Sequence

from .checkpoint import output_path_problem
from .models import load_drafter
from .models.checkpoint import CONFIG_NAME, check_dflash_exportable, detect_format, read_json
from .target import load_causal_lm

__all__ = ["export_checkpoint", "main"]


def _check_paths(ckpt: str, out: str, overwrite: bool) -> None:
    src, dst = os.path.realpath(ckpt), os.path.realpath(out)
    if src == dst or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
        raise ValueError(f"output {out} and input {ckpt} overlap: pick an output folder outside the checkpoint")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"output {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"output folder {out} is not empty ({', '.join(sorted(os.listdir(out))[:4])}): "
                         "pick another, or pass --overwrite to replace it")
    problem = output_path_problem(os.path.dirname(os.path.abspath(out)))
    if problem:
        raise ValueError(f"output {out}: {problem}")


def export_checkpoint(ckpt: str, out: str, format: str, target=None, overwrite: bool = False) -> str:
    """Load ``ckpt`` (either format; ``target`` = a transformers model, needed for dflash input) and
    write it to ``out`` in ``format`` (atomically: a temp folder renamed into place). Returns the
    format of the input."""
    _check_paths(ckpt, out, overwrite)
    drafter = load_drafter(ckpt, target=target)  # raises on folders of neither format
    src_format = detect_format(read_json(os.path.join(ckpt, CONFIG_NAME)))
    if format == "dflash":
        check_dflash_exportable(drafter.config)
    out = os.path.abspath(out)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        drafter.save_pretrained(tmp, format=format)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(out):
        old = f"{tmp}-old"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return src_format


def _load_target(path: str):
    # Only embed_tokens / lm_head are read: keep the checkpoint's dtype, on CPU.
    return load_causal_lm(path, dtype="auto")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m d2sd.export",
        description="Convert a drafter checkpoint between the d2sd/DeepSpec and z-lab/SpecForge DFlash formats.",
    )
    p.add_argument("ckpt", help="input drafter folder (config.json + model.safetensors), either format")
    p.add_argument("out", help="output folder (created; must not overlap the input)")
    p.add_argument("--format", required=True, choices=("dflash", "deepspec"),
                   help="output format: 'dflash' = DFlashDraftModel without embed/lm_head (same-position "
                        "drafters only); 'deepspec' = DeepSpec's Qwen3DSparkModel/Gemma4DSparkModel checkpoint with every weight")
    p.add_argument("--target", default=None,
                   help="target model folder (HF); needed to read a dflash input, whose embed_tokens/lm_head "
                        "come from the target; when given, also checks that the drafter fits it")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    args = p.parse_args(argv)
    try:
        target = _load_target(args.target) if args.target else None
        src = export_checkpoint(args.ckpt, args.out, args.format, target=target, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        hint = " (here: --target TARGET_DIR)" if args.target is None and "pass the target" in str(e) else ""
        print(f"python -m d2sd.export: error: {e}{hint}", file=sys.stderr)
        return 2
    if args.format == "dflash":
        untrained = read_json(os.path.join(args.out, CONFIG_NAME)).get("d2sd_untrained_slots")
        if untrained:
            print(f"warning: {args.ckpt} is a D2 (VP) drafter: slot(s) {untrained} were never trained; a plain "
                  "DFlash reader will accept fewer tokens with it (config.json marks it: d2sd_trained_as='vp')",
                  file=sys.stderr)
    print(f"wrote {args.format} drafter to {args.out} (from {src} checkpoint {args.ckpt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
