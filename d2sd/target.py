"""The frozen target model: loading, hidden-state features for the drafter, greedy generation.

Layer ids follow docs/semantics.md (and DeepSpec's ``target_extract``): ``-1`` is the embedding output,
``l >= 0`` is the output of decoder layer ``l``. For ``l < num_hidden_layers - 1`` that is Hugging
Face's ``hidden_states[l + 1]``; for the last layer Hugging Face applies the final norm to
``hidden_states[-1]`` while we return the raw layer output, as DeepSpec's forward hooks do.
Features are captured with forward hooks, so the backbone runs without the lm_head (no
``[S, V]`` logits) and stops after the deepest requested layer.

    model, tok = load_target(tiny_target_path())
    h = target_hidden_states(model, input_ids, layer_ids=[0, 2])      # [Bt, S, 2 * H]
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

HF_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                  "pytorch_model.bin.index.json")


def resolve_model(name_or_path) -> str:
    """A local folder as given, else a Hugging Face Hub id (``org/name``, optionally ``@revision``)
    resolved through huggingface_hub: downloaded when online, read from the local Hub cache when
    ``HF_HUB_OFFLINE=1`` (or when the Hub is unreachable and the snapshot is cached)."""
    path = os.path.expanduser(os.fspath(name_or_path))
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        return path
    repo_id, _, revision = path.partition("@")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, revision=revision or None)
    except Exception as e:  # not found, offline without a cached snapshot, gated...
        raise FileNotFoundError(f"{path!r} is not a local folder, and as a Hugging Face Hub id it did not resolve: "
                                f"{type(e).__name__}: {e}") from None


def _check_model_dir(path) -> str:
    path = resolve_model(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"target model path does not exist: {path!r}")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"target model path is not a directory: {path!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} is not a Hugging Face model directory: no config.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in HF_MODEL_FILES):
        raise ValueError(f"{path!r} has a config.json but no weights (looked for {', '.join(HF_MODEL_FILES)})")
    return path


def load_causal_lm(path, dtype="auto"):
    """``AutoModelForCausalLM.from_pretrained``; a damaged or truncated weight file is a ValueError naming it."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = _check_model_dir(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (SafetensorError, OSError, RuntimeError, EOFError) as e:
        raise ValueError(f"cannot read the target weights in {path!r} (damaged or truncated file?): {e}") from None


def load_target(path, device="cpu", dtype: torch.dtype | None = None):
    """Load an HF causal LM + its tokenizer: frozen, eval mode, on ``device``.

    ``dtype`` defaults to bfloat16 on CUDA and float32 elsewhere. Returns ``(model, tokenizer)``.
    ``path`` may be a Hub id (see ``resolve_model``). Raises FileNotFoundError / ValueError with the
    path when it is not an HF model directory.
    """
    from transformers import AutoTokenizer

    path = _check_model_dir(path)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_causal_lm(path, dtype)
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def find_backbone(model):
    """The decoder stack (``.layers``, ``.embed_tokens``) of a CausalLM or a bare backbone."""
    for candidate in (getattr(model, "model", None), model):
        if candidate is None:
            continue
        if hasattr(candidate, "language_model") and not hasattr(candidate, "layers"):
            candidate = candidate.language_model
        if hasattr(candidate, "layers") and hasattr(candidate, "embed_tokens"):
            return candidate
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")


def num_target_layers(model) -> int:
    return len(find_backbone(model).layers)


def validate_layer_ids(layer_ids: Iterable[int], num_layers: int) -> list[int]:
    """``layer_ids`` as ints, each in ``[-1, num_layers - 1]`` (ValueError otherwise)."""
    if layer_ids is None:
        raise ValueError("layer_ids is required (e.g. the drafter config's target_layer_ids)")
    ids = [int(i) for i in layer_ids]
    if not ids:
        raise ValueError("layer_ids must not be empty")
    bad = [i for i in ids if not -1 <= i < num_layers]
    if bad:
        raise ValueError(f"layer ids {bad} out of range: the target has {num_layers} decoder layers "
                         f"(valid ids: -1 = embeddings, 0..{num_layers - 1})")
    return ids


def default_layer_ids(num_layers: int, count: int = 3) -> list[int]:
    """``count`` decoder layers spread from the first to the last (DFlash-style spread)."""
    count = max(1, min(count, num_layers))
    if count == 1:
        return [num_layers // 2]
    return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})


class _Stop(Exception):
    """Raised from the hook of the deepest requested layer: the rest of the forward is not needed."""


class LayerCapture:
    """Forward hooks that record the chosen layers' outputs during any forward of ``model``.

        with LayerCapture(model, [0, 2]) as cap:
            model(input_ids)                   # any forward: prefill, cached decode steps, ...
        h = cap.features()                     # [Bt, S, 2 * H], layer order as given

    Use it wherever target features are needed (training cache, speculative verification) so
    every caller gets exactly the same tensors as :func:`target_hidden_states`.
    """

    def __init__(self, model, layer_ids: Sequence[int], stop_after_last: bool = False):
        self.backbone = find_backbone(model)
        self.layer_ids = validate_layer_ids(layer_ids, len(self.backbone.layers))
        self.stop_after_last = stop_after_last
        self.captured: dict[int, torch.Tensor] = {}
        self._handles = []

    def _hook(self, layer_id: int):
        deepest = max(self.layer_ids)

        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            self.captured[layer_id] = out.detach()
            if self.stop_after_last and layer_id == deepest and len(self.captured) == len(set(self.layer_ids)):
                raise _Stop

        return hook

    def __enter__(self):
        for layer_id in sorted(set(self.layer_ids)):
            module = self.backbone.embed_tokens if layer_id < 0 else self.backbone.layers[layer_id]
            self._handles.append(module.register_forward_hook(self._hook(layer_id)))
        return self

    def __exit__(self, exc_type, exc, tb):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return exc_type is _Stop

    def features(self) -> torch.Tensor:
        missing = [i for i in self.layer_ids if i not in self.captured]
        if missing:
            raise RuntimeError(f"layers {missing} were not captured: run a forward inside the `with` block")
        return torch.cat([self.captured[i] for i in self.layer_ids], dim=-1)


@torch.no_grad()
def target_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         layer_ids: Sequence[int] | None = None) -> torch.Tensor:
    """Target features ``[Bt, S, L*H]``: the chosen layers' hidden states, concatenated in order.

    ``input_ids [Bt, S]`` long; ``attention_mask [Bt, S]`` (1 = real token, right padding) or None.
    Runs only the decoder stack, up to the deepest requested layer. Output dtype = model dtype.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [Bt, S], got shape {tuple(input_ids.shape)}")
    backbone = find_backbone(model)
    cap = LayerCapture(model, layer_ids, stop_after_last=True)
    with cap:
        backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return cap.features()


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
             batch_size: int = 32) -> list[str]:
    """Greedy answers to user ``prompts`` (one user turn each, through the chat template)."""
    chats = [[{"role": "user", "content": p}] for p in prompts]
    return [t.strip() for t in generate_chat(model, tokenizer, chats, max_new_tokens, batch_size)]


@torch.no_grad()
def generate_chat(model, tokenizer, chats: Sequence[list[dict]], max_new_tokens: int = 64, batch_size: int = 32,
                  temperature: float = 0.0, top_p: float | None = None, seed: int | None = None,
                  template_kwargs: dict | None = None) -> list[str]:
    """The target's next assistant turn for each chat (message lists), batched: greedy when
    ``temperature`` is 0, else sampled (``top_p``; ``seed`` for reproducibility). Returns the raw
    decoded text (special tokens dropped; a reasoning block such as ``<think>...</think>`` kept)."""
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right: prompts must end aligned
    sampling = dict(do_sample=False) if not temperature else dict(do_sample=True, temperature=float(temperature),
                                                                  top_p=top_p, top_k=0)
    if seed is not None:
        torch.manual_seed(seed)
    texts = []
    try:
        for i in range(0, len(chats), batch_size):
            chunk = [tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True,
                                                   **(template_kwargs or {}))
                     for c in chats[i:i + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
            new = out[:, enc["input_ids"].shape[1]:]
            texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return texts
