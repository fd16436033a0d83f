"""``format="deepspec"`` is DeepSpec's own checkpoint, both ways, without depending on DeepSpec.

DeepSpec's side is written out here from its public conventions: the draft config is the target's
config with ``architectures: ["Qwen3DSparkModel"]``, ``num_hidden_layers`` = draft layers and the
DSpark fields its ``__init__`` requires; the model is a ``Qwen3PreTrainedModel`` named
``Qwen3DSparkModel`` with DeepSpec's module names, a dense-mask attention and its shifted-label,
decayed CE. ``save_pretrained`` / ``from_pretrained`` are the transformers ones DeepSpec inherits.
"""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3PreTrainedModel, Qwen3RMSNorm, Qwen3RotaryEmbedding

from d2sd.models import build_drafter, load_drafter

DSPARK_REQUIRED = ("target_layer_ids", "mask_token_id", "num_anchors", "enable_confidence_head", "markov_rank")
GAMMA = 4.0


def target_config():
    return Qwen3Config(hidden_size=32, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       intermediate_size=40, vocab_size=29, pad_token_id=0)


def deepspec_draft_config(tc, num_draft_layers=2, block_size=4, target_layer_ids=(1, 3), mask_token_id=28):
    """What DeepSpec's ``build_draft_config`` makes of a Qwen3 target config (plain DFlash: no heads)."""
    c = copy.deepcopy(tc)
    c.architectures = ["Qwen3DSparkModel"]
    c.num_target_layers = tc.num_hidden_layers
    c.num_hidden_layers = num_draft_layers
    c.block_size = block_size
    c.tie_word_embeddings = False
    c.layer_types = ["full_attention"] * num_draft_layers
    c.mask_token_id = mask_token_id
    c.target_layer_ids = list(target_layer_ids)
    c.num_anchors = 3
    c.enable_confidence_head = False
    c.markov_rank = 0
    return c


class DSparkAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        D, H = c.head_dim, c.hidden_size
        self.nh, self.nkv, self.d = c.num_attention_heads, c.num_key_value_heads, D
        self.q_proj = nn.Linear(H, self.nh * D, bias=False)
        self.k_proj = nn.Linear(H, self.nkv * D, bias=False)
        self.v_proj = nn.Linear(H, self.nkv * D, bias=False)
        self.o_proj = nn.Linear(self.nh * D, H, bias=False)
        self.q_norm = Qwen3RMSNorm(D, eps=c.rms_norm_eps)
        self.k_norm = Qwen3RMSNorm(D, eps=c.rms_norm_eps)

    def forward(self, x, ctx, cos, sin, mask):
        Bt, T, _ = x.shape
        kv_in = torch.cat([ctx, x], dim=1)
        q = self.q_norm(self.q_proj(x).view(Bt, T, self.nh, self.d)).transpose(1, 2)
        k = self.k_norm(self.k_proj(kv_in).view(Bt, -1, self.nkv, self.d)).transpose(1, 2)
        v = self.v_proj(kv_in).view(Bt, -1, self.nkv, self.d).transpose(1, 2)

        def rot(t, c, s):
            h = t.shape[-1] // 2
            return t * c[:, None] + torch.cat([-t[..., h:], t[..., :h]], -1) * s[:, None]

        q, k = rot(q, cos[:, -T:], sin[:, -T:]), rot(k, cos, sin)
        k, v = (t.repeat_interleave(self.nh // self.nkv, dim=1) for t in (k, v))
        a = (q @ k.transpose(-1, -2)) * self.d**-0.5
        a = a.masked_fill(~mask[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
        return self.o_proj((a @ v).transpose(1, 2).reshape(Bt, T, -1))


class DSparkLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn = DSparkAttention(c)
        self.mlp = Qwen3MLP(c)
        self.input_layernorm = Qwen3RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, x, ctx, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), ctx, cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3DSparkModel(Qwen3PreTrainedModel):
    """DeepSpec's module tree and loss (shifted labels, decay exp(-k/gamma)); dense attention."""

    def __init__(self, config):
        super().__init__(config)
        for f in DSPARK_REQUIRED:
            assert hasattr(config, f), f"config.{f} must be provided."
        H = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H, padding_idx=getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList(DSparkLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(H, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config)
        self.fc = nn.Linear(len(config.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = Qwen3RMSNorm(H, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(H, config.vocab_size, bias=False)
        self.post_init()

    def loss(self, input_ids, target_hidden, loss_mask, anchors, keep):
        B, Bt, S = self.config.block_size, *input_ids.shape
        N = anchors.shape[1]
        slot = torch.arange(B)
        ids = torch.full((Bt, N, B), self.config.mask_token_id)
        ids[:, :, 0] = torch.where(keep, input_ids.gather(1, anchors), self.config.mask_token_id)
        pos = torch.cat([torch.arange(S).expand(Bt, S), (anchors[..., None] + slot).view(Bt, N * B)], 1)
        cos, sin = self.rotary_emb(target_hidden, pos)
        blk = torch.arange(N * B) // B
        mask = torch.cat([torch.arange(S)[None, None] < anchors[:, blk, None],
                          (blk[:, None] == blk[None, :]).expand(Bt, -1, -1)], -1) & keep[:, blk, None]
        ctx = self.hidden_norm(self.fc(target_hidden))
        h = self.embed_tokens(ids.view(Bt, N * B))
        for layer in self.layers:
            h = layer(h, ctx, cos, sin, mask)
        logits = self.lm_head(self.norm(h)).view(Bt, N, B, -1).float()
        t = anchors[..., None] + slot + 1
        safe = t.clamp(max=S - 1)
        ok = (t < S) & loss_mask.gather(1, safe.view(Bt, -1)).view(Bt, N, B).bool() & keep[..., None]
        w = ok.int().cumprod(-1).float() * torch.exp(-slot.float() / GAMMA)
        ce = F.cross_entropy(logits.flatten(0, 2), input_ids.gather(1, safe.view(Bt, -1)).flatten(), reduction="none")
        return (ce * w.flatten()).sum() / (w.sum() + 1e-6)


def batch(S=19, L=2, H=32, V=29, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V - 1, (2, S), generator=g)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[:, :4] = 0
    mask[1, 15:] = 0
    th = torch.randn(2, S, L * H, generator=g)
    anchors = torch.tensor([[4, 9, 16], [5, 11, 0]])
    keep = torch.tensor([[True, True, True], [True, True, False]])
    return ids, th, mask, anchors, keep


def perturb(m):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def d2sd_loss(d, ids, th, mask, anchors, keep):
    return d(ids, th, mask, anchors=anchors, keep=keep).loss


def test_deepspec_save_pretrained_loads_with_load_drafter(tmp_path):
    torch.manual_seed(0)
    ds = perturb(Qwen3DSparkModel(deepspec_draft_config(target_config()))).eval()
    ds.save_pretrained(str(tmp_path))
    written = json.load(open(tmp_path / "config.json"))
    assert written["architectures"] == ["Qwen3DSparkModel"] and written["num_hidden_layers"] == 2
    assert "layers.1.self_attn.q_norm.weight" in load_file(str(tmp_path / "model.safetensors"))

    d = load_drafter(str(tmp_path), backend="torch")
    c = d.config
    assert (c.num_draft_layers, c.num_target_layers, c.block_size, c.mask_token_id) == (2, 5, 4, 28)
    assert c.target_layer_ids == [1, 3] and c.num_anchors == 3
    assert not c.enable_d2_feature and c.dflash_labels == "shifted"  # DeepSpec's DSpark drafters
    c.loss_decay_gamma = GAMMA
    args = batch()
    with torch.no_grad():
        torch.testing.assert_close(d2sd_loss(d, *args), ds.loss(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d2", [False, True], ids=["dflash", "vp"])
def test_d2sd_export_loads_with_deepspec_from_pretrained(tmp_path, d2):
    torch.manual_seed(1)
    d = perturb(build_drafter(target_config(), num_draft_layers=2, block_size=4, target_layer_ids=[1, 3],
                              mask_token_id=28, num_anchors=3, loss_decay_gamma=GAMMA, enable_d2_feature=d2,
                              d2_prefix_weight_base=0.7, backend="torch"))
    d.save_pretrained(str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["model_type"] == "qwen3"
    assert (cfg["num_hidden_layers"], cfg["num_target_layers"], cfg["block_size"]) == (2, 5, 4)
    assert cfg["enable_confidence_head"] is False and cfg["markov_rank"] == 0
    assert cfg["tie_word_embeddings"] is False and cfg["layer_types"] == ["full_attention"] * 2
    # our training rule rides along where DeepSpec's loader ignores it
    assert cfg["enable_d2_feature"] is d2 and cfg["d2_prefix_weight_base"] == 0.7
    assert cfg["d2sd"]["loss_decay_gamma"] == GAMMA and cfg["d2sd"]["dflash_labels"] == "shifted"

    ds, info = Qwen3DSparkModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert ds.config.block_size == 4 and ds.config.target_layer_ids == [1, 3]
    for k, v in d.state_dict().items():
        assert torch.equal(v, ds.state_dict()[k]), k
    if not d2:  # same anchors, DeepSpec's shifted loss
        args = batch()
        with torch.no_grad():
            torch.testing.assert_close(ds.eval().loss(*args), d2sd_loss(d, *args), rtol=1e-5, atol=1e-6)
    e = load_drafter(str(tmp_path))
    assert e.config == d.config  # lossless round trip


def test_deepspec_heads_are_refused(tmp_path):
    c = deepspec_draft_config(target_config())
    c.markov_rank, c.markov_head_type = 8, "vanilla"
    c.save_pretrained(str(tmp_path))
    d = build_drafter(target_config(), num_draft_layers=2, block_size=4, target_layer_ids=[1, 3], mask_token_id=28)
    save_file({k: v.contiguous() for k, v in d.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="Markov head"):
        load_drafter(str(tmp_path))


# Gemma4DSparkModel's config.json as DeepSpec writes it (Gemma4 text config of the target, draft
# fields on top), and its weight names: k_eq_v global layers have no v_proj; each layer a layer_scalar.
GEMMA4_DEEPSPEC_CONFIG = {
    "architectures": ["Gemma4DSparkModel"], "model_type": "gemma4_text", "target_model_type": "gemma4",
    "target_text_model_type": "gemma4_text", "vocab_size": 29, "hidden_size": 32, "intermediate_size": 40,
    "num_hidden_layers": 1, "num_target_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 8, "global_head_dim": 16, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
    "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "attention_bias": False, "attention_dropout": 0.0,
    "rope_parameters": {"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
    "max_position_embeddings": 4096, "final_logit_softcapping": 30.0, "enable_moe_block": False,
    "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, "use_double_wide_mlp": False, "initializer_range": 0.02,
    "tie_word_embeddings": False, "layer_types": ["full_attention"], "block_size": 7, "mask_token_id": 4,
    "target_layer_ids": [1, 4], "num_anchors": 512, "enable_confidence_head": False, "markov_rank": 0,
}


def gemma4_deepspec_weights(c):
    H, D, Hq, Hkv, I = c["hidden_size"], c["global_head_dim"], c["num_attention_heads"], c["num_global_key_value_heads"], c["intermediate_size"]
    g = torch.Generator().manual_seed(0)
    shapes = {"embed_tokens.weight": (c["vocab_size"], H), "lm_head.weight": (c["vocab_size"], H),
              "fc.weight": (H, 2 * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(c["num_hidden_layers"]):
        p = f"layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (Hq * D, H), p + "self_attn.k_proj.weight": (Hkv * D, H),
                       p + "self_attn.o_proj.weight": (H, Hq * D), p + "self_attn.q_norm.weight": (D,),
                       p + "self_attn.k_norm.weight": (D,), p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I), p + "layer_scalar": (1,)})
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            shapes[p + n + ".weight"] = (H,)
    sd = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    sd.update({k: torch.ones(1) for k in sd if k.endswith("layer_scalar")})
    return sd


def test_gemma4_deepspec_checkpoint_loads_and_exports_back(tmp_path):
    pytest.importorskip("transformers.models.gemma4")
    src = tmp_path / "ds"
    src.mkdir()
    json.dump(GEMMA4_DEEPSPEC_CONFIG, open(src / "config.json", "w"))
    sd = gemma4_deepspec_weights(GEMMA4_DEEPSPEC_CONFIG)
    save_file(sd, str(src / "model.safetensors"))
    d = load_drafter(str(src), backend="torch")
    c = d.config
    assert (c.model_type, c.head_dim, c.num_key_value_heads, c.num_draft_layers, c.num_target_layers) == ("gemma4", 16, 1, 1, 6)
    assert c.attn_scale == 1.0 and c.embed_scale == math.sqrt(32) and c.final_logit_softcapping == 30.0
    assert c.rope_parameters["rope_type"] == "proportional"
    attn = d.layers[0].self_attn
    assert torch.equal(attn.v_proj.weight, attn.k_proj.weight)  # k_eq_v: v is k_proj's output
    th = torch.randn(1, 9, 64)
    logits = d.draft_logits(th, torch.tensor([[3, 8]]), torch.full((1, 2, 7), 4))
    assert torch.isfinite(logits).all() and logits.abs().max() <= 30.0

    d.save_pretrained(str(tmp_path / "out"))
    out = json.load(open(tmp_path / "out" / "config.json"))
    assert out["architectures"] == ["Gemma4DSparkModel"]
    for k in ("num_global_key_value_heads", "global_head_dim", "enable_confidence_head", "markov_rank", "num_anchors",
              "attention_k_eq_v", "enable_moe_block", "hidden_size_per_layer_input", "final_logit_softcapping"):
        assert k in out, k
    keys = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert keys == (set(sd) | {"layers.0.self_attn.v_proj.weight"})  # an explicit v_proj: attention_k_eq_v false
    assert torch.equal(load_drafter(str(tmp_path / "out")).draft_logits(th, torch.tensor([[3, 8]]), torch.full((1, 2, 7), 4)), logits)


def test_folders_of_older_d2sd_versions_still_load(tmp_path):
    """Before #22 d2sd wrote architectures ["D2SDDrafter"] and the flat DrafterConfig fields."""
    d = build_drafter(target_config(), num_draft_layers=2, block_size=4, target_layer_ids=[1, 3], mask_token_id=28)
    tmp_path.mkdir(exist_ok=True)
    json.dump({"architectures": ["D2SDDrafter"], **d.config.to_dict(), "torch_dtype": "float32"},
              open(tmp_path / "config.json", "w"))
    save_file({k: v.contiguous() for k, v in d.state_dict().items()}, str(tmp_path / "model.safetensors"))
    e = load_drafter(str(tmp_path))
    assert e.config == d.config
    for k, v in d.state_dict().items():
        assert torch.equal(v, e.state_dict()[k]), k
