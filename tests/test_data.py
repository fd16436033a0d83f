"""Chat tokenization, JSONL loading (errors, skip/truncation counts), collate, the resumable sampler,
and the built-in corpus. Uses the shipped tiny target's tokenizer (no model run)."""
import json
import re

import pytest
import torch

from d2sd.assets import tiny_target_path
from d2sd.corpus import KINDS, final_answer, make_problems
from d2sd.data import (
    ResumableSampler,
    builtin_prompts,
    builtin_records,
    collate,
    load_chat_jsonl,
    tokenize_chat,
    write_chat_jsonl,
)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_target_path())


def _turns(*pairs):
    out = []
    for u, a in pairs:
        out += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return {"messages": out}


def _expected_mask(tok, messages):
    """Independent reference: token-count diffs of rendered prefixes (no offsets)."""
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    full = tok.apply_chat_template(messages, tokenize=False)
    mask = [0] * n(full)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = n(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            end = n(tok.apply_chat_template(messages[:i + 1], tokenize=False)) - 1  # minus the trailing "\n"
            mask[start:end] = [1] * (end - start)
    return mask


@pytest.mark.parametrize("nturns", [1, 3], ids=["turns1", "turns3"])
def test_tokenize_chat_masks_exactly_assistant_tokens(tok, nturns):
    pairs = [(p, a) for p, a in make_problems(nturns, seed=5)]
    record = _turns(*pairs)
    s = tokenize_chat(record, tok)
    assert s["input_ids"].dtype == torch.long and s["loss_mask"].dtype == torch.long
    assert s["loss_mask"].tolist() == _expected_mask(tok, record["messages"])
    # the supervised tokens decode to exactly each answer followed by the end-of-turn token
    ids, m = s["input_ids"].tolist(), s["loss_mask"].tolist()
    runs, cur = [], []
    for t, bit in zip(ids, m):
        if bit:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    assert len(runs) == nturns
    for run, (_, answer) in zip(runs, pairs):
        assert tok.decode(run) == answer + "<|im_end|>"
    assert tok.decode(ids) == tok.apply_chat_template(record["messages"], tokenize=False)


def test_tokenize_chat_sharegpt_deepspec_and_system_turns(tok):
    rec = {"conversations": [{"from": "system", "value": "Be brief ."}, {"from": "human", "value": "Hi ?"},
                             {"from": "gpt", "value": "Hello ."}]}
    s = tokenize_chat(rec, tok)
    assert tok.decode(s["input_ids"][s["loss_mask"].bool()]) == "Hello .<|im_end|>"
    deepspec = {"conversations": [{"role": "user", "content": [{"type": "text", "text": "Hi ?"}]},
                                  {"role": "assistant", "content": "Hello ."}], "status": "success"}
    d = tokenize_chat(deepspec, tok)
    assert tok.decode(d["input_ids"]) == "<|im_start|>user\nHi ?<|im_end|>\n<|im_start|>assistant\nHello .<|im_end|>\n"
    assert tok.decode(d["input_ids"][d["loss_mask"].bool()]) == "Hello .<|im_end|>"


def test_malformed_jsonl_names_file_and_line(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(builtin_records(1)[0])
    path.write_text(good + "\n\n" + good + "\n" + '{"messages": [oops\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: malformed JSON")):
        load_chat_jsonl(path, tok)
    path.write_text(good + "\n" + json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2:")):
        load_chat_jsonl(path, tok)


def test_load_counts_skipped_and_truncated(tok, tmp_path):
    records = builtin_records(3, seed=7)
    user_only = {"messages": [{"role": "user", "content": "How many ?"}]}
    empty_answer = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}
    long_prompt = {"messages": [{"role": "user", "content": " ".join(["apples"] * 80)},
                                {"role": "assistant", "content": "The answer is 3 ."}]}
    path = tmp_path / "d.jsonl"
    write_chat_jsonl(path, records + [user_only, empty_answer, long_prompt])
    lens = [len(tokenize_chat(r, tok)["input_ids"]) for r in records]
    max_length = max(lens) - 1  # the longest real record(s) lose their last token
    samples, stats = load_chat_jsonl(path, tok, max_length=max_length)
    # long_prompt: its answer lies past max_length -> skipped as such, not as "no assistant";
    # empty_answer keeps one supervised token, the end-of-turn token
    assert stats["records"] == 6
    assert stats["skipped_no_assistant"] == 1 and stats["skipped_past_max_length"] == 1
    assert stats["truncated"] == sum(n > max_length for n in lens) >= 1
    assert stats["samples"] == len(samples) == 4
    assert int(samples[3]["loss_mask"].sum()) == 1
    assert tok.decode(samples[3]["input_ids"][samples[3]["loss_mask"].bool()]) == "<|im_end|>"
    assert all(len(s["input_ids"]) <= max_length for s in samples)
    real = [min(n, max_length) for n in lens] + [len(samples[3]["input_ids"])]
    assert stats["tokens"] == sum(real)
    assert stats["supervised_tokens"] == sum(int(s["loss_mask"].sum()) for s in samples)


def test_collate_pads_right():
    a = {"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0, 1, 1])}
    b = {"input_ids": torch.tensor([8, 9, 10, 11, 12]), "loss_mask": torch.tensor([0, 0, 1, 1, 0])}
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    a["target_hidden"] = torch.ones(3, 4, dtype=torch.bfloat16)
    b["target_hidden"] = torch.full((5, 4), 2.0, dtype=torch.bfloat16)
    batch = collate([a, b], pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (2, 8) and batch["target_hidden"].shape == (2, 8, 4)
    assert batch["target_hidden"].dtype == torch.bfloat16
    assert batch["target_hidden"][0, 3:].abs().sum() == 0 and batch["target_hidden"][1, :5].eq(2).all()


@pytest.mark.parametrize("n,bs", [(10, 3), (7, 7), (5, 8)], ids=["N10-bs3", "N7-bs7", "N5-bs8"])
def test_sampler_resumes_exactly(n, bs):
    s = ResumableSampler(n, seed=3)
    first = [s.next_batch(bs) for _ in range(4)]
    state = s.state_dict()
    cont = [s.next_batch(bs) for _ in range(3)]
    r = ResumableSampler(n, seed=3)
    r.load_state_dict(state)
    assert [r.next_batch(bs) for _ in range(3)] == cont
    flat = [i for b in first + cont for i in b]
    for e in range(len(flat) // n):  # every full epoch is a permutation
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))
    assert ResumableSampler(n, seed=4).next_batch(n) != ResumableSampler(n, seed=3).next_batch(n)


def test_sampler_iter_epochs_and_ranks():
    s = ResumableSampler(11, seed=0)
    e0 = list(s)
    assert sorted(e0) == list(range(11)) and s.state_dict()["epoch"] == 1
    it = iter(s)
    part = [next(it) for _ in range(4)]
    state = s.state_dict()
    assert state["epoch"] == 1 and state["position"] == 4
    r = ResumableSampler(11, seed=0)
    r.load_state_dict(state)
    assert part + list(r) == _epoch(11, 0, 1)
    ranks = [list(ResumableSampler(11, seed=0, rank=k, world_size=3)) for k in range(3)]
    assert all(len(x) == 3 for x in ranks)
    assert len(set(sum(ranks, []))) == 9
    with pytest.raises(ValueError):
        ResumableSampler(11, seed=0, world_size=2).load_state_dict(state)


def _epoch(n, seed, epoch):
    s = ResumableSampler(n, seed=seed)
    for _ in range(epoch):
        list(s)
    return list(s)


def test_builtin_prompts_deterministic():
    assert builtin_prompts(12, seed=0) == builtin_prompts(12, seed=0)
    assert builtin_prompts(12, seed=0) != builtin_prompts(12, seed=1)
    assert builtin_prompts(5) == [p for p, _ in make_problems(5, seed=0)]


def test_corpus_steps_are_correct_arithmetic():
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    problems = make_problems(240, seed=11)
    kinds_seen = set()
    for i, (prompt, answer) in enumerate(problems):
        kinds_seen.add(KINDS[i % len(KINDS)])
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", answer)
        assert steps, answer
        for a, op, b, c in steps:
            assert ops[op](int(a), int(b)) == int(c), answer
            if op == "/":
                assert int(a) % int(b) == 0
        assert final_answer(answer) == steps[-1][3]
        assert all(0 <= int(x) <= 99 for x in re.findall(r"\d+", prompt + answer))
    assert kinds_seen == set(KINDS)
    with pytest.raises(ValueError):
        make_problems(3, kinds=("nope",))
