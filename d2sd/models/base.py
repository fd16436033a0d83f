"""The drafter skeleton shared by every layer family (Qwen3, Gemma4).

Layout (DeepSpec's DFlash drafter, docs/semantics.md "Drafter"): frozen ``embed_tokens`` and ``lm_head``
copied from the target; ``fc: Linear(L*H -> H)`` and ``hidden_norm`` turn the target features into
the context; ``layers`` attend from the draft slots to [context ; own block]; final ``norm``.
A family subclass provides the RMSNorm class, the decoder layer and the rotary frequencies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import d2kernels
from d2kernels import layout

from ..config import DrafterConfig
from .checkpoint import load_drafter, save_drafter

__all__ = ["DraftAttention", "Drafter", "DrafterOutput", "apply_rope", "kernel_dtype", "rope_cos_sin"]




@dataclass
class DrafterOutput:
    """Result of one training forward.

    ``loss_num`` (0-dim, differentiable) = Σ w·CE and ``loss_den`` (0-dim) = Σ w over this rank's
    slots; the loss is ``loss_num / (global loss_den + 1e-6)``. ``correct_per_slot`` /
    ``count_per_slot`` ``[B]`` long: argmax hits and supervised slots per block position.
    """

    loss_num: torch.Tensor
    loss_den: torch.Tensor
    correct_per_slot: torch.Tensor
    count_per_slot: torch.Tensor
    anchors: torch.Tensor  # [Bt, N] long
    keep: torch.Tensor  # [Bt, N] bool
    prefix_lens: torch.Tensor  # [Bt, N] long

    @property
    def loss(self) -> torch.Tensor:
        """The local weighted mean (single process; use the global den under data parallelism)."""
        return self.loss_num / (self.loss_den + 1e-6)


def rope_cos_sin(inv_freq: torch.Tensor, scaling: float, positions: torch.Tensor, dtype: torch.dtype):
    """``positions [..., T]`` -> ``cos, sin [..., T, D]`` (fp32 angles, cast to ``dtype`` like HF)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device, torch.float32)  # [..., T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def kernel_dtype(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast attention inputs to one dtype: under autocast the norms return fp32 while the projections
    return the autocast dtype, and ``varprefix_attention`` takes a single dtype (the autocast one)."""
    dev = ts[0].device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else ts[0].dtype
    return tuple(t.to(dt) for t in ts)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [Bt, T, heads, D]``, ``cos/sin [Bt or 1, T, D]`` -> rotated ``x`` (rotate-half convention)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class Drafter(nn.Module):
    """A DFlash / D2SD (variable-prefix) drafter. Build with ``d2sd.models.build_drafter``."""

    def __init__(self, config: DrafterConfig):
        super().__init__()
        config.validate()
        self.config = config
        H, V = config.hidden_size, config.vocab_size
        self.embed_tokens = nn.Embedding(V, H)
        self.fc = nn.Linear(config.num_target_features * H, H, bias=False)
        self.hidden_norm = self.make_norm(H)
        self.layers = nn.ModuleList(self.make_layer(i) for i in range(config.num_draft_layers))
        self.norm = self.make_norm(H)
        self.lm_head = nn.Linear(H, V, bias=False)
        with torch.device("cpu"):  # real values even under a meta / cuda default-device context
            self.inv_freq, self.rope_scaling = self.rope_frequencies()
        self.reset_parameters()
        self.freeze_target_parts()

    # -- family hooks -----------------------------------------------------------------------
    def make_norm(self, dim: int) -> nn.Module:
        raise NotImplementedError

    def make_layer(self, idx: int) -> nn.Module:
        raise NotImplementedError

    def rope_frequencies(self) -> tuple[torch.Tensor, float]:
        """``(inv_freq [D/2] float32, attention_scaling)`` of the draft layers' RoPE."""
        raise NotImplementedError

    # -- parameters -------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """HF-style init: linears and embeddings N(0, std), norm weights 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif m is not self and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight.fill_(1.0)

    def freeze_target_parts(self) -> None:
        self.embed_tokens.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from_target(self, target_model: nn.Module) -> "Drafter":
        """Copy the target's input embeddings and lm_head into the drafter and freeze them.

        The copies keep the target's dtype (bf16 for a bf16 target), whatever the trainable
        weights' dtype: the frozen parts are never trained, and the fused cross-entropy and the
        noise embedding then run on their bf16 paths instead of on an fp32 copy.
        """
        emb = target_model.get_input_embeddings().weight
        head = target_model.get_output_embeddings()
        head = emb if head is None else head.weight
        for name, src in (("embed_tokens", emb), ("lm_head", head)):
            module = getattr(self, name)
            if tuple(src.shape) != tuple(module.weight.shape):
                raise ValueError(
                    f"target {name} is {tuple(src.shape)} but the drafter expects {tuple(module.weight.shape)} "
                    f"(vocab_size={self.config.vocab_size}, hidden_size={self.config.hidden_size})"
                )
            module.weight = nn.Parameter(src.detach().to(module.weight.device).clone(), requires_grad=False)
        self.freeze_target_parts()
        return self

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the layers compute in: the autocast dtype when autocast is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.fc.weight.dtype

    def compile_layers(self, **compile_kwargs) -> "Drafter":
        """``torch.compile`` each decoder layer (the d2kernels ops stay opaque custom ops inside).

        The layers share one code object, so one compile serves all of them; ``_run_layers`` marks
        the sequence length dynamic, so a new length does not recompile.
        """
        for layer in self.layers:
            layer.compile(**compile_kwargs)
        return self

    # -- shared computation -----------------------------------------------------------------
    def _context(self, target_hidden: torch.Tensor) -> torch.Tensor:
        """``target_hidden [Bt, S, L*H]`` -> ``ctx [Bt, S, H]`` = hidden_norm(fc(target_hidden))."""
        want = self.fc.in_features
        if target_hidden.dim() != 3 or target_hidden.shape[-1] != want:
            raise ValueError(
                f"target_hidden must be [Bt, S, L*H] with L*H = {len(self.config.target_layer_ids)}*"
                f"{self.config.hidden_size} = {want}, got {tuple(target_hidden.shape)}"
            )
        # Under autocast fc runs in the autocast dtype anyway: no fp32 copy of the [S, L*H] features.
        return self.hidden_norm(self.fc(target_hidden.to(self.compute_dtype(target_hidden.device))))

    def _run_layers(self, x, ctx, anchors, keep, block_size):
        """``x [Bt, N*B, H]`` draft states, ``ctx [Bt, S, H]`` -> final normed states ``[Bt, N*B, H]``."""
        Bt, S = ctx.shape[:2]
        # Sequence lengths vary from batch to batch: compiled layers take S as a symbol, not a constant.
        torch._dynamo.maybe_mark_dynamic(ctx, 1)
        pos_ctx = torch.arange(S, device=ctx.device)[None]  # [1, S]
        pos_draft = layout.draft_positions(anchors, block_size)  # [Bt, N*B]
        inv_freq = self._inv_freq_on(ctx.device)
        rope_ctx = rope_cos_sin(inv_freq, self.rope_scaling, pos_ctx, x.dtype)
        for t in rope_ctx:
            torch._dynamo.maybe_mark_dynamic(t, 1)
        rope_draft = rope_cos_sin(inv_freq, self.rope_scaling, pos_draft, x.dtype)
        # The anchors' sort (and range check), once per forward for every layer's attention.
        lay = d2kernels.varprefix_layout(anchors, keep, block_size=block_size, seq_len=S, backend=self.config.backend)
        for layer in self.layers:
            x = layer(x, ctx, rope_draft, rope_ctx, anchors, keep, block_size, lay)
        return self.norm(x)

    def _inv_freq_on(self, device: torch.device) -> torch.Tensor:
        """fp32 RoPE frequencies on ``device``, copied once per device (not a buffer: .to(bf16) must not round them)."""
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq

    def _scale_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.embed_scale != 1.0:
            # Scale in the embedding dtype, as the target's scaled embedding does.
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype, device=x.device)
        return x

    # -- training forward -------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        target_hidden: torch.Tensor,
        loss_mask: torch.Tensor,
        *,
        anchors: Optional[torch.Tensor] = None,
        keep: Optional[torch.Tensor] = None,
        prefix_lens: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> DrafterOutput:
        """One training forward; never materializes ``[tokens, vocab]`` logits.

        Args:
            input_ids: ``[Bt, S]`` long. target_hidden: ``[Bt, S, L*H]``. loss_mask: ``[Bt, S]``.
            anchors, keep: ``[Bt, N]``; drawn with ``layout.sample_anchors`` when None
                (``keep`` defaults to all True when only anchors are given).
            prefix_lens: ``[Bt, N]`` visible-prefix lengths; default: drawn per block in D2 mode,
                1 in DFlash mode.
            generator: seeds the anchor / prefix-length draws.
        """
        cfg = self.config
        B = cfg.block_size
        if input_ids.dim() != 2 or loss_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and loss_mask must both be [Bt, S], got {tuple(input_ids.shape)} and {tuple(loss_mask.shape)}"
            )
        if target_hidden.shape[:2] != input_ids.shape:
            raise ValueError(
                f"target_hidden {tuple(target_hidden.shape)} must be [Bt, S, L*H] with [Bt, S] = {tuple(input_ids.shape)}"
            )
        if anchors is None:
            anchors, keep = layout.sample_anchors(loss_mask, cfg.num_anchors, generator=generator)
        elif keep is None:
            keep = torch.ones(anchors.shape, dtype=torch.bool, device=anchors.device)
        keep = keep.bool()
        if prefix_lens is None:
            if cfg.enable_d2_feature:
                prefix_lens = layout.sample_prefix_lengths(keep, B, cfg.d2_prefix_weight_base, generator=generator)
            else:
                prefix_lens = torch.ones(anchors.shape, dtype=torch.long, device=anchors.device)

        x = d2kernels.noise_embedding(
            self.embed_tokens.weight, input_ids, anchors, keep, prefix_lens,
            block_size=B, mask_token_id=cfg.mask_token_id, backend=cfg.backend,
        )  # [Bt, N*B, H]
        x = self._scale_embeddings(x)
        ctx = self._context(target_hidden)  # [Bt, S, H]
        Bt, N = anchors.shape
        # noise_embedding above checked input_ids (the supervised labels are among them) and the
        # anchors once: the targets, layers and loss skip their own checks and the host syncs they cost.
        with d2kernels.validation("off"):
            labels, eval_mask, offsets = layout.draft_targets(
                input_ids, loss_mask, anchors, keep, prefix_lens, B, same_position=cfg.same_position_labels
            )  # each [Bt, N, B]
            h = self._run_layers(x, ctx, anchors, keep, B)  # [Bt, N*B, H]
            # Under autocast the final norm returns fp32: meet the lm_head in its own dtype (bf16 on GPU).
            h = h.to(self.lm_head.weight.dtype)
            num, den, correct = d2kernels.decayed_cross_entropy(
                h.view(Bt, N, B, -1), self.lm_head.weight, labels, eval_mask, offsets,
                gamma=cfg.loss_decay_gamma, softcap=cfg.final_logit_softcapping,
                return_correct=True, backend=cfg.backend,
            )
        return DrafterOutput(
            loss_num=num,
            loss_den=den.detach(),
            correct_per_slot=correct.long().sum(dim=(0, 1)),
            count_per_slot=eval_mask.long().sum(dim=(0, 1)),
            anchors=anchors,
            keep=keep,
            prefix_lens=prefix_lens,
        )

    # -- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def draft_logits(self, target_hidden: torch.Tensor, anchors: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """Logits of every slot of ``K`` blocks, as the caller built them.

        Args:
            target_hidden: ``[Bt, S_ctx, L*H]`` target features of the accepted context.
            anchors: ``[Bt, K]`` long, each in ``[0, S_ctx]``; blocks may share an anchor (D2SD branches).
            block_ids: ``[Bt, K, B]`` long: anchor token + visible prefix tokens + mask ids.
        Block ``k`` sees context positions ``j < anchors[:, k]`` and its own ``B`` slots; slot ``i``
        sits at position ``anchors[:, k] + i``. Returns ``[Bt, K, B, V]`` float32.
        """
        if anchors.dim() != 2 or block_ids.dim() != 3 or block_ids.shape[:2] != anchors.shape:
            raise ValueError(
                f"anchors must be [Bt, K] and block_ids [Bt, K, B], got {tuple(anchors.shape)} and {tuple(block_ids.shape)}"
            )
        Bt, K, B = block_ids.shape
        S_ctx = target_hidden.shape[1]
        if anchors.numel() and (int(anchors.min()) < 0 or int(anchors.max()) > S_ctx):
            raise ValueError(f"anchors must lie in [0, S_ctx={S_ctx}], got {anchors.tolist()}")
        ctx = self._context(target_hidden)  # [Bt, S_ctx, H]
        # The kernels want anchor < S; padded rows sit at j >= anchor, so no block ever sees them.
        if S_ctx == 0 or int(anchors.max()) >= S_ctx:
            ctx = torch.nn.functional.pad(ctx, (0, 0, 0, int(anchors.max()) + 1 - S_ctx))
        keep = torch.ones(anchors.shape, dtype=torch.bool, device=anchors.device)
        x = self._scale_embeddings(self.embed_tokens(block_ids.reshape(Bt, K * B)))  # [Bt, K*B, H]
        h = self._run_layers(x, ctx, anchors.long(), keep, B)
        logits = self.lm_head(h).float().view(Bt, K, B, -1)
        c = self.config.final_logit_softcapping
        if c is not None:
            logits = c * torch.tanh(logits / c)
        return logits

    # -- checkpoints ------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str, format: str = "deepspec") -> None:
        """Write ``config.json`` + ``model.safetensors``.

        ``format="deepspec"``: DeepSpec's ``Qwen3DSparkModel`` / ``Gemma4DSparkModel`` checkpoint (its
        ``from_pretrained`` loads it), every weight under the state-dict names of docs/semantics.md, our training rule alongside.
        ``format="dflash"``: the z-lab/SpecForge ``DFlashDraftModel`` layout (no embed_tokens / lm_head).
        """
        save_drafter(self, save_directory, format=format)

    @classmethod
    def from_pretrained(cls, path: str, target: Optional[nn.Module] = None, **kwargs) -> "Drafter":
        """Load a drafter folder written by ``save_pretrained`` (either format); see ``load_drafter``."""
        return load_drafter(path, target=target, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"type={c.model_type}, layers={c.num_draft_layers}, block={c.block_size}, "
            f"target_layers={c.target_layer_ids}, d2={c.enable_d2_feature}"
        )


class DraftAttention(nn.Module):
    """q from draft states, k/v from [context ; draft states]; per-head q/k RMSNorm (and the
    family's v norm), RoPE at the slots' and context positions, then ``varprefix_attention``."""

    def __init__(self, cfg: DrafterConfig, norm_cls, v_norm: Optional[nn.Module] = None):
        super().__init__()
        H, D = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, D
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else D**-0.5
        self.backend = cfg.backend
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=bias)
        self.q_norm = norm_cls(D, eps=cfg.rms_norm_eps)
        self.k_norm = norm_cls(D, eps=cfg.rms_norm_eps)
        self.v_norm = v_norm if v_norm is not None else nn.Identity()

    def _kv(self, h: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """``h [Bt, T, H]`` -> ``k, v [Bt, T, Hkv, D]``."""
        Bt, T, _ = h.shape
        k = apply_rope(self.k_norm(self.k_proj(h).view(Bt, T, self.num_kv_heads, self.head_dim)), *rope)
        v = self.v_norm(self.v_proj(h).view(Bt, T, self.num_kv_heads, self.head_dim))
        return k, v

    def forward(self, x, ctx, rope_draft, rope_ctx, anchors, keep, block_size, layout=None):
        """``x [Bt, NB, H]`` draft states, ``ctx [Bt, S, H]`` context -> ``[Bt, NB, H]``;
        ``layout``: the step's ``d2kernels.varprefix_layout`` (shared by every layer)."""
        Bt, NB, _ = x.shape
        q = apply_rope(self.q_norm(self.q_proj(x).view(Bt, NB, self.num_heads, self.head_dim)), *rope_draft)
        k_draft, v_draft = self._kv(x, rope_draft)  # [Bt, NB, Hkv, D]
        k_ctx, v_ctx = self._kv(ctx, rope_ctx)  # [Bt, S, Hkv, D]
        q, k_ctx, v_ctx, k_draft, v_draft = kernel_dtype(q, k_ctx, v_ctx, k_draft, v_draft)
        o = d2kernels.varprefix_attention(
            q, k_ctx, v_ctx, k_draft, v_draft, anchors, keep,
            block_size=block_size, scale=self.scale, backend=self.backend, layout=layout,
        )  # [Bt, NB, Hq, D]
        return self.o_proj(o.reshape(Bt, NB, self.num_heads * self.head_dim))
