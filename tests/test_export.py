"""Checkpoint interop: d2sd/DeepSpec format <-> z-lab/SpecForge DFlashDraftModel format."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Qwen3Config, Qwen3ForCausalLM

from d2sd.export import main as export_main
from d2sd.models import build_drafter, load_drafter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qwen3_cfg(H=32, V=29, layers=5):
    return Qwen3Config(hidden_size=H, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, intermediate_size=40, vocab_size=V)


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(qwen3_cfg()).eval()


def drafter_for(target, **kw):
    torch.manual_seed(1)
    d = build_drafter(target.config, num_draft_layers=2, block_size=4, backend="torch", **kw)
    with torch.no_grad():
        for p in d.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn_like(p))
    return d.init_from_target(target)


def probe(d, S=13):
    g = torch.Generator().manual_seed(5)
    th = torch.randn(2, S, d.fc.in_features, generator=g)
    anchors = torch.tensor([[3, 9, 9], [S, 0, 6]])
    blocks = torch.randint(0, d.config.vocab_size, (2, 3, d.config.block_size), generator=g)
    return d.draft_logits(th, anchors, blocks)


@pytest.mark.parametrize("kw", [dict(enable_d2_feature=True), dict(enable_d2_feature=False, dflash_labels="same")],
                         ids=["vp-d2", "dflash-same"])
def test_deepspec_to_dflash_and_back_identical_logits(tmp_path, target, kw):
    d = drafter_for(target, **kw)
    d.save_pretrained(str(tmp_path / "ds"))
    assert export_main([str(tmp_path / "ds"), str(tmp_path / "zl"), "--format", "dflash"]) == 0

    cfg = json.load(open(tmp_path / "zl" / "config.json"))
    assert cfg["architectures"] == ["DFlashDraftModel"]
    assert cfg["block_size"] == 4 and cfg["num_target_layers"] == 5 and cfg["num_hidden_layers"] == 2
    assert cfg["dflash_config"] == {"target_layer_ids": d.config.target_layer_ids, "mask_token_id": d.config.mask_token_id}
    assert AutoConfig.from_pretrained(str(tmp_path / "zl")).model_type == "qwen3"
    keys = set(load_file(str(tmp_path / "zl" / "model.safetensors")))
    assert "embed_tokens.weight" not in keys and "lm_head.weight" not in keys
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.1.self_attn.q_norm.weight"} <= keys
    assert all(k.startswith(("layers.", "fc.", "hidden_norm.", "norm.")) for k in keys)

    e = load_drafter(str(tmp_path / "zl"), target=target)
    assert e.config == d.config  # the d2sd extras ride along, so the trip is lossless
    assert torch.equal(probe(d), probe(e))

    assert export_main([str(tmp_path / "zl"), str(tmp_path / "ds2"), "--format", "deepspec"]) == 2  # needs target
    from d2sd.export import export_checkpoint

    assert export_checkpoint(str(tmp_path / "zl"), str(tmp_path / "ds2"), "deepspec", target=target) == "dflash"
    f = load_drafter(str(tmp_path / "ds2"))
    assert torch.equal(probe(d), probe(f))
    for k, v in d.state_dict().items():
        assert torch.equal(v, f.state_dict()[k]), k


def test_foreign_zlab_folder_loads_as_same_position_dflash(tmp_path, target):
    """A DFlashDraftModel folder as z-lab ships it (no d2sd keys) is a same-position DFlash drafter."""
    d = drafter_for(target, enable_d2_feature=False, dflash_labels="same")
    d.save_pretrained(str(tmp_path / "zl"), format="dflash")
    cfg = json.load(open(tmp_path / "zl" / "config.json"))
    del cfg["d2sd"]
    json.dump(cfg, open(tmp_path / "zl" / "config.json", "w"))
    e = load_drafter(str(tmp_path / "zl"), target=target)
    assert not e.config.enable_d2_feature and e.config.dflash_labels == "same" and e.config.same_position_labels
    assert torch.equal(probe(d), probe(e))


def test_dflash_refuses_shifted_and_gemma_drafters(tmp_path, target):
    d = drafter_for(target, enable_d2_feature=False, dflash_labels="shifted")
    with pytest.raises(ValueError, match="off by one"):
        d.save_pretrained(str(tmp_path / "x"), format="dflash")
    d.save_pretrained(str(tmp_path / "ds"))
    assert export_main([str(tmp_path / "ds"), str(tmp_path / "zl"), "--format", "dflash"]) == 2
    assert not os.path.exists(tmp_path / "zl")
    with pytest.raises(ValueError, match="format must be"):
        d.save_pretrained(str(tmp_path / "y"), format="eagle")
    Gemma4TextConfig = pytest.importorskip("transformers.models.gemma4").Gemma4TextConfig
    g = build_drafter(Gemma4TextConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=8, global_head_dim=16, vocab_size=29,
                                       hidden_size_per_layer_input=0), num_draft_layers=1)
    with pytest.raises(ValueError, match="Qwen3 drafter"):
        g.save_pretrained(str(tmp_path / "g"), format="dflash")


def test_dflash_needs_target(tmp_path, target):
    drafter_for(target).save_pretrained(str(tmp_path / "zl"), format="dflash")
    with pytest.raises(ValueError, match="pass the target"):
        load_drafter(str(tmp_path / "zl"))


def test_neither_format_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_drafter(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected config.json and model.safetensors"):
        load_drafter(str(tmp_path / "empty"))
    hf = tmp_path / "plain_qwen3"
    qwen3_cfg().save_pretrained(str(hf))
    save_file({"x": torch.zeros(1)}, str(hf / "model.safetensors"))
    with pytest.raises(ValueError, match="neither a d2sd/DeepSpec drafter .* nor a z-lab/SpecForge DFlash"):
        load_drafter(str(hf))


def test_weights_not_matching_config(tmp_path, target):
    d = drafter_for(target)
    d.save_pretrained(str(tmp_path / "ds"))
    sd = load_file(str(tmp_path / "ds" / "model.safetensors"))
    sd.pop("layers.1.mlp.up_proj.weight")
    save_file(sd, str(tmp_path / "ds" / "model.safetensors"))
    with pytest.raises(ValueError, match="missing .*layers.1.mlp.up_proj.weight"):
        load_drafter(str(tmp_path / "ds"))


@pytest.mark.parametrize(
    "other,match",
    [
        (dict(H=48), "hidden_size 32 != target's 48"),
        (dict(V=31), "vocab_size 29 != target's 31"),
        (dict(layers=2), "reach past the target's 2 layers"),
        (dict(layers=9), "num_target_layers 5 != target's 9"),
    ],
    ids=["hidden", "vocab", "layer-ids", "num-layers"],
)
@pytest.mark.parametrize("fmt", ["deepspec", "dflash"])
def test_mismatched_target_is_refused(tmp_path, target, other, match, fmt):
    d = drafter_for(target)
    d.save_pretrained(str(tmp_path / "ck"), format=fmt)
    torch.manual_seed(0)
    wrong = Qwen3ForCausalLM(qwen3_cfg(**other))
    with pytest.raises(ValueError, match=match):
        load_drafter(str(tmp_path / "ck"), target=wrong)


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "d2sd.export", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0
    assert "--format" in r.stdout and "dflash" in r.stdout and "--target" in r.stdout


def test_cli_dflash_input_with_target_folder(tmp_path, target, capsys):
    d = drafter_for(target)
    d.save_pretrained(str(tmp_path / "zl"), format="dflash")
    target.save_pretrained(str(tmp_path / "target"))
    assert export_main([str(tmp_path / "zl"), str(tmp_path / "ds"), "--format", "deepspec"]) == 2
    assert "--target" in capsys.readouterr().err
    assert export_main([str(tmp_path / "zl"), str(tmp_path / "ds"), "--format", "deepspec",
                        "--target", str(tmp_path / "target")]) == 0
    assert torch.equal(probe(d), probe(load_drafter(str(tmp_path / "ds"))))
