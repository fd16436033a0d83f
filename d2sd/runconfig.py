"""Run config files of ``python -m d2sd.train``: ``--config run.yaml`` reads one, ``--print-config`` writes one.

A config file is a YAML (or JSON) mapping from option names to values: ``lr: 3.0e-4``,
``target_layer_ids: [1, 9, 17, 25, 33]``, ``d2: false``... Keys are the options' names with ``_``
or ``-`` (``dflash_labels``, ``dflash-labels``) or their destinations (``enable_d2_feature``). Each
value goes through the option's own parser, so a file accepts exactly what the command line does.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
from typing import Any, Iterable

__all__ = ["read_config", "dump_config", "DRAFTER_KNOBS"]


# Fields of DrafterConfig that are training knobs (build_drafter kwargs); the transformer dims
# come from the target. enable_d2_feature / dflash_labels / backend have their own options.
DRAFTER_KNOBS = {
    "num_draft_layers": "number of drafter decoder layers",
    "target_layer_ids": "target layers whose hidden states feed the drafter (-1 = embeddings)",
    "block_size": "draft block size B (anchor + B-1 slots)",
    "mask_token_id": "token id of [MASK] in the draft slots",
    "num_anchors": "anchors (blocks) sampled per sequence",
    "d2_prefix_weight_base": "D2 prefix-length law P(p) ~ base**p (base < 1 favours short prefixes)",
    "loss_decay_gamma": "loss weight decay exp(-offset/gamma) along the block (<= 0: none)",
}


def _options(parser: argparse.ArgumentParser, excluded: Iterable[str]) -> dict[str, argparse.Action]:
    """Every key a config file may use -> its parser action."""
    excluded = set(excluded)
    keys = {}
    for a in parser._actions:
        if not a.option_strings or a.dest in excluded or a.dest == "help":
            continue
        keys[a.dest] = a
        for flag in a.option_strings:
            if flag.startswith("--") and not flag.startswith("--no-"):
                keys[flag[2:]] = keys[flag[2:].replace("-", "_")] = a
    return keys


def _tokens(action: argparse.Action, key: str, value: Any) -> list[str]:
    flag = next(f for f in action.option_strings if f.startswith("--") and not f.startswith("--no-"))
    if isinstance(action, argparse.BooleanOptionalAction) or isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else "--no-" + flag[2:]]
        return [flag] if value else []
    if action.nargs == "+":
        values = value if isinstance(value, (list, tuple)) else [value]
        return [flag, *map(str, values)]
    return [flag, "none" if value is None else str(value)]


def read_config(path: str, parser: argparse.ArgumentParser, excluded: Iterable[str] = ()) -> dict[str, Any]:
    """Options of the config file at ``path`` (as the parser would give them); ``ValueError`` naming the
    file and key on an unknown key or a bad value."""
    try:
        text = open(path).read()
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror}") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except ImportError:
        raise ValueError(f"--config {path}: reading YAML needs pyyaml (pip install pyyaml), or write JSON") from None
    except Exception as e:  # the parser's own message says where
        raise ValueError(f"--config {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    keys = _options(parser, excluded)
    unknown = sorted(k for k in data if k not in keys)
    if unknown:
        raise ValueError(f"--config {path}: unknown option(s) {unknown}; known: {sorted({a.dest for a in keys.values()})}")
    opts: dict[str, Any] = {}
    for key, value in data.items():
        err = io.StringIO()
        try:
            tokens = _tokens(keys[key], key, value)
            with contextlib.redirect_stderr(err):
                opts.update(vars(parser.parse_args(tokens)))
        except ValueError as e:
            raise ValueError(f"--config {path}: {e}") from None
        except SystemExit:
            msg = err.getvalue().strip().splitlines()[-1:] or ["bad value"]
            raise ValueError(f"--config {path}: {key}: {value!r}: {msg[0].split('error: ')[-1]}") from None
    return opts


def dump_config(run) -> str:
    """The resolved options of ``run`` (a ``d2sd.train.Run``) as a ``--config`` file (YAML when pyyaml
    is installed, else JSON): preset, run options, every TrainConfig field, the drafter knobs set."""
    run_keys = ("preset", "target", "data", "cache", "out", "device", "backend", "fsdp", "report_to")
    conf: dict[str, Any] = {"preset": run.preset}
    conf.update({k: run.opts[k] for k in run_keys[1:] if k in run.opts})
    conf.update(dataclasses.asdict(run.train))
    conf.update(run.drafter_args)
    derived = [k for k in (*DRAFTER_KNOBS, "enable_d2_feature", "dflash_labels") if k not in conf]
    head = "# python -m d2sd.train --config FILE (options given on the command line override these)\n"
    if derived:
        head += f"# not set (the drafter default, or derived from the target): {', '.join(derived)}\n"
    try:
        import yaml

        return head + yaml.safe_dump(conf, sort_keys=False, default_flow_style=None)
    except ImportError:
        return json.dumps(conf, indent=2) + "\n"
