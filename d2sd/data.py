"""Chat data -> ``input_ids [S]`` / ``loss_mask [S]`` samples, batching, and a resumable sampler.

    python -m d2sd.data regenerate --data prompts.jsonl --out regen.jsonl --server URL   # or --target DIR
    python -m d2sd.data tokenize --data regen.jsonl --target DIR --out tokenized/ --num-proc 16

A record is ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``;
DeepSpec's regenerated records (``"conversations"``, extra keys ignored), ShareGPT turns
(``{"from": "human"|"gpt", "value": ...}``) and OpenAI content-part lists are accepted too.
``loss_mask`` is 1 exactly on the tokens of assistant turns as the chat template renders them:
the content and the end-of-turn token, not the template's trailing newline. Real pipelines
regenerate the assistant turns with the target (:func:`regenerate_with_target`), so the drafter
learns the target's own distribution.

    samples, stats = load_chat_jsonl("train.jsonl", tokenizer, max_length=2048)
    batch = collate(samples[:4], tokenizer.pad_token_id)     # input_ids / loss_mask / attention_mask [4, S]
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import torch

from .assets import tiny_target_path
from .chat import chat_messages
from .corpus import make_problems
from .regenerate import ServerGenerator, TargetGenerator, regenerate_file
from .target import generate, load_target, resolve_model

# ----------------------------------------------------------------------------- built-in corpus

def builtin_prompts(n: int = 64, seed: int = 0) -> list[str]:
    """``n`` user prompts from the arithmetic corpus (``d2sd.corpus``), deterministic in ``seed``.

    The tiny target was trained on seed 1 and evaluated on seed 2; seed 0 (default) is a third draw.
    """
    return [prompt for prompt, _ in make_problems(n, seed=seed)]


def builtin_records(n: int = 64, seed: int = 0) -> list[dict]:
    """Chat records with the corpus' reference answers (no target needed)."""
    return [_chat_record(p, a) for p, a in make_problems(n, seed=seed)]


def _chat_record(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def regenerate_with_target(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
                           batch_size: int = 32) -> list[dict]:
    """Chat records whose assistant turn is the target's greedy answer to each prompt."""
    answers = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [_chat_record(p, a) for p, a in zip(prompts, answers)]


generate_responses = regenerate_with_target


def default_corpus(n: int = 256, seed: int = 0, target=None, tokenizer=None, max_new_tokens: int = 64,
                   regenerate: bool = True) -> list[dict]:
    """The built-in training records: ``n`` corpus prompts answered by the target.

    ``target``/``tokenizer`` default to the shipped tiny target; ``regenerate=False`` keeps the
    corpus' reference answers instead (no model run).
    """
    if not regenerate:
        return builtin_records(n, seed)
    if target is None:
        target, loaded_tok = load_target(tiny_target_path())
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
        raise ValueError("pass the target's tokenizer with target=")
    return regenerate_with_target(target, tokenizer, builtin_prompts(n, seed), max_new_tokens)


# ----------------------------------------------------------------------------- tokenization

def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_char_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character span of every assistant turn in it.

    Span of turn i = render(turns[:i+1]) minus render(turns[:i], generation prompt), both being
    prefixes of the full text; trailing whitespace (the template's newline) is left out.
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[:i + 1], add_generation_prompt=False)
        if not (upto.startswith(head) and full.startswith(upto)):
            raise ValueError("chat template does not render turns as prefixes; cannot locate assistant tokens")
        end = len(upto.rstrip())
        if end > len(head):
            spans.append((len(head), end))
    return full, spans


def _tokenize(record: dict, tokenizer, max_length: int | None) -> tuple[dict, bool, bool]:
    """``(sample, truncated, supervised before the cut)``."""
    messages = chat_messages(record)
    text, spans = _assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    # a token is supervised when its first character lies in an assistant span
    mask = [int(any(s <= a < e for s, e in spans) and b > a) for a, b in enc["offset_mapping"]]
    had_assistant = any(mask)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    sample = {"input_ids": torch.tensor(ids, dtype=torch.long), "loss_mask": torch.tensor(mask, dtype=torch.long)}
    return sample, truncated, had_assistant


def tokenize_chat(record: dict, tokenizer, max_length: int | None = None) -> dict:
    """One chat record -> ``{"input_ids": long [S], "loss_mask": long [S]}`` via the chat template.

    ``loss_mask`` is 1 on assistant tokens (content + end-of-turn token). Sequences longer than
    ``max_length`` are cut to ``max_length``. Needs a fast tokenizer (offset mapping).
    """
    return _tokenize(record, tokenizer, max_length)[0]


def load_chat_jsonl(path, tokenizer, max_length: int | None = None) -> tuple[list[dict], dict]:
    """Read a chat JSONL file; returns ``(samples, stats)``.

    Blank lines are ignored. Malformed JSON or a record without a messages list raises
    ValueError naming ``path:line``. Records with no supervised (assistant) token left are
    skipped (``skipped_no_assistant``, or ``skipped_past_max_length`` when the cut removed them);
    sequences over ``max_length`` are truncated. ``stats``: ``records``, ``samples``,
    ``skipped_no_assistant``, ``skipped_past_max_length``, ``truncated``, ``tokens``, ``supervised_tokens``.
    """
    path = os.fspath(path)
    samples = []
    stats = {"records": 0, "samples": 0, "skipped_no_assistant": 0, "skipped_past_max_length": 0, "truncated": 0,
             "tokens": 0, "supervised_tokens": 0}
    for lineno, _, record in jsonl_records(path):
        stats["records"] += 1
        try:
            sample, truncated, had_assistant = _tokenize(record, tokenizer, max_length)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        if int(sample["loss_mask"].sum()) == 0:
            stats["skipped_past_max_length" if had_assistant else "skipped_no_assistant"] += 1
            continue
        stats["truncated"] += int(truncated)
        stats["samples"] += 1
        stats["tokens"] += len(sample["input_ids"])
        stats["supervised_tokens"] += int(sample["loss_mask"].sum())
        samples.append(sample)
    return samples, stats


def jsonl_records(path) -> Iterator[tuple[int, str, object]]:
    """``(line number, line, parsed JSON)`` of each non-blank line; ValueError naming ``path:line``
    for a line that is not UTF-8 or not JSON."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_line(raw, path, lineno)
            if not line.strip():
                continue
            try:
                yield lineno, line, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None


def decode_line(raw: bytes, path, lineno: int) -> str:
    """One line of a text file as str; ValueError naming ``path:line`` when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def has_anchor_run(loss_mask: torch.Tensor, run: int) -> bool:
    """True when ``run`` consecutive tokens are supervised: an anchor with something after it to learn."""
    lm = torch.as_tensor(loss_mask).bool()
    n = lm.numel() - run + 1
    if n < 1:
        return False
    ok = lm[:n].clone()
    for i in range(1, run):
        ok &= lm[i:i + n]
    return bool(ok.any())


class TokenizedChats:
    """Samples of a tokenized chat dataset on disk (``datasets`` Arrow files): ``len``, ``[i]`` ->
    ``{"input_ids", "loss_mask"}`` long tensors, read lazily (memory-mapped, shared by all ranks)."""

    def __init__(self, path: str, max_length: int | None = None):
        import datasets

        self.path, self.max_length = path, max_length
        self.ds = datasets.load_from_disk(path).with_format("torch", columns=["input_ids", "loss_mask"])
        with open(os.path.join(path, STATS_FILE)) as f:
            self.stats = json.load(f)

    def __len__(self) -> int:
        return len(self.ds)

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, i: int) -> dict:
        row = self.ds[int(i)]
        return {k: row[k][: self.max_length].long() for k in ("input_ids", "loss_mask")}

    def lengths(self) -> list[int]:
        """Every sample's token count (after ``max_length``), from the Arrow column without reading rows."""
        import pyarrow.compute as pc

        n = pc.list_value_length(self.ds.data.column("input_ids")).to_pylist()
        return [min(x, self.max_length) if self.max_length else x for x in n]


STATS_FILE = "d2sd_stats.json"
TOKENIZE_VERSION = 2  # bump when the tokenization rule changes: old caches are not reused


def _tokenize_lines(batch: dict, tokenizer, max_length: int | None, path: str) -> dict:
    out = {"input_ids": [], "loss_mask": [], "truncated": [], "had_assistant": []}
    for lineno, line in zip(batch["lineno"], batch["line"]):
        try:
            sample, truncated, had_assistant = _tokenize(json.loads(line), tokenizer, max_length)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        out["input_ids"].append(sample["input_ids"].int().tolist())
        out["loss_mask"].append(sample["loss_mask"].to(torch.int8).tolist())
        out["truncated"].append(truncated)
        out["had_assistant"].append(had_assistant)
    return out


def tokenized_cache_dir(path, tokenizer, max_length: int | None, cache_dir: str | None = None) -> str:
    """Where ``tokenize_chat_dataset`` keeps the tokenization of ``path``: keyed by the file's bytes,
    the tokenizer (vocab, chat template) and ``max_length``."""
    import hashlib

    from datasets.fingerprint import Hasher

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(f"{Hasher.hash(tokenizer)}:{max_length}:{TOKENIZE_VERSION}".encode())
    root = cache_dir or os.path.join(os.environ.get("D2SD_CACHE", os.path.expanduser("~/.cache/d2sd")), "tokenized")
    return os.path.join(root, h.hexdigest()[:24])


def tokenize_chat_dataset(path, tokenizer, max_length: int | None = None, num_proc: int | None = None,
                          out: str | None = None, cache_dir: str | None = None) -> TokenizedChats:
    """``load_chat_jsonl`` through ``datasets``: ``map`` over ``num_proc`` processes, written once to
    ``out`` (default: a cache folder keyed by file, tokenizer and max_length) and reused after.

    Under ``torch.distributed`` rank 0 tokenizes while the others wait, then every rank memory-maps
    the same files. Same samples, errors and stats as ``load_chat_jsonl``.
    """
    import torch.distributed as dist

    path = os.fspath(path)
    where = out or tokenized_cache_dir(path, tokenizer, max_length, cache_dir)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    build = out is not None or not os.path.isfile(os.path.join(where, STATS_FILE))
    if build and (not distributed or dist.get_rank() == 0):
        _build_tokenized(path, tokenizer, max_length, num_proc, where)
    if distributed:
        dist.barrier()
    return TokenizedChats(where)


def _build_tokenized(path: str, tokenizer, max_length, num_proc, where: str) -> None:
    import shutil

    import datasets

    lines, linenos = [], []
    for lineno, line, _ in jsonl_records(path):
        lines.append(line)
        linenos.append(lineno)
    ds = datasets.Dataset.from_dict({"lineno": linenos, "line": lines})
    if len(ds):
        ds = ds.map(_tokenize_lines, batched=True, batch_size=64, num_proc=num_proc if num_proc and num_proc > 1 else None,
                    fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "path": path},
                    remove_columns=["line"], desc="tokenize")
        supervised = [sum(m) for m in ds["loss_mask"]]
        lengths = [len(i) for i in ds["input_ids"]]
        keep = [i for i, n in enumerate(supervised) if n > 0]
        had = ds["had_assistant"]
        cut = sum(1 for i, n in enumerate(supervised) if n == 0 and had[i])
        stats = {"records": len(ds), "samples": len(keep), "skipped_no_assistant": len(ds) - len(keep) - cut,
                 "skipped_past_max_length": cut, "truncated": sum(ds[i]["truncated"] for i in keep),
                 "tokens": sum(lengths[i] for i in keep), "supervised_tokens": sum(supervised[i] for i in keep)}
        ds = ds.select(keep).remove_columns(["lineno", "truncated", "had_assistant"])
    else:
        ds = datasets.Dataset.from_dict({"input_ids": [], "loss_mask": []})
        stats = {"records": 0, "samples": 0, "skipped_no_assistant": 0, "skipped_past_max_length": 0, "truncated": 0,
                 "tokens": 0, "supervised_tokens": 0}
    tmp = where.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ds.save_to_disk(tmp)
    with open(os.path.join(tmp, STATS_FILE), "w") as f:
        json.dump(stats, f)
    shutil.rmtree(where, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(where)), exist_ok=True)
    try:
        os.replace(tmp, where)  # complete or absent: a crash leaves no half cache behind
    except OSError:
        if not os.path.isfile(os.path.join(where, STATS_FILE)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cache first


def load_chat_data(path, tokenizer, max_length: int | None = None, num_proc: int | None = None):
    """Training samples of ``path``: a folder written by ``python -m d2sd.data tokenize``, or a chat
    JSONL (tokenized once through ``datasets`` and cached when it is installed, else in memory).
    Returns ``(samples, stats)``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        t = TokenizedChats(path, max_length)
        return t, t.stats
    try:
        import datasets  # noqa: F401
    except ImportError:
        return load_chat_jsonl(path, tokenizer, max_length)
    t = tokenize_chat_dataset(path, tokenizer, max_length, num_proc=num_proc)
    return t, t.stats


def write_chat_jsonl(path, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- batching

def collate(samples: Sequence[dict], pad_id: int, pad_to_multiple_of: int = 1, pin_memory: bool = False) -> dict:
    """Right-pad samples into a batch.

    Returns ``input_ids [Bt, S]`` long (pad = ``pad_id``), ``loss_mask [Bt, S]`` long (0 on pad),
    ``attention_mask [Bt, S]`` long (1 = real token); plus ``target_hidden [Bt, S, L*H]`` (zeros on
    pad) when every sample carries one (cache samples). Each sample's values are copied once,
    straight into the batch (a cache sample's features may be a view of the memory-mapped shard);
    ``pin_memory=True`` allocates the batch in page-locked memory for ``non_blocking`` copies.
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    lengths = [len(s["input_ids"]) for s in samples]
    width = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    Bt = len(samples)

    def empty(shape, dtype):
        return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)

    input_ids, loss_mask, attention_mask = empty((Bt, width), torch.long), empty((Bt, width), torch.long), empty((Bt, width), torch.long)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        input_ids[i, :n] = torch.as_tensor(s["input_ids"], dtype=torch.long)
        input_ids[i, n:] = int(pad_id)
        loss_mask[i, :n] = torch.as_tensor(s["loss_mask"], dtype=torch.long)
        loss_mask[i, n:] = 0
        attention_mask[i, :n] = 1
        attention_mask[i, n:] = 0
    batch = {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}
    if all("target_hidden" in s for s in samples):
        first = samples[0]["target_hidden"]
        hidden = empty((Bt, width, first.shape[-1]), torch.bfloat16 if first.dtype.itemsize == 1 else first.dtype)
        for i, (s, n) in enumerate(zip(samples, lengths)):
            hidden[i, :n] = s["target_hidden"]  # [S, L*H]; float8 caches are upcast here
            hidden[i, n:] = 0
        batch["target_hidden"] = hidden
    return batch


class ResumableSampler:
    """Deterministic shuffled sample order that can stop anywhere and resume exactly.

    Epoch ``e`` visits ``randperm(num_samples)`` seeded by ``(seed, e)`` (identity order when
    ``shuffle=False``); with ``world_size > 1`` rank ``r`` takes every ``world_size``-th index of
    that order (the tail that does not divide evenly is dropped, so ranks stay in step).
    State is ``{"epoch", "position"}`` (position = indices of this rank already handed out in the
    current epoch); ``state_dict()`` / ``load_state_dict()`` round-trip it.

        sampler = ResumableSampler(len(samples), seed=0)
        idx = sampler.next_batch(8)            # crosses epoch boundaries as needed
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} ranks")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self._order_epoch = None
        self._order = None

    @property
    def per_rank(self) -> int:
        return self.num_samples // self.world_size

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                order = torch.randperm(self.num_samples, generator=g)
            else:
                order = torch.arange(self.num_samples)
            self._order = order[: self.per_rank * self.world_size][self.rank::self.world_size].tolist()
            self._order_epoch = self.epoch
        return self._order

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        """The rest of the current epoch; then the state moves to the next epoch."""
        order = self._epoch_order()
        while self.position < len(order):
            idx = order[self.position]
            self.position += 1
            yield idx
        self.epoch += 1
        self.position = 0

    def next_batch(self, batch_size: int) -> list[int]:
        """The next ``batch_size`` indices of this rank, continuing into the next epoch when needed."""
        out = []
        while len(out) < batch_size:
            order = self._epoch_order()
            take = order[self.position:self.position + batch_size - len(out)]
            out.extend(take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch += 1
                self.position = 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_samples": self.num_samples, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "world_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler has {getattr(self, key)}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m d2sd.data", description="Prepare chat data for drafter training.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("regenerate", help="answer a chat dataset's prompts with the target (resumable JSONL)")
    r.add_argument("--data", required=True, help="input chat JSONL (messages / conversations per line)")
    r.add_argument("--out", required=True, help="output JSONL (appended to: a rerun continues where it stopped)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", help="OpenAI-compatible server URL (vLLM, SGLang, ...), e.g. http://127.0.0.1:30000")
    src.add_argument("--target", help="target model dir or Hub id: generate in this process (batched)")
    r.add_argument("--model", default="default", help="model name sent to the server")
    r.add_argument("--concurrency", type=int, default=64, help="requests in flight (--server)")
    r.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (--target)")
    r.add_argument("--max-new-tokens", type=int, default=4096, help="answer length limit")
    r.add_argument("--temperature", type=float, default=0.0, help="0: greedy, else sampled")
    r.add_argument("--top-p", type=float, default=None, help="nucleus sampling")
    r.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="enable_thinking for the chat template (default: the template's own default)")
    r.add_argument("--limit", type=int, default=None, help="only the first N records")
    r.add_argument("--seed", type=int, default=None, help="sampling seed (--target)")
    r.add_argument("--device", default=None, help="device of --target (default: cuda when available)")
    t = sub.add_parser("tokenize", help="tokenize a chat JSONL once into Arrow files that train --data reads")
    t.add_argument("--data", required=True, help="chat JSONL")
    t.add_argument("--target", default=None, help="target (its tokenizer and chat template); default: the tiny target")
    t.add_argument("--out", required=True, help="output folder (python -m d2sd.train --data FOLDER)")
    t.add_argument("--max-length", type=int, default=None, help="truncate sequences to this many tokens")
    t.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (datasets.map num_proc)")
    args = p.parse_args(argv)
    try:
        if args.command == "regenerate":
            if args.server:
                gen = ServerGenerator(args.server, args.model, args.max_new_tokens, args.temperature, args.top_p,
                                      args.thinking, args.concurrency)
                chunk = max(args.concurrency, 1) * 4
            else:
                device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
                model, tok = load_target(resolve_model(args.target), device=device)
                gen = TargetGenerator(model, tok, args.max_new_tokens, args.temperature, args.top_p, args.batch_size,
                                      args.seed, args.thinking)
                chunk = args.batch_size * 8
            stats = regenerate_file(args.data, args.out, gen, chunk_size=chunk, limit=args.limit)
            print(json.dumps(stats))
            return 1 if stats["errors"] else 0
        from transformers import AutoTokenizer

        if args.target is None:
            args.target = tiny_target_path()
        tok = AutoTokenizer.from_pretrained(resolve_model(args.target))
        ds = tokenize_chat_dataset(args.data, tok, args.max_length, num_proc=args.num_proc, out=args.out)
        print(json.dumps(ds.stats))
        return 0
    except (ValueError, FileNotFoundError) as e:
        print(f"python -m d2sd.data: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    import sys

    sys.exit(main())
