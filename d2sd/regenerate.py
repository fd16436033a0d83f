"""Answer a chat dataset's prompts with the target: ``python -m d2sd.data regenerate``.

Each record keeps its system and user turns; every assistant turn is replaced by the target's own
answer, turn by turn (the answer to user turn ``i`` is generated with the regenerated history
before it), as DeepSpec's data pipeline does. Two ways to run the target:

- ``--server URL``: any OpenAI-compatible server (vLLM, SGLang, TGI...), ``--concurrency`` requests
  in flight; a server's reasoning output (``message.reasoning_content``) is kept.
- ``--target DIR``: in process, batched ``generate`` (greedy, or sampled with ``--temperature``);
  a ``<think>...</think>`` block in the output is split into ``reasoning_content``.

The assistant turn keeps the reasoning as ``reasoning_content`` (what chat templates with thinking
render). The output JSONL is resumable: each line carries ``id`` (the input line's index) and a
rerun skips the ids already written; records whose requests failed go to ``OUT.errors.jsonl`` and
are retried by the next run.

    python -m d2sd.data regenerate --data prompts.jsonl --out regen.jsonl --server http://127.0.0.1:30000 --model Qwen/Qwen3-8B
    python -m d2sd.data regenerate --data prompts.jsonl --out regen.jsonl --target /models/Qwen3-8B --temperature 0.7
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

from .chat import chat_messages
from .target import generate_chat

__all__ = ["split_thinking", "ServerGenerator", "TargetGenerator", "regenerate_records", "regenerate_file"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_thinking(text: str) -> tuple[Optional[str], str]:
    """``"<think>r</think>c"`` -> ``("r", "c")``; text without a closed reasoning block -> ``(None, text)``."""
    if THINK_CLOSE not in text:
        return None, text.strip()
    reasoning, content = text.split(THINK_CLOSE, 1)
    reasoning = reasoning.strip()
    if reasoning.startswith(THINK_OPEN):
        reasoning = reasoning[len(THINK_OPEN):]
    return reasoning.strip(), content.strip()


def _assistant(content: str, reasoning: Optional[str]) -> dict:
    turn = {"role": "assistant", "content": content}
    if reasoning:
        turn["reasoning_content"] = reasoning
    return turn


class ServerGenerator:
    """Next assistant turns from an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    ``enable_thinking`` (None: the server's default) is passed as ``chat_template_kwargs`` (vLLM and
    SGLang read it). Each request is retried ``retries`` times; a request that still fails yields
    its exception in place of the turn.
    """

    def __init__(self, url: str, model: str = "default", max_tokens: int = 4096, temperature: float = 0.0,
                 top_p: Optional[float] = None, enable_thinking: Optional[bool] = None, concurrency: int = 64,
                 timeout: float = 600.0, retries: int = 2):
        base = url.rstrip("/")
        self.endpoint = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.max_tokens, self.temperature, self.top_p = model, max_tokens, temperature, top_p
        self.enable_thinking, self.concurrency, self.timeout, self.retries = enable_thinking, concurrency, timeout, retries

    def _request(self, messages: list[dict]) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "stream": False}
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.enable_thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": self.enable_thinking}
        req = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    msg = json.loads(r.read())["choices"][0]["message"]
                break
            except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError):
                if attempt == self.retries:
                    raise
                time.sleep(0.5 * 2 ** attempt)
        reasoning = msg.get("reasoning_content") or msg.get("reasoning")
        content = msg.get("content") or ""
        if reasoning is None:
            reasoning, content = split_thinking(content)
        return _assistant(content.strip(), reasoning)

    def __call__(self, chats: Sequence[list[dict]]) -> list:
        def one(messages):
            try:
                return self._request(messages)
            except Exception as e:  # reported per record, the others go on
                return e

        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(one, chats))


class TargetGenerator:
    """Next assistant turns from a target model in this process (``d2sd.target.generate_chat``)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 512, temperature: float = 0.0,
                 top_p: Optional[float] = None, batch_size: int = 32, seed: Optional[int] = None,
                 enable_thinking: Optional[bool] = None):
        self.model, self.tokenizer = model, tokenizer
        self.kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size,
                       seed=seed, template_kwargs=None if enable_thinking is None else {"enable_thinking": enable_thinking})

    def __call__(self, chats: Sequence[list[dict]]) -> list:
        return [_assistant(c, r) for r, c in map(split_thinking, generate_chat(self.model, self.tokenizer, chats, **self.kw))]


def _prompt_turns(record: dict) -> tuple[str, list[dict]]:
    """(key of the turn list, its system/user turns in order); ValueError on a record without a user turn."""
    key = "messages" if "messages" in record else "conversations"
    turns = [t for t in chat_messages(record) if t["role"] != "assistant"]
    if not any(t["role"] == "user" for t in turns):
        raise ValueError("record has no user turn to answer")
    return key, turns


def regenerate_records(records: Sequence[dict], generate: Callable[[Sequence[list[dict]]], list]) -> list:
    """Each record with its assistant turns regenerated (or the exception that stopped it).

    ``generate(chats)`` returns the next assistant turn (a dict) or an exception per chat; all the
    records' ``i``-th user turns are answered in one call, so a batch or a request pool stays full.
    """
    state = []  # [key, remaining turns, built history] or an exception
    for r in records:
        try:
            key, turns = _prompt_turns(r)
            state.append([key, turns, []])
        except ValueError as e:
            state.append(e)
    while True:
        pending = []
        for i, s in enumerate(state):
            if isinstance(s, Exception) or not s[1]:
                continue
            while s[1] and s[1][0]["role"] != "user":
                s[2].append(s[1].pop(0))  # system turns ride along
            if s[1]:
                s[2].append(s[1].pop(0))
                pending.append(i)
        if not pending:
            break
        for i, turn in zip(pending, generate([state[i][2] for i in pending])):
            if isinstance(turn, Exception):
                state[i] = turn
            else:
                state[i][2].append(turn)
    out = []
    for r, s in zip(records, state):
        if isinstance(s, Exception):
            out.append(s)
        else:
            key, _, history = s
            out.append({**{k: v for k, v in r.items() if k not in ("messages", "conversations")}, key: history})
    return out


def _done_ids(path: str) -> set[int]:
    """Ids already written to ``path``; a last line cut by a crash is dropped (its record is redone)."""
    done = set()
    if os.path.exists(path):
        with open(path, "rb+") as f:
            text = f.read()
            if text and not text.endswith(b"\n"):
                f.truncate(text.rfind(b"\n") + 1)
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    done.add(int(json.loads(line)["id"]))
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def regenerate_file(data: str, out: str, generate: Callable, chunk_size: int = 256, limit: Optional[int] = None,
                    log: Callable[[str], None] = print) -> dict:
    """Regenerate the JSONL ``data`` into ``out`` (resumable; see the module docstring). Returns counts."""
    records = []
    with open(data, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            if line.strip():
                try:
                    records.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{data}:{lineno + 1}: malformed JSON: {e.msg}") from None
            if limit is not None and len(records) >= limit:
                break
    done = _done_ids(out)
    todo = [(i, r) for i, r in records if i not in done]
    err_path = out + ".errors.jsonl"
    stats = {"records": len(records), "already_done": len(records) - len(todo), "written": 0, "errors": 0}
    log(f"regenerate: {len(records)} records, {stats['already_done']} already in {out}, {len(todo)} to do")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a", encoding="utf-8") as fo, open(err_path, "w", encoding="utf-8") as fe:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            for (i, _), res in zip(chunk, regenerate_records([r for _, r in chunk], generate)):
                if isinstance(res, Exception):
                    fe.write(json.dumps({"id": i, "error": f"{type(res).__name__}: {res}"}) + "\n")
                    stats["errors"] += 1
                else:
                    fo.write(json.dumps({**res, "id": i}, ensure_ascii=False) + "\n")
                    stats["written"] += 1
            fo.flush()
            fe.flush()
            log(f"regenerate: {stats['already_done'] + stats['written']}/{len(records)} done, {stats['errors']} errors")
    if not stats["errors"]:
        os.remove(err_path)
    return stats
