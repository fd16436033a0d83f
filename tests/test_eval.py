"""Speculative decoding (d2sd.specdec) and ``python -m d2sd.eval``: lossless, r(i) ranking, errors, report.

The protocol tests use *scripted* drafters that know the target's greedy continuation: they
check every block the decoder builds (anchor, visible prefix, masks), the context features it
passes (against the target's own hidden states), and that perfect drafts are accepted in full
under both slot conventions. The end-to-end tests use real (untrained) drafters on the shipped
tiny target: losslessness does not depend on drafter quality.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from d2sd.specdec import (
    SlotDrafter,
    TargetVerifier,
    check_drafters,
    decode,
    label_offset,
    rank_prefix_lengths,
    rejection_scores,
)
from tests.utils import rel_err

V, H, N_LAYERS, MASK = 97, 48, 3, 96


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: intra-op threads only add contention on the 2-core CI box (about 10x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rand_target():
    """A random 3-layer Qwen3 in float64 (float64: no near-tie argmax flips between batched and single rows)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=512)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg).eval().to(torch.float64)


@pytest.fixture(scope="module")
def rand_prompt():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, MASK, (11,), generator=g).tolist()


@pytest.fixture(scope="module")
def rand_greedy(rand_target, rand_prompt):
    """Plain greedy continuation (40 tokens) and the float64 features ``{layer: [S, H]}`` of every
    position, from ``d2sd.target.target_hidden_states`` (what training reads)."""
    from d2sd.target import target_hidden_states

    res = decode(TargetVerifier(rand_target), rand_prompt, method="greedy", max_new_tokens=40)
    seq = rand_prompt + res.tokens
    hs = {l: target_hidden_states(rand_target, torch.tensor([seq]), layer_ids=[l])[0] for l in range(-1, N_LAYERS)}
    return seq, hs


class ScriptedDrafter(torch.nn.Module):
    """Predicts the target's greedy continuation ``seq``; wrong (and unsure) beyond ``good(anchor)`` drafted tokens.

    Asserts what the decoder feeds it: context = target features of positions ``< anchor`` at
    ``layer_ids``, slot 0 = the anchor token, visible slots = the true tokens, then masks.
    """

    def __init__(self, seq, hs, block_size, layer_ids, *, d2=False, labels="same", good=None, first=None):
        super().__init__()
        self.seq, self.hs, self.good, self.first = seq, hs, good, first
        self.config = SimpleNamespace(
            block_size=block_size, mask_token_id=MASK, target_layer_ids=list(layer_ids),
            enable_d2_feature=d2, dflash_labels=labels, target_hidden_size=H, vocab_size=V)
        self.offset = label_offset(self.config)
        self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # carries device/dtype
        self.calls = []

    def draft_logits(self, target_hidden, anchors, block_ids):
        Bt, K, B = block_ids.shape
        a = int(anchors[0, 0])
        assert (anchors == a).all(), "blocks of one step share the anchor"
        assert target_hidden.shape[1] == a, "context = positions before the anchor"
        ref = torch.cat([self.hs[l][:a] for l in self.config.target_layer_ids], dim=-1)
        assert target_hidden.shape[2] == ref.shape[1] and rel_err(target_hidden[0], ref) < 1e-12
        out = torch.zeros(Bt, K, B, V)
        for k in range(K):
            ids = block_ids[0, k].tolist()
            vis = next((i for i, t in enumerate(ids) if t == MASK), B)
            assert ids[0] == self.seq[a], "slot 0 holds the anchor token"
            # VP blocks show the first drafter's tokens d_1..d_i; DFlash blocks the anchor only
            assert ids[1:vis] == (self.first.drafted(a)[: vis - 1] if self.first else [])
            assert all(t == MASK for t in ids[vis:]), "after the visible prefix: masks only"
            self.calls.append(vis)
            for s in range(B):
                m = s + self.offset  # slot s predicts position a + m
                if m >= 1:
                    out[0, k, s, self.drafted(a)[m - 1]] = 12.0 if self._right(a, m) else 1.0
                if m >= 1 and not self._right(a, m) and a + m < len(self.seq):
                    out[0, k, s, self.seq[a + m]] = 0.5  # the true token is the runner-up
        return out

    def _right(self, a, m):
        return self.good is None or m <= self.good(a)

    def drafted(self, a):
        """Tokens this drafter proposes at positions a+1, a+2, ... (wrong by +1 past ``good(a)``)."""
        true = [self.seq[p] if p < len(self.seq) else 0 for p in range(a + 1, a + self.config.block_size + 1)]
        return [t if self._right(a, m) else (t + 1) % MASK for m, t in enumerate(true, 1)]


# ------------------------------------------------------------------------------------ r(i)


def test_rejection_scores_hand_made():
    conf = [0.9, 0.5, 0.8, 0.2]
    r = rejection_scores(conf, 3)
    expect = [0.1, 0.9 * 0.5, 0.9 * 0.5 * 0.2, 0.9 * 0.5 * 0.8 * 0.8]
    assert r == pytest.approx(expect, rel=1e-12)
    assert rank_prefix_lengths(conf, 2, 3) == [1, 3]
    assert rank_prefix_lengths(conf, 4, 3) == [1, 3, 0, 2]
    assert rank_prefix_lengths(conf, 9, 2) == [1, 0, 2], "max_prefix caps the candidates"


def test_rank_prefix_lengths_ties_and_extremes():
    assert rank_prefix_lengths([0.5, 0.0, 0.3], 2, 2) == [0, 1], "r(0) = r(1) = 0.5: shorter first"
    # confident up to an unsure last token: the most likely rejection is at the end
    assert rank_prefix_lengths([0.99] * 5 + [0.3], 1, 5) == [5]
    # uniformly confident: r(i) = c**i (1 - c) decreases, so the shortest prefix ranks first
    assert rank_prefix_lengths([0.99] * 6, 6, 5) == [0, 1, 2, 3, 4, 5]
    # an unsure first token: branch right after the anchor
    assert rank_prefix_lengths([0.05, 0.99, 0.99], 1, 2) == [0]
    with pytest.raises(ValueError, match="needs 4 confidences"):
        rejection_scores([0.5, 0.5, 0.5], 3)


# ------------------------------------------------------------------------------------ protocol


@pytest.mark.parametrize("labels", ["same", "shifted"])
@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv", "recompute"])
def test_perfect_dflash_draft_is_accepted_in_full(rand_target, rand_prompt, rand_greedy, labels, kv_cache):
    seq, hs = rand_greedy
    B, layers = 5, [0, 2]
    d = ScriptedDrafter(seq, hs, B, layers, labels=labels)
    ver = TargetVerifier(rand_target, layers, use_cache=kv_cache)
    res = decode(ver, rand_prompt, method="dflash", max_new_tokens=40, dflash=SlotDrafter(d, layers))
    assert res.tokens == seq[len(rand_prompt):]
    drafted = B - 1 + (labels == "shifted")
    assert [s.accepted for s in res.steps[:-1]] == [drafted] * (len(res.steps) - 1)
    assert set(d.calls) == {1}, "DFlash blocks show the anchor only"


@pytest.mark.parametrize("d2_labels", ["d2", "same", "shifted"])
def test_d2sd_branches_rescue_a_partly_wrong_draft(rand_target, rand_prompt, rand_greedy, d2_labels):
    """DFlash is right for ``a % 3`` tokens; the scripted VP drafter is always right, so the branch
    at the rejection boundary wins and every step commits a full block."""
    seq, hs = rand_greedy
    B, K = 6, 2
    good = lambda a: a % 3  # noqa: E731
    kw = dict(d2=True) if d2_labels == "d2" else dict(labels=d2_labels)
    first = ScriptedDrafter(seq, hs, B, [0, 2], good=good, **kw)
    vp = ScriptedDrafter(seq, hs, B, [1], d2=True, first=first)
    layers = [0, 1, 2]
    dfl, vpd = SlotDrafter(first, layers), SlotDrafter(vp, layers)
    res = decode(TargetVerifier(rand_target, layers), rand_prompt, method="d2sd", max_new_tokens=40,
                 dflash=dfl, vp=vpd, k=K)
    assert res.tokens == seq[len(rand_prompt):]
    base = decode(TargetVerifier(rand_target, layers), rand_prompt, method="dflash", max_new_tokens=40, dflash=dfl)
    assert base.tokens == res.tokens
    for s in res.steps[:-1]:
        assert s.accepted == B - 1 and s.winner >= 0 and s.rows <= K + 1
    assert all(s.accepted <= 2 for s in base.steps)
    assert set(vp.calls) <= set(range(1, B)), "VP blocks show the anchor plus i < B-1 drafted tokens"


@pytest.mark.parametrize("distinct", [False, True], ids=["argmax", "distinct"])
def test_d2sd_duplicate_branches_and_distinct(rand_target, rand_prompt, rand_greedy, distinct):
    """A VP drafter that copies the first draft yields only duplicates (verified once); with
    ``distinct_branches`` every branch changes the token right after its prefix."""
    seq, hs = rand_greedy
    B, K, layers = 6, 3, [0, 2]
    good = lambda a: a % 4  # noqa: E731
    first = ScriptedDrafter(seq, hs, B, layers, good=good)
    vp = ScriptedDrafter(seq, hs, B, layers, d2=True, good=good, first=first)
    res = decode(TargetVerifier(rand_target, layers), rand_prompt, method="d2sd", max_new_tokens=30,
                 dflash=SlotDrafter(first, layers), vp=SlotDrafter(vp, layers), k=K, distinct_branches=distinct)
    assert res.tokens == seq[len(rand_prompt):len(rand_prompt) + 30]
    a = len(rand_prompt)
    for s in res.steps[:-1]:
        # distinct: the top-ranked branch sits at the true boundary i = good(a) and, barred from
        # repeating the wrong d_{i+1}, takes the runner-up (the true token) there
        assert s.accepted == good(a) + distinct, (a, s)
        a += s.accepted + 1
    if distinct:
        assert all(s.rows == K + 1 for s in res.steps)
        assert all(s.winner == s.accepted - 1 for s in res.steps[:-1])
    else:
        assert all(s.rows == 1 and s.winner == -1 for s in res.steps)


def test_greedy_matches_full_forward_argmax(rand_target, rand_prompt, rand_greedy):
    seq, _ = rand_greedy
    with torch.no_grad():
        ref = rand_target(torch.tensor([seq])).logits[0].argmax(-1)
    assert seq[len(rand_prompt):] == ref[len(rand_prompt) - 1:-1].tolist()


def test_eos_and_max_new_tokens_truncate(rand_target, rand_prompt, rand_greedy):
    seq, hs = rand_greedy
    gen = seq[len(rand_prompt):]
    eos = gen[13]
    stop = gen.index(eos) + 1
    layers = [0, 2]
    d = SlotDrafter(ScriptedDrafter(seq, hs, 5, layers, labels="shifted"), layers)
    for method in ("greedy", "dflash"):
        res = decode(TargetVerifier(rand_target, layers), rand_prompt, method=method, max_new_tokens=40,
                     dflash=d, eos_token_ids=[eos])
        assert res.tokens == gen[:stop]
        res = decode(TargetVerifier(rand_target, layers), rand_prompt, method=method, max_new_tokens=7, dflash=d)
        assert res.tokens == gen[:7]


# ------------------------------------------------------------------------------------ bad input


def _cfg(**kw):
    base = dict(block_size=7, mask_token_id=MASK, target_layer_ids=[0, 2], enable_d2_feature=False,
                dflash_labels="shifted", target_hidden_size=H, vocab_size=V)
    return SimpleNamespace(config=SimpleNamespace(**{**base, **kw}))


@pytest.mark.parametrize(
    "dflash_kw, vp_kw, k, match",
    [
        (dict(target_hidden_size=64), {}, 4, "hidden size 64.*hidden_size 48"),
        ({}, dict(vocab_size=151936), 4, "vocab_size 151936.*vocab_size 97"),
        (dict(mask_token_id=97), {}, 4, "mask_token_id 97 is not a token id"),
        (dict(mask_token_id=-1), {}, 4, "mask_token_id -1"),
        ({}, dict(block_size=5), 4, "block_size 7 but the VP drafter has block_size 5"),
        (dict(target_layer_ids=[0, 3]), {}, 4, r"layers -1..2.*bad: \[3\]"),
        (dict(dflash_labels="left"), {}, 4, "dflash_labels='left'"),
        ({}, {}, 7, "--k must be < block size 7"),
        ({}, {}, 0, "--k must be >= 1"),
        (dict(block_size=1), dict(block_size=1), None, "block_size must be >= 2"),
    ],
    ids=["hidden", "vocab", "mask-high", "mask-neg", "block", "layers", "labels", "k-big", "k-zero", "block-1"],
)
def test_mismatch_errors(rand_target, dflash_kw, vp_kw, k, match):
    with pytest.raises(ValueError, match=match):
        check_drafters(rand_target.config, _cfg(**dflash_kw), _cfg(enable_d2_feature=True, **vp_kw), k)


def test_fitting_drafters_pass(rand_target):
    check_drafters(rand_target.config, _cfg(), _cfg(enable_d2_feature=True), 6)


def test_decode_rejects_missing_drafters(rand_target, rand_prompt):
    with pytest.raises(ValueError, match="needs a VP drafter"):
        decode(TargetVerifier(rand_target), rand_prompt, method="d2sd", max_new_tokens=4, dflash=object())
    with pytest.raises(ValueError, match="method must be one of"):
        decode(TargetVerifier(rand_target), rand_prompt, method="beam", max_new_tokens=4)


# ------------------------------------------------------------------------------------ real drafters, report


def _real_drafters(target_config, block_size, labels, layers, dtype=torch.float64, target=None):
    from d2sd.models import build_drafter

    kw = dict(num_draft_layers=1, block_size=block_size, target_layer_ids=layers, mask_token_id=MASK, backend="torch")
    torch.manual_seed(3)
    out = []
    for d2 in (False, True):
        d = build_drafter(target_config, enable_d2_feature=d2, dflash_labels=labels, **kw)
        if target is not None:
            d.init_from_target(target)
        out.append(d.to(dtype).eval())
    return out


METRIC_KEYS = {
    "prompts": int, "new_tokens": int, "target_forwards": int, "acceptance_length": float,
    "per_position_acceptance": list, "accepted_histogram": list, "draft_ms_per_step": float,
    "target_ms_per_step": float, "prefill_ms": float, "rows_per_step": float, "seconds": float,
    "tokens_per_s": float, "branch_win_rate": float, "branch_win_by_prefix": dict, "lossless": bool,
    "mismatched_prompts": list, "speedup_vs_greedy": float, "kv_cache": bool,
}


def check_report_schema(rep: dict, methods=("greedy", "dflash", "d2sd"), datasets=None) -> None:
    assert set(rep["methods"]) == set(methods)
    assert isinstance(rep["lossless"], bool)
    for entry in [rep, *rep["datasets"].values()]:
        for m, r in entry["methods"].items():
            for key, typ in METRIC_KEYS.items():
                assert isinstance(r[key], typ), (m, key, r[key])
            acc = r["per_position_acceptance"]
            assert all(0.0 <= x <= 1.0 for x in acc) and acc == sorted(acc, reverse=True)
            assert sum(r["accepted_histogram"]) == r["target_forwards"]
            assert r["acceptance_length"] == pytest.approx(1 + sum(acc))
            assert 1.0 <= r["acceptance_length"] <= 1 + len(acc)
    if datasets is not None:
        assert list(rep["datasets"]) == list(datasets)
    if "dflash" in rep["methods"] and "d2sd" in rep["methods"]:
        ratio = rep["methods"]["d2sd"]["acceptance_length"] / rep["methods"]["dflash"]["acceptance_length"]
        assert rep["d2sd_over_dflash"] == pytest.approx(ratio)
    json.dumps(rep)  # plain JSON types only


@pytest.mark.parametrize("labels", ["shifted", "same"])
def test_evaluate_real_drafters_lossless_and_schema(rand_target, labels):
    from d2sd.eval import evaluate

    dflash, vp = _real_drafters(rand_target.config, 5, labels, [0, 2], target=rand_target)
    g = torch.Generator().manual_seed(5)
    datasets = {"odd": [torch.randint(0, MASK, (n,), generator=g).tolist() for n in (7, 12)],
                "short": [torch.randint(0, MASK, (2,), generator=g).tolist()]}
    distinct = labels == "same"  # untrained drafters often repeat the first draft: force distinct rows once
    rep = evaluate(rand_target, datasets, dflash=dflash, vp=vp, k=3, max_new_tokens=17, warmup=False,
                   distinct_branches=distinct)
    check_report_schema(rep, datasets=datasets)
    assert rep["lossless"] is True
    for r in rep["methods"].values():
        assert r["new_tokens"] == 17 * 3
    assert rep["methods"]["greedy"]["acceptance_length"] == 1.0
    if distinct:
        assert rep["methods"]["d2sd"]["rows_per_step"] == 4.0


def test_malformed_prompt_file_names_file_and_line(tmp_path):
    from d2sd.eval import UsageError, load_prompt_file

    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "hi"}\n\n{"prompt": oops}\n')
    with pytest.raises(UsageError, match=r"bad\.jsonl:3: malformed JSON"):
        load_prompt_file(str(f))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="no prompts"):
        load_prompt_file(str(tmp_path / "empty.jsonl"))


# ------------------------------------------------------------------------------------ the shipped tiny target


@pytest.fixture(scope="module")
def tiny():
    """The shipped tiny Qwen3 target in float64, its tokenizer and three built-in prompts (token ids)."""
    from d2sd.assets import tiny_target_path
    from d2sd.data import builtin_prompts
    from d2sd.eval import encode_prompt
    from d2sd.target import load_target

    model, tok = load_target(str(tiny_target_path()), torch.device("cpu"), torch.float64)
    prompts = [encode_prompt(tok, p) for p in list(builtin_prompts())[:2]]
    return model.eval(), tok, prompts


@pytest.mark.parametrize("labels, kv_cache", [("shifted", True), ("same", True), ("same", False)],
                         ids=["shifted-kv", "same-kv", "same-recompute"])
def test_lossless_on_tiny_target(tiny, labels, kv_cache):
    """Untrained drafters (so many rejections, many branch shapes): output == plain greedy, both methods."""
    from d2sd.eval import _eos_ids

    model, tok, prompts = tiny
    n = model.config.num_hidden_layers
    dflash, vp = _real_drafters(model.config, 7, labels, [-1, n - 1], target=model)
    vp.config.target_layer_ids = [0, n - 1]  # the two drafters may read different target layers
    layers = sorted(set(dflash.config.target_layer_ids) | set(vp.config.target_layer_ids))
    d, v = SlotDrafter(dflash, layers), SlotDrafter(vp, layers)
    for prompt in prompts:
        ref = decode(TargetVerifier(model, use_cache=kv_cache), prompt, method="greedy", max_new_tokens=24)
        for method in ("dflash", "d2sd"):
            res = decode(TargetVerifier(model, layers, use_cache=kv_cache), prompt, method=method,
                         max_new_tokens=24, dflash=d, vp=v, k=4, eos_token_ids=_eos_ids(model, tok))
            stop = next((i + 1 for i, t in enumerate(ref.tokens) if t in set(_eos_ids(model, tok))), 24)
            assert res.tokens == ref.tokens[:stop], (method, prompt)


def test_target_features_match_d2sd_target(tiny):
    """Drafter context from the verify forwards == d2sd.target.target_hidden_states of the committed text."""
    from d2sd.target import target_hidden_states

    model, _, prompts = tiny
    layers = [-1, 0, model.config.num_hidden_layers - 1]
    first, feats = TargetVerifier(model, layers).prefill(prompts[0])
    ref = target_hidden_states(model, torch.tensor([prompts[0]]), layer_ids=layers)[0]  # [P, L*H]
    assert feats.shape == (len(prompts[0]), len(layers), model.config.hidden_size)
    assert rel_err(feats.flatten(1), ref) < 1e-12


def _save_drafters(model, tmp_path, block_sizes=(7, 7), vp_hidden=None, **kw):
    import copy

    from d2sd.models import build_drafter

    n = model.config.num_hidden_layers
    paths = []
    for name, d2, b in (("dflash", False, block_sizes[0]), ("vp", True, block_sizes[1])):
        cfg = model.config
        if d2 and vp_hidden is not None:  # a drafter made for another target
            cfg = copy.deepcopy(cfg)
            cfg.hidden_size = vp_hidden
        d = build_drafter(cfg, num_draft_layers=1, block_size=b, target_layer_ids=[0, n - 1],
                          enable_d2_feature=d2, backend="torch", **kw)
        if cfg is model.config:
            d.init_from_target(model)
        d.save_pretrained(str(tmp_path / name))
        paths.append(str(tmp_path / name))
    return paths


def test_cli_end_to_end_report_and_plot(tiny, tmp_path):
    from d2sd.assets import tiny_target_path
    from d2sd.eval import main

    model, _, _ = tiny
    dflash, vp = _save_drafters(model, tmp_path)
    data = tmp_path / "mini.jsonl"
    data.write_text(json.dumps({"prompt": "Tom has 3 apples . Tom gets 4 more apples . How many apples does Tom have now ?"})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "Anna has 9 pens ."},
                                                      {"role": "assistant", "content": "dropped"}]}) + "\n")
    report = tmp_path / "out" / "report.json"
    rc = main(["--target", str(tiny_target_path()), "--dflash", dflash, "--vp", vp, "--data", str(data),
               "--max-new-tokens", "10", "--k", "3", "--dtype", "float64", "--device", "cpu", "--report", str(report)])
    assert rc == 0
    rep = json.loads(report.read_text())
    check_report_schema(rep, datasets=["mini"])
    assert rep["lossless"] is True and rep["config"]["k"] == 3 and rep["config"]["block_size"] == 7
    assert all(r["kv_cache"] for r in rep["methods"].values()), "the tiny Qwen3 keeps its KV cache"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert report.with_suffix(".png").stat().st_size > 0


@pytest.mark.parametrize(
    "case, match",
    [("block", "block_size 7 but the VP drafter has block_size 5"), ("k", "--k must be < block size 7"),
     ("missing", "no config.json"), ("hidden", "does not fit this target: hidden_size 96 != target's 128")],
)
def test_cli_bad_drafters_exit_2(tiny, tmp_path, capsys, case, match):
    from d2sd.assets import tiny_target_path
    from d2sd.eval import main

    model, _, _ = tiny
    dflash, vp = _save_drafters(model, tmp_path, block_sizes=(7, 5) if case == "block" else (7, 7),
                                vp_hidden=96 if case == "hidden" else None)
    if case == "missing":
        vp = str(tmp_path / "nowhere")
    args = ["--target", str(tiny_target_path()), "--dflash", dflash, "--vp", vp, "--max-new-tokens", "4",
            "--num-prompts", "1", "--report", str(tmp_path / "r.json"), "--k", "7" if case == "k" else "3"]
    assert main(args) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_encode_prompt_formats(tiny):
    from d2sd.eval import encode_prompt

    _, tok, _ = tiny
    plain = encode_prompt(tok, "Tom has 3 apples .")
    assert encode_prompt(tok, {"prompt": "Tom has 3 apples ."}) == plain
    chat = {"messages": [{"role": "user", "content": "Tom has 3 apples ."}, {"role": "assistant", "content": "x"}]}
    assert encode_prompt(tok, chat) == plain, "a trailing assistant turn is dropped"
    sharegpt = {"conversations": [{"from": "human", "value": [{"type": "text", "text": "Tom has 3 apples ."}]}]}
    assert encode_prompt(tok, sharegpt) == plain
    assert tok.decode(plain).endswith("<|im_start|>assistant\n"), "generation prompt appended"
    with pytest.raises(ValueError, match="'prompt', 'messages' or 'conversations'"):
        encode_prompt(tok, {"text": "no"})


def test_embedded_drafters_are_reused_from_the_cache(tiny, tmp_path, monkeypatch):
    """A cached pair is loaded without training; the key changes with the training budget."""
    from d2sd import train
    from d2sd.assets import tiny_target_path
    from d2sd.eval import _training_corpus, build_parser, drafter_cache_dir, embedded_drafters

    model, tok, _ = tiny
    args = build_parser().parse_args(["--drafter-cache", str(tmp_path), "--train-prompts", "3", "--max-new-tokens", "8"])
    target = str(tiny_target_path())
    corpus = _training_corpus(args, target, model, tok)
    assert len(corpus.read_text().splitlines()) == 3
    saved = dict(zip(("dflash", "vp"), _save_drafters(model, tmp_path)))
    for name in ("dflash", "vp"):
        root = drafter_cache_dir(args, target, name, corpus)
        root.mkdir(parents=True)
        (root / "DONE").write_text(saved[name] + "\n")

    def no_training(argv):
        raise AssertionError(f"trained again: {argv}")

    monkeypatch.setattr(train, "main", no_training)
    assert embedded_drafters(args, target, model, tok) == (saved["dflash"], saved["vp"])
    longer = build_parser().parse_args(["--drafter-cache", str(tmp_path), "--train-steps", "7"])
    assert drafter_cache_dir(longer, target, "vp", corpus) != drafter_cache_dir(args, target, "vp", corpus)
