"""Convert drafter checkpoints between DeepSpec's format and the z-lab/SpecForge DFlash format.

The deepspec format is DeepSpec's own (``Qwen3DSparkModel`` / ``Gemma4DSparkModel``): folders its
``save_pretrained`` writes are read, and what we write loads with its ``from_pretrained``.

    python -m d2sd.export CKPT OUT --format dflash            # for z-lab / SpecForge / vLLM DFlash
    python -m d2sd.export CKPT OUT --format deepspec --target TARGET_DIR

The dflash format (``DFlashDraftModel``) has no embed_tokens / lm_head: reading one needs the target
(``--target``). It only holds same-position drafters (D2 / VP drafters, or DFlash trained with
``dflash_labels='same'``); a shifted-label DeepSpec drafter is refused with the reason.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

__all__ = ["export_checkpoint", "main"]


def export_checkpoint(ckpt: str, out: str, format: str, target=None) -> str:
    """Load ``ckpt`` (either format; ``target`` = a transformers model, needed for dflash input) and
    write it to ``out`` in ``format``. Returns the format of the input."""
    from .models import load_drafter
    from .models.base import CONFIG_NAME, read_json
    from .models.checkpoint import check_dflash_exportable, detect_format

    drafter = load_drafter(ckpt, target=target)  # raises on folders of neither format
    src_format = detect_format(read_json(os.path.join(ckpt, CONFIG_NAME)))
    if format == "dflash":
        check_dflash_exportable(drafter.config)
    drafter.save_pretrained(out, format=format)
    return src_format


def _load_target(path: str):
    from transformers import AutoModelForCausalLM

    # Only embed_tokens / lm_head are read: keep the checkpoint's dtype, on CPU.
    return AutoModelForCausalLM.from_pretrained(path, dtype="auto")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m d2sd.export",
        description="Convert a drafter checkpoint between the d2sd/DeepSpec and z-lab/SpecForge DFlash formats.",
    )
    p.add_argument("ckpt", help="input drafter folder (config.json + model.safetensors), either format")
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--format", required=True, choices=("dflash", "deepspec"),
                   help="output format: 'dflash' = DFlashDraftModel without embed/lm_head (same-position "
                        "drafters only); 'deepspec' = DeepSpec's Qwen3DSparkModel/Gemma4DSparkModel checkpoint with every weight")
    p.add_argument("--target", default=None,
                   help="target model folder (HF); needed to read a dflash input, whose embed_tokens/lm_head "
                        "come from the target; when given, also checks that the drafter fits it")
    args = p.parse_args(argv)
    target = _load_target(args.target) if args.target else None
    try:
        src = export_checkpoint(args.ckpt, args.out, args.format, target=target)
    except (ValueError, FileNotFoundError) as e:
        hint = " (here: --target TARGET_DIR)" if target is None and "pass the target" in str(e) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} drafter to {args.out} (from {src} checkpoint {args.ckpt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
