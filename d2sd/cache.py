"""DeepSpec target cache (format version 2): precomputed target features for offline training.

The layout matches DeepSpec's ``deepspec/data/target_cache_dataset.py`` (read from the public
deepseek-ai/DeepSpec repository), so caches written here train there and vice versa::

    out/manifest.json      version 2, num_samples, num_shards, target_layer_ids (ascending),
                           hidden_size, hidden_dtype ("bfloat16" | "float8_e4m3fn" | "float8_e5m2"),
                           token_dtype "int32", mask_dtype "uint8", index_record_size 56,
                           shards [{shard_id, file_name}], + provenance (target, sources, ...)
    out/samples.idx        one little-endian record per sample, struct "<QIIQQQQQ":
                           sample_id, shard_id, seq_len, then byte offsets in the shard of
                           input_ids, attention_mask, loss_mask, target_hidden_states,
                           target_last_hidden_states (sample ids dense, in order)
    out/shard-00000.bin    raw little-endian arrays, per sample back to back:
                           input_ids int32 [S] | attention_mask uint8 [S] | loss_mask uint8 [S] |
                           target_hidden_states [S, L*H] | target_last_hidden_states [S, H]

``target_hidden_states`` are the ``target_layer_ids`` features of :func:`d2sd.target.target_hidden_states`;
``target_last_hidden_states`` is the backbone's final (normed) hidden state. A new shard starts
when the next sample would push a non-empty shard past ``shard_size`` bytes. The manifest is
written last (atomically), so a cache without one is incomplete.

    python -m d2sd.cache --out runs/cache                      # tiny target, regenerated built-in prompts
    python -m d2sd.cache --target Qwen3-4B/ --data chat.jsonl --out cache/ --layer-ids 1 9 17 25 33
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import warnings
from typing import Sequence

import torch

from .assets import tiny_target_path
from .config import default_target_layer_ids, get_preset
from .data import builtin_prompts, collate, has_anchor_run, load_chat_data, regenerate_with_target, tokenize_chat
from .models.families import text_config
from .target import LayerCapture, find_backbone, load_target, num_target_layers

CACHE_VERSION = 2
INDEX_RECORD = struct.Struct("<QIIQQQQQ")
INDEX_RECORD_SIZE = INDEX_RECORD.size  # 56
TOKEN_DTYPE = "int32"
MASK_DTYPE = "uint8"
HIDDEN_DTYPES = {"bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
REQUIRED_FIELDS = ("version", "num_samples", "num_shards", "target_layer_ids", "hidden_dtype", "token_dtype",
                   "mask_dtype", "index_record_size", "hidden_size", "shards")


def shard_file_name(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.bin"


def _atomic_json(payload: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reader

class TargetCache(torch.utils.data.Dataset):
    """Read a DeepSpec v2 target cache. ``cache[i]`` ->

    ``input_ids`` long [S], ``loss_mask`` long [S], ``target_hidden`` [S, L*H] and
    ``target_last_hidden`` [S, H] (bfloat16; float8 caches are upcast to bfloat16).
    Shards are memory-mapped lazily (at most ``max_open_shards`` at once); picklable for
    DataLoader workers.
    """

    def __init__(self, path, max_open_shards: int = 4):
        self.path = os.path.abspath(os.fspath(path))
        self.manifest = self._load_manifest()
        self.num_samples = int(self.manifest["num_samples"])
        self.hidden_size = int(self.manifest["hidden_size"])
        self.target_layer_ids = [int(i) for i in self.manifest["target_layer_ids"]]
        self.hidden_dtype = HIDDEN_DTYPES[self.manifest["hidden_dtype"]]
        self.max_open_shards = max_open_shards
        self._shard_files = {int(s["shard_id"]): os.path.join(self.path, s["file_name"])
                             for s in self.manifest["shards"]}
        self._index = None
        self._shards: dict[int, mmap.mmap] = {}

    def _load_manifest(self) -> dict:
        mpath = os.path.join(self.path, "manifest.json")
        if not os.path.isfile(mpath):
            raise FileNotFoundError(f"not a target cache (no manifest.json): {self.path}")
        with open(mpath, encoding="utf-8") as f:
            m = json.load(f)
        missing = [k for k in REQUIRED_FIELDS if k not in m]
        if missing:
            raise ValueError(f"{mpath}: manifest is missing fields {missing}")
        if int(m["version"]) != CACHE_VERSION:
            raise ValueError(f"{mpath}: cache version {m['version']}, this reader supports {CACHE_VERSION}")
        if m["hidden_dtype"] not in HIDDEN_DTYPES:
            raise ValueError(f"{mpath}: unsupported hidden_dtype {m['hidden_dtype']!r}")
        if m["token_dtype"] != TOKEN_DTYPE or m["mask_dtype"] != MASK_DTYPE:
            raise ValueError(f"{mpath}: expected token/mask dtypes int32/uint8, "
                             f"got {m['token_dtype']}/{m['mask_dtype']}")
        if int(m["index_record_size"]) != INDEX_RECORD_SIZE:
            raise ValueError(f"{mpath}: index_record_size {m['index_record_size']} != {INDEX_RECORD_SIZE}")
        if int(m["num_shards"]) != len(m["shards"]):
            raise ValueError(f"{mpath}: num_shards {m['num_shards']} but {len(m['shards'])} shard entries")
        for want, shard in enumerate(m["shards"]):
            if int(shard["shard_id"]) != want:
                raise ValueError(f"{mpath}: shard ids must be 0..n-1 in order, got {shard['shard_id']} at {want}")
            if not os.path.isfile(os.path.join(self.path, shard["file_name"])):
                raise FileNotFoundError(f"missing cache shard {os.path.join(self.path, shard['file_name'])}")
        ids = [int(i) for i in m["target_layer_ids"]]
        if not ids or ids != sorted(ids):
            raise ValueError(f"{mpath}: target_layer_ids must be non-empty and ascending, got {ids}")
        ipath = os.path.join(self.path, "samples.idx")
        if not os.path.isfile(ipath):
            raise FileNotFoundError(f"missing cache index {ipath}")
        if os.path.getsize(ipath) != int(m["num_samples"]) * INDEX_RECORD_SIZE:
            raise ValueError(f"{ipath}: {os.path.getsize(ipath)} bytes, expected "
                             f"{m['num_samples']} x {INDEX_RECORD_SIZE}")
        return m

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_index"] = None
        state["_shards"] = {}
        return state

    def close(self) -> None:
        for mm in self._shards.values():
            mm.close()
        self._shards.clear()
        self._index = None

    def _shard(self, shard_id: int) -> mmap.mmap:
        if shard_id in self._shards:
            self._shards[shard_id] = self._shards.pop(shard_id)  # most recently used goes last
            return self._shards[shard_id]
        with open(self._shard_files[shard_id], "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(f.name) else b""
        self._shards[shard_id] = mm
        while len(self._shards) > self.max_open_shards:
            # Dropped, not closed: a zero-copy view (``features_view``) may still point into it; the
            # map closes when the last view is gone.
            self._shards.pop(next(iter(self._shards)))
        return mm

    def record(self, i: int) -> dict:
        if self._index is None:
            with open(os.path.join(self.path, "samples.idx"), "rb") as f:
                self._index = f.read()
        try:
            fields = INDEX_RECORD.unpack_from(self._index, i * INDEX_RECORD_SIZE)
        except struct.error:
            raise ValueError(f"{self.path}/samples.idx: no record {i} (the index is truncated)") from None
        rec = dict(zip(("sample_id", "shard_id", "seq_len", "input_ids_offset", "attention_mask_offset",
                        "loss_mask_offset", "target_hidden_states_offset", "target_last_hidden_states_offset"),
                       fields))
        if rec["sample_id"] != i:
            raise ValueError(f"{self.path}/samples.idx: record {i} has sample_id {rec['sample_id']}")
        return rec

    @staticmethod
    def _read(buf, offset: int, dtype: torch.dtype, shape: tuple, copy: bool = True) -> torch.Tensor:
        count = 1
        for s in shape:
            count *= s
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if offset + nbytes > len(buf):
            raise ValueError(f"cache array at byte {offset} (+{nbytes}) runs past the shard end ({len(buf)})")
        with warnings.catch_warnings():
            # the mmap is read-only; the clone below makes the tensor own writable memory
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)
        return (t.clone() if copy else t).view(shape)

    def training_sample(self, i: int, max_length: int) -> dict:
        """``input_ids``, ``loss_mask`` (long, first ``max_length`` tokens) and ``target_hidden``
        ``[S, L*H]`` as a zero-copy read-only view of the memory-mapped shard (in the cache's dtype):
        the collate that pads the batch is then the only copy of the features."""
        rec = self.record(i)
        S = rec["seq_len"]
        buf = self._shard(rec["shard_id"])
        LH = len(self.target_layer_ids) * self.hidden_size
        n = min(S, max_length)
        hidden = self._read(buf, rec["target_hidden_states_offset"], self.hidden_dtype, (S, LH), copy=False)
        return {  # .long() copies the token arrays out of the map
            "input_ids": self._read(buf, rec["input_ids_offset"], torch.int32, (S,), copy=False)[:n].long(),
            "loss_mask": self._read(buf, rec["loss_mask_offset"], torch.uint8, (S,), copy=False)[:n].long(),
            "target_hidden": hidden[:n],
        }

    def seq_len(self, i: int) -> int:
        return int(self.record(i)["seq_len"])

    def validate(self, vocab_size: int | None = None, max_length: int | None = None, anchor_run: int = 2) -> int:
        """Check the whole index and every sample's token arrays up front; returns how many samples have
        ``anchor_run`` consecutive supervised tokens within ``max_length``.

        Raises ValueError naming the sample on a bad index record, an array past its shard's end
        (a truncated shard) or a token id outside ``[0, vocab_size)``. Reads the index, the token
        ids and the loss masks, not the hidden states (their bounds come from the file sizes).
        """
        sizes = {k: os.path.getsize(f) for k, f in self._shard_files.items()}
        LH = len(self.target_layer_ids) * self.hidden_size
        item = torch.empty((), dtype=self.hidden_dtype).element_size()
        learnable = 0
        for i in range(self.num_samples):
            where = f"{self.path}: sample {i}"
            rec = self.record(i)
            S, shard = rec["seq_len"], rec["shard_id"]
            if shard not in sizes:
                raise ValueError(f"{where}: index names shard {shard}, the manifest has {len(sizes)} shard(s)")
            if S < 1:
                raise ValueError(f"{where}: index gives length {S}")
            for name, nbytes in (("input_ids", 4 * S), ("attention_mask", S), ("loss_mask", S),
                                 ("target_hidden_states", item * S * LH),
                                 ("target_last_hidden_states", item * S * self.hidden_size)):
                end = rec[f"{name}_offset"] + nbytes
                if end > sizes[shard]:
                    raise ValueError(f"{where}: {name} ends at byte {end}, past the end of "
                                     f"{shard_file_name(shard)} ({sizes[shard]} bytes): truncated shard or bad index")
            buf = self._shard(shard)
            ids = self._read(buf, rec["input_ids_offset"], torch.int32, (S,))
            if vocab_size is not None and ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab_size):
                bad = ids[(ids < 0) | (ids >= vocab_size)]
                raise ValueError(f"{where}: token id(s) {bad[:4].tolist()} outside the target's vocabulary "
                                 f"[0, {vocab_size})")
            mask = self._read(buf, rec["loss_mask_offset"], torch.uint8, (S,))[:max_length]
            learnable += has_anchor_run(mask, anchor_run)
        return learnable

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"cache index {i} out of range [0, {self.num_samples})")
        rec = self.record(i)
        S = rec["seq_len"]
        buf = self._shard(rec["shard_id"])
        LH = len(self.target_layer_ids) * self.hidden_size
        hidden = self._read(buf, rec["target_hidden_states_offset"], self.hidden_dtype, (S, LH))
        last = self._read(buf, rec["target_last_hidden_states_offset"], self.hidden_dtype, (S, self.hidden_size))
        return {
            "input_ids": self._read(buf, rec["input_ids_offset"], torch.int32, (S,)).long(),
            "loss_mask": self._read(buf, rec["loss_mask_offset"], torch.uint8, (S,)).long(),
            "target_hidden": hidden.to(torch.bfloat16),
            "target_last_hidden": last.to(torch.bfloat16),
        }


# ----------------------------------------------------------------------------- writer

class _ShardWriter:
    """Appends samples to ``shard-NNNNN.bin`` files and their records to ``samples.idx``."""

    def __init__(self, out: str, shard_size: int):
        self.out = out
        self.shard_size = int(shard_size)
        self.index = open(os.path.join(out, "samples.idx"), "wb")
        self.shard_id = -1
        self.handle = None
        self.size = 0
        self.num_samples = 0

    def _next_shard(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.shard_id += 1
        self.handle = open(os.path.join(self.out, shard_file_name(self.shard_id)), "wb")
        self.size = 0

    def write(self, parts: Sequence[bytes], seq_len: int) -> None:
        total = sum(len(p) for p in parts)
        if self.handle is None or (self.size > 0 and self.size + total > self.shard_size):
            self._next_shard()
        offsets = []
        for p in parts:
            offsets.append(self.size)
            self.handle.write(p)
            self.size += len(p)
        self.index.write(INDEX_RECORD.pack(self.num_samples, self.shard_id, seq_len, *offsets))
        self.num_samples += 1

    def close(self) -> None:
        for h in (self.handle, self.index):
            if h is not None:
                h.flush()
                os.fsync(h.fileno())
                h.close()
        self.handle = self.index = None


def _to_bytes(t: torch.Tensor, dtype: torch.dtype) -> bytes:
    t = t.detach().to(device="cpu", dtype=dtype).contiguous()
    return t.view(torch.uint8).numpy().tobytes()


@torch.no_grad()
def write_cache(out, target, tokenizer, samples: Sequence[dict], layer_ids: Sequence[int],
                shard_size: int = 64 * 1024 ** 3, *, batch_size: int = 8, hidden_dtype: str = "bfloat16",
                min_loss_tokens: int = 1, extra: dict | None = None, progress: bool = True) -> dict:
    """Run ``target`` over tokenized ``samples`` (``input_ids``/``loss_mask`` [S]) into a cache at ``out``.

    ``layer_ids`` must be ascending (the format requires it). Samples with fewer than
    ``min_loss_tokens`` supervised tokens are left out (DeepSpec drops them too). ``out`` must
    not exist or be empty. ``extra`` adds provenance fields to the manifest. Returns the manifest.
    """
    from tqdm.auto import tqdm

    out = os.path.abspath(os.fspath(out))
    if hidden_dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden_dtype must be one of {sorted(HIDDEN_DTYPES)}, got {hidden_dtype!r}")
    layer_ids = [int(i) for i in layer_ids]
    if layer_ids != sorted(layer_ids) or len(set(layer_ids)) != len(layer_ids):
        raise ValueError(f"layer_ids must be strictly ascending for the cache format, got {layer_ids}")
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"cache output directory is not empty: {out}")
    os.makedirs(out, exist_ok=True)

    backbone = find_backbone(target)
    device = next(target.parameters()).device
    keep = [s for s in samples if int(torch.as_tensor(s["loss_mask"]).sum()) >= max(min_loss_tokens, 0)]
    writer = _ShardWriter(out, shard_size)
    hidden_size = None
    bar = tqdm(total=len(keep), desc="target cache", unit="sample", disable=not progress)
    try:
        for start in range(0, len(keep), batch_size):
            chunk = keep[start:start + batch_size]
            batch = collate(chunk, tokenizer.pad_token_id)
            ids = batch["input_ids"].to(device)
            attn = batch["attention_mask"].to(device)
            with LayerCapture(target, layer_ids) as cap:
                last = backbone(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
            feats = cap.features()  # [b, S, L*H]
            hidden_size = last.shape[-1]
            dt = HIDDEN_DTYPES[hidden_dtype]
            for r, s in enumerate(chunk):
                n = len(s["input_ids"])
                writer.write([
                    _to_bytes(batch["input_ids"][r, :n], torch.int32),
                    _to_bytes(batch["attention_mask"][r, :n], torch.uint8),
                    _to_bytes(batch["loss_mask"][r, :n], torch.uint8),
                    _to_bytes(feats[r, :n], dt),
                    _to_bytes(last[r, :n], dt),
                ], seq_len=n)
            bar.update(len(chunk))
    finally:
        bar.close()
        writer.close()
    if hidden_size is None:
        hidden_size = int(text_config(target).hidden_size)
    manifest = {
        "version": CACHE_VERSION,
        "num_samples": writer.num_samples,
        "num_shards": writer.shard_id + 1,
        "target_layer_ids": layer_ids,
        "hidden_dtype": hidden_dtype,
        "token_dtype": TOKEN_DTYPE,
        "mask_dtype": MASK_DTYPE,
        "index_record_size": INDEX_RECORD_SIZE,
        "hidden_size": int(hidden_size),
        "shards": [{"shard_id": i, "file_name": shard_file_name(i)} for i in range(writer.shard_id + 1)],
        "target_model_name_or_path": str(getattr(target.config, "_name_or_path", "")),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "min_loss_tokens": int(min_loss_tokens),
    }
    manifest.update(extra or {})
    _atomic_json(manifest, os.path.join(out, "manifest.json"))
    return manifest


# ----------------------------------------------------------------------------- CLI

def preset_layer_ids(preset: str, num_layers: int) -> list[int]:
    """The target layers a drafter of ``preset`` reads from a ``num_layers``-layer target, so that
    ``train --cache`` with the same preset finds them: the preset's own, else build_drafter's default."""
    drafter = get_preset(preset)["drafter"]
    ids = drafter.get("target_layer_ids")
    return list(ids) if ids else default_target_layer_ids(num_layers, drafter.get("num_draft_layers", 5))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m d2sd.cache",
                                description="Precompute target features into a DeepSpec v2 target cache.")
    p.add_argument("--target", default=None, help="HF target model dir (default: the shipped tiny target)")
    p.add_argument("--data", default=None,
                   help="chat JSONL file (default: built-in prompts answered by the target)")
    p.add_argument("--out", required=True, help="output cache directory (must not exist or be empty)")
    p.add_argument("--layer-ids", type=int, nargs="+", default=None,
                   help="target layers to store, ascending; -1 = embeddings (default: the --preset drafter's)")
    p.add_argument("--preset", default="tiny",
                   help="training preset whose target layers the cache holds when --layer-ids is not given "
                        "(its target_layer_ids, else the layers build_drafter would pick); default tiny")
    p.add_argument("--max-length", type=int, default=2048, help="truncate sequences to this many tokens")
    p.add_argument("--num-prompts", type=int, default=256, help="built-in prompts when --data is not given")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length when regenerating")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per target forward")
    p.add_argument("--shard-size", type=int, default=64 * 1024 ** 3, help="max bytes per shard file")
    p.add_argument("--hidden-dtype", default="bfloat16", choices=sorted(HIDDEN_DTYPES),
                   help="storage dtype of the hidden states")
    p.add_argument("--min-loss-tokens", type=int, default=1, help="drop samples with fewer supervised tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="target device")
    args = p.parse_args(argv)

    if args.target is None:
        args.target = tiny_target_path()
    model, tokenizer = load_target(args.target, device=args.device)
    layer_ids = args.layer_ids or preset_layer_ids(args.preset, num_target_layers(model))
    if args.data is not None:
        samples, stats = load_chat_data(args.data, tokenizer, max_length=args.max_length)
        sources = [os.path.abspath(args.data)]
    else:
        records = regenerate_with_target(model, tokenizer, builtin_prompts(args.num_prompts, args.seed),
                                         max_new_tokens=args.max_new_tokens)
        samples = [tokenize_chat(r, tokenizer, args.max_length) for r in records]
        stats = {"records": len(records), "samples": len(samples)}
        sources = [f"builtin:num_prompts={args.num_prompts},seed={args.seed}"]
    print(f"data: {json.dumps(stats)}")
    manifest = write_cache(args.out, model, tokenizer, samples, layer_ids, args.shard_size,
                           batch_size=args.batch_size, hidden_dtype=args.hidden_dtype,
                           min_loss_tokens=args.min_loss_tokens,
                           extra={"target_model_name_or_path": os.path.abspath(args.target),
                                  "source_jsonl_paths": sources, "max_length": args.max_length})
    print(f"wrote {manifest['num_samples']} samples in {manifest['num_shards']} shard(s), "
          f"layers {layer_ids}, hidden {manifest['hidden_size']} -> {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
