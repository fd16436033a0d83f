"""Greedy (temperature 0) speculative decoding with DFlash and D2SD drafters.

Three decoders share one loop (:func:`decode`): ``greedy`` (plain decoding, one target forward
per token), ``dflash`` and ``d2sd``. One speculative step, with ``n`` committed tokens and the
last committed token as the *anchor* (position ``a = n - 1``, not yet run through the target):

1. Draft. ``dflash``: one drafter block ``[anchor, MASK, ...]`` -> ``d_1 .. d_M`` with per-token
   confidence ``c_m = max softmax``. ``d2sd``: the same first draft, then the rejection-boundary
   score ``r(i) = (prod_{m<=i} c_m) * (1 - c_{i+1})`` (probability that exactly ``i`` drafted
   tokens are accepted, if acceptances were independent) ranks prefix lengths ``i in 0..B-2``;
   the top ``K`` become branches ``[anchor, d_1 .. d_i, MASK, ...]`` that the VP drafter fills in
   one batched call (``K`` blocks sharing the anchor).
2. Verify. The target runs all candidate rows ``[anchor, cand...]`` in one forward (the rows are
   a batch over a shared KV cache). The longest prefix of a candidate that matches the target's
   own greedy choices is accepted; the target's next token after it (the *bonus*) is committed
   too, so every step commits ``accepted + 1`` tokens and the output is exactly greedy decoding.
3. Keep. The KV cache keeps the winning row up to the committed tokens; the target's hidden
   states of the committed positions become drafter context (features at the drafter's
   ``target_layer_ids``, captured with ``d2sd.target.LayerCapture`` exactly as in training:
   id ``-1`` = embedding output, ``l >= 0`` = output of decoder layer ``l``).

Slot conventions: a drafter predicts the token at ``anchor + k + offset`` in slot ``k``, with
``offset = 0`` for D2/VP drafters and ``dflash_labels='same'``, ``offset = 1`` for DeepSpec's
``'shifted'`` labels. So a block of ``B`` slots drafts ``B - 1 + offset`` tokens.

Cost model, documented: the target keeps a KV cache (``use_cache=False`` recomputes the whole
prefix every step instead); the drafters recompute their context projection from the stored
target features every step (no drafter KV cache), which is honest but pessimistic for drafter
time on long outputs.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .models.families import text_config
from .target import LayerCapture

__all__ = [
    "METHODS",
    "label_offset",
    "rejection_scores",
    "rank_prefix_lengths",
    "check_drafters",
    "TargetVerifier",
    "SlotDrafter",
    "StepStats",
    "DecodeResult",
    "decode",
]

METHODS = ("greedy", "dflash", "d2sd")


def label_offset(config) -> int:
    """``0`` when slot ``k`` predicts the token at ``anchor + k`` (D2/VP, ``dflash_labels='same'``), ``1`` for ``'shifted'``."""
    if getattr(config, "enable_d2_feature", False):
        return 0
    labels = getattr(config, "dflash_labels", "shifted")
    if labels == "same":
        return 0
    if labels == "shifted":
        return 1
    raise ValueError(f"drafter config has dflash_labels={labels!r}; expected 'same' or 'shifted'")


def rejection_scores(conf: Sequence[float], max_prefix: int) -> list[float]:
    """``r(i) = (prod_{m<=i} c_m) * (1 - c_{i+1})`` for ``i = 0 .. max_prefix``.

    ``conf[j]`` is ``c_{j+1}``, the confidence of the ``(j+1)``-th drafted token; ``r(0) = 1 - c_1``.
    """
    c = [float(x) for x in conf]
    if max_prefix + 1 > len(c):
        raise ValueError(f"r(i) up to i={max_prefix} needs {max_prefix + 1} confidences, got {len(c)}")
    scores, run = [], 1.0
    for i in range(max_prefix + 1):
        scores.append(run * (1.0 - c[i]))
        run *= c[i]
    return scores


def rank_prefix_lengths(conf: Sequence[float], k: int, max_prefix: int) -> list[int]:
    """The ``k`` prefix lengths ``i in 0..max_prefix`` with the highest ``r(i)``, best first (ties: shorter first)."""
    scores = rejection_scores(conf, max_prefix)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return order[: max(0, int(k))]


def check_drafters(target_config, dflash=None, vp=None, k: Optional[int] = None) -> None:
    """Raise ``ValueError`` when a drafter does not fit the target or the two drafters disagree."""
    tc = text_config(target_config)
    vocab, hidden, n_layers = tc.vocab_size, tc.hidden_size, tc.num_hidden_layers
    for name, d in (("DFlash drafter", dflash), ("VP drafter", vp)):
        if d is None:
            continue
        c = d.config
        if c.target_hidden_size != hidden:
            raise ValueError(
                f"{name} was built for target hidden size {c.target_hidden_size}, "
                f"but the target has hidden_size {hidden}"
            )
        if c.vocab_size != vocab:
            raise ValueError(f"{name} has vocab_size {c.vocab_size}, but the target has vocab_size {vocab}")
        if not 0 <= int(c.mask_token_id) < vocab:
            raise ValueError(
                f"{name} mask_token_id {c.mask_token_id} is not a token id of the target (vocab {vocab})"
            )
        if int(c.block_size) < 2:
            raise ValueError(f"{name} block_size must be >= 2 to draft anything, got {c.block_size}")
        bad = [l for l in c.target_layer_ids if not -1 <= int(l) < n_layers]
        if bad:
            raise ValueError(
                f"{name} reads target layers {list(c.target_layer_ids)}, but the target has layers "
                f"-1..{n_layers - 1} (-1 = embeddings); bad: {bad}"
            )
        label_offset(c)
    if dflash is not None and vp is not None:
        bd, bv = int(dflash.config.block_size), int(vp.config.block_size)
        if bd != bv:
            raise ValueError(f"the DFlash drafter has block_size {bd} but the VP drafter has block_size {bv}; D2SD needs one block size")
    if k is not None:
        ref = vp if vp is not None else dflash
        if int(k) < 1:
            raise ValueError(f"--k must be >= 1, got {k}")
        if ref is not None and int(k) >= int(ref.config.block_size):
            raise ValueError(f"--k must be < block size {ref.config.block_size} (one branch per prefix length), got {k}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(module) -> torch.device:
    p = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def _model_dtype(module, default: torch.dtype) -> torch.dtype:
    p = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return p.dtype if p is not None else default


class TargetVerifier:
    """Runs the target: prefill, verify candidate rows over a shared KV cache, keep the winner.

    ``layer_ids``: target layers whose hidden states are returned as features ``[.., U, H]``
    (``U = len(self.layer_ids)``, sorted and unique). With ``use_cache=False`` (or when the cache is
    not a plain dynamic KV cache, e.g. sliding-window layers) every forward recomputes the prefix.
    """

    def __init__(self, model, layer_ids: Sequence[int] = (), use_cache: bool = True):
        self.model = model
        self.layer_ids = sorted({int(l) for l in layer_ids})
        self.use_cache = bool(use_cache)
        self.device = _model_device(model)
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.x names the cache argument ``cache``; older versions ``past_key_values``.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._cache = None
        self._prefix: list[int] = []

    def _forward(self, ids: torch.Tensor, cache, want_hidden: bool, last: int):
        """Logits ``[R, T, V]`` and features ``[R, last, U, H]`` of the last ``last`` positions (or None)."""
        kw = {"use_cache": cache is not None}
        if cache is not None:
            kw[self._cache_kw] = cache
        if not (want_hidden and self.layer_ids):
            return self.model(input_ids=ids, **kw).logits, None
        # The same hooks as training's feature extraction: the last layer's output is taken
        # before the final norm (HF's hidden_states[-1] is after it).
        with LayerCapture(self.model, self.layer_ids) as cap:
            logits = self.model(input_ids=ids, **kw).logits
        R, T = ids.shape
        feats = cap.features().view(R, T, len(self.layer_ids), -1)[:, -last:]
        return logits, feats

    def _plain_cache(self, cache) -> bool:
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(
            type(l).__name__ == "DynamicLayer" and getattr(l, "keys", None) is not None for l in layers
        )

    @torch.no_grad()
    def prefill(self, prompt: Sequence[int]) -> tuple[int, Optional[torch.Tensor]]:
        """Run the prompt; return the first greedy token and features ``[P, U, H]`` of the prompt."""
        ids = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)  # [1, P]
        cache = None
        if self.use_cache:
            from transformers import DynamicCache

            cache = DynamicCache()
        logits, feats = self._forward(ids, cache, True, ids.shape[1])
        if cache is not None and not self._plain_cache(cache):
            cache = None  # not croppable by slicing: fall back to recomputation
        self._cache = cache
        first = int(logits[0, -1].argmax())
        self._prefix = [*map(int, prompt), first]
        return first, (feats[0] if feats is not None else None)

    @property
    def cached(self) -> bool:
        return self._cache is not None

    @torch.no_grad()
    def verify(self, rows: torch.Tensor, want_hidden: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``rows [R, T]`` (``rows[:, 0]`` = the anchor, the last committed token) -> target greedy
        tokens ``[R, T]`` (``out[r, j]`` = the target's choice after ``rows[r, :j+1]``) and features
        ``[R, T, U, H]`` of the row positions."""
        R, T = rows.shape
        rows = rows.to(self.device)
        if self._cache is not None:
            for layer in self._cache.layers:  # [1, Hkv, n-1, D] -> [R, Hkv, n-1, D], no copy
                layer.keys = layer.keys.expand(R, -1, -1, -1)
                layer.values = layer.values.expand(R, -1, -1, -1)
            logits, feats = self._forward(rows, self._cache, want_hidden, T)
        else:
            prefix = torch.tensor(self._prefix[:-1], dtype=torch.long, device=self.device)
            full = torch.cat([prefix.expand(R, -1), rows], dim=1)  # [R, n-1+T]
            logits, feats = self._forward(full, None, want_hidden, T)
        return logits[:, -T:].argmax(dim=-1), feats  # [R, T], [R, T, U, H]

    def keep(self, row: int, committed: Sequence[int]) -> None:
        """Keep verify row ``row``; ``committed`` = the tokens appended to the sequence (accepted + bonus)."""
        self._prefix.extend(committed)
        if self._cache is not None:
            n_kv = len(self._prefix) - 1  # every committed token but the newest is in the cache
            for layer in self._cache.layers:
                layer.keys = layer.keys[row : row + 1, :, :n_kv]
                layer.values = layer.values[row : row + 1, :, :n_kv]


class SlotDrafter:
    """A drafter plus its slot convention and the columns of the target features it reads."""

    def __init__(self, drafter, feature_layers: Sequence[int]):
        self.drafter = drafter
        c = drafter.config
        self.block_size = int(c.block_size)
        self.mask_token_id = int(c.mask_token_id)
        self.offset = label_offset(c)
        self.layer_index = [list(feature_layers).index(int(l)) for l in c.target_layer_ids]
        self.dtype = _model_dtype(drafter, torch.float32)
        self.device = _model_device(drafter)

    @torch.no_grad()
    def logits(self, feats: torch.Tensor, anchor_pos: int, blocks: torch.Tensor) -> torch.Tensor:
        """``feats [a, U, H]`` (target features of positions ``< anchor``), ``blocks [K, B]`` -> ``[K, B, V]``."""
        K = blocks.shape[0]
        ctx = feats[:, self.layer_index].flatten(1)[None].to(self.device, self.dtype)  # [1, a, L*H]
        anchors = torch.full((1, K), anchor_pos, dtype=torch.long, device=self.device)
        out = self.drafter.draft_logits(ctx, anchors, blocks[None].to(self.device))
        return out[0].float()

    def block(self, anchor_tok: int, visible: Sequence[int]) -> list[int]:
        """Input ids of one block: anchor, the visible drafted tokens, then masks."""
        ids = [int(anchor_tok), *map(int, visible)]
        return ids + [self.mask_token_id] * (self.block_size - len(ids))


@dataclass
class StepStats:
    accepted: int  # drafted tokens the target accepted (the bonus token not included)
    drafted: int  # length of the winning candidate
    winner: int  # -1: main draft (or greedy); i >= 0: the D2SD branch with prefix length i
    rows: int  # candidate rows verified in the target forward
    draft_s: float
    target_s: float


@dataclass
class DecodeResult:
    prompt_len: int
    tokens: list[int]  # generated tokens (prompt excluded), truncated at max_new_tokens / EOS
    steps: list[StepStats] = field(default_factory=list)
    prefill_s: float = 0.0
    total_s: float = 0.0
    kv_cache: bool = False  # whether the target's KV cache was kept (else: prefix recomputed per forward)


def _match_len(cand: Sequence[int], greedy: Sequence[int]) -> int:
    m = 0
    while m < len(cand) and int(cand[m]) == int(greedy[m]):
        m += 1
    return m


def _dflash_draft(d: SlotDrafter, feats, a: int, anchor_tok: int) -> tuple[list[int], list[float]]:
    logits = d.logits(feats, a, torch.tensor([d.block(anchor_tok, [])]))[0]  # [B, V]
    # slot k predicts position a + k + offset: drafted token m (position a + m) is in slot m - offset
    probs = torch.softmax(logits[1 - d.offset :], dim=-1)  # [M, V]
    conf, tok = probs.max(dim=-1)
    return tok.tolist(), conf.tolist()


def _vp_branches(
    vp: SlotDrafter, feats, a: int, anchor_tok: int, draft: list[int], prefixes: list[int], distinct: bool
) -> list[list[int]]:
    blocks = torch.tensor([vp.block(anchor_tok, draft[:i]) for i in prefixes])  # [K, B]
    logits = vp.logits(feats, a, blocks)  # [K, B, V]
    if distinct:
        # branch i exists for the case "d_{i+1} is rejected": never propose d_{i+1} again there
        for r, i in enumerate(prefixes):
            logits[r, i + 1 - vp.offset, draft[i]] = float("-inf")
    tok = logits.argmax(dim=-1).tolist()  # [K, B]
    # branch i: d_1..d_i, then the VP's tokens at positions a+i+1 .. a+B-1+offset
    return [draft[:i] + tok[r][i + 1 - vp.offset :] for r, i in enumerate(prefixes)]


def decode(
    verifier: TargetVerifier,
    prompt: Sequence[int],
    *,
    method: str,
    max_new_tokens: int,
    dflash: Optional[SlotDrafter] = None,
    vp: Optional[SlotDrafter] = None,
    k: int = 4,
    eos_token_ids: Sequence[int] = (),
    distinct_branches: bool = False,
) -> DecodeResult:
    """Greedy-decode ``prompt`` with ``method`` in ``METHODS``; the tokens equal plain greedy decoding.

    ``distinct_branches`` (D2SD): a branch at prefix ``i`` may not repeat the first draft's token
    ``d_{i+1}`` at its first masked slot (it covers the case where ``d_{i+1}`` is rejected).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method in ("dflash", "d2sd") and dflash is None:
        raise ValueError(f"method {method!r} needs a DFlash drafter")
    if method == "d2sd" and vp is None:
        raise ValueError("method 'd2sd' needs a VP drafter")
    if len(prompt) < 2 and method != "greedy":
        raise ValueError("speculative decoding needs a prompt of at least 2 tokens (drafter context)")
    eos = {int(t) for t in eos_token_ids}
    dev = verifier.device
    res = DecodeResult(prompt_len=len(prompt), tokens=[])
    t0 = time.perf_counter()
    first, feats = verifier.prefill(prompt)
    _sync(dev)
    res.prefill_s = time.perf_counter() - t0
    res.kv_cache = verifier.cached
    res.tokens.append(first)
    # feats [n-1, U, H]: target features of every committed position except the newest token
    while len(res.tokens) < max_new_tokens and res.tokens[-1] not in eos:
        a = len(prompt) + len(res.tokens) - 1  # anchor position
        anchor_tok = res.tokens[-1]
        ts = time.perf_counter()
        winners = [-1]
        if method == "greedy":
            cands = [[]]
        else:
            draft, conf = _dflash_draft(dflash, feats, a, anchor_tok)
            cands = [draft]
            if method == "d2sd":
                max_prefix = min(vp.block_size - 2, len(conf) - 1)
                prefixes = rank_prefix_lengths(conf, k, max_prefix)
                for i, c in zip(prefixes, _vp_branches(vp, feats, a, anchor_tok, draft, prefixes, distinct_branches)):
                    if c not in cands:  # an identical candidate cannot win: do not verify it twice
                        cands.append(c)
                        winners.append(i)
        _sync(dev)
        tv = time.perf_counter()
        width = max(len(c) for c in cands)
        # pad short candidates with their last token; padding is never matched (capped by length)
        rows = torch.tensor([[anchor_tok, *c] + [(c or [anchor_tok])[-1]] * (width - len(c)) for c in cands])
        greedy, step_feats = verifier.verify(rows, want_hidden=method != "greedy")
        greedy = greedy.tolist()
        matches = [_match_len(c, g) for c, g in zip(cands, greedy)]
        best = max(range(len(cands)), key=lambda r: (matches[r], -r))
        m = matches[best]
        committed = cands[best][:m] + [greedy[best][m]]
        verifier.keep(best, committed)
        if step_feats is not None:
            feats = torch.cat([feats, step_feats[best, : m + 1]], dim=0)
        _sync(dev)
        te = time.perf_counter()
        res.steps.append(StepStats(m, len(cands[best]), winners[best], len(cands), tv - ts, te - tv))
        res.tokens.extend(committed)
        if eos.intersection(committed):
            break
    res.total_s = time.perf_counter() - t0
    out = res.tokens[:max_new_tokens]
    for j, t in enumerate(out):
        if t in eos:
            out = out[: j + 1]
            break
    res.tokens = out
    return res
