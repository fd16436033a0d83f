"""Drafters as transformers PreTrainedModels: D2SDDrafterModel (from_pretrained / save_pretrained / push_to_hub)."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

from d2sd.models import D2SDDrafterConfig, D2SDDrafterModel, build_drafter


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=8, intermediate_size=40, vocab_size=29)).eval()


def batch(d):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 28, (2, 17), generator=g)
    th = torch.randn(2, 17, d.fc.in_features, generator=g)
    return ids, th, torch.ones(2, 17, dtype=torch.long)


def test_a_pretrained_model_with_the_drafters_modules_and_names(target):
    d = build_drafter(target.config, num_draft_layers=2, block_size=4, num_anchors=3, backend="torch").init_from_target(target)
    m = D2SDDrafterModel.from_drafter(d)
    assert isinstance(m, PreTrainedModel) and isinstance(m.config, D2SDDrafterConfig)
    assert list(m.state_dict()) == list(d.state_dict())  # DeepSpec's names, no prefix
    assert m.config.drafter_config == d.config and m.get_input_embeddings() is d.embed_tokens
    assert m.num_parameters() == sum(p.numel() for p in d.parameters())
    ids, th, mask = batch(d)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(m(ids, th, mask, generator=g()).loss, d(ids, th, mask, generator=g()).loss)
    m.to(torch.float64)
    assert d.fc.weight.dtype == torch.float64  # one set of modules
    fresh = D2SDDrafterModel(D2SDDrafterConfig(drafter=d.config.to_dict()))
    assert list(fresh.state_dict()) == list(d.state_dict())


def test_save_and_from_pretrained_both_formats(tmp_path, target):
    torch.manual_seed(2)
    d = build_drafter(target.config, num_draft_layers=1, block_size=4, backend="torch").init_from_target(target)
    m = D2SDDrafterModel.from_drafter(d)
    m.save_pretrained(str(tmp_path / "ds"), safe_serialization=True, max_shard_size="5GB")
    assert json.load(open(tmp_path / "ds" / "config.json"))["architectures"] == ["Qwen3DSparkModel"]
    e = D2SDDrafterModel.from_pretrained(str(tmp_path / "ds"), torch_dtype=torch.float64)
    assert e.config.drafter_config == d.config and e.drafter.fc.weight.dtype == torch.float64
    m.save_pretrained(str(tmp_path / "zl"), format="dflash")
    cfg = json.load(open(tmp_path / "zl" / "config.json"))
    assert cfg["architectures"] == ["DFlashDraftModel"] and "dflash_config" in cfg and "block_size" in cfg
    assert "embed_tokens.weight" not in load_file(str(tmp_path / "zl" / "model.safetensors"))
    z = D2SDDrafterModel.from_pretrained(str(tmp_path / "zl"), target=target)
    for k, v in d.state_dict().items():
        assert torch.equal(v, z.state_dict()[k]), k


def test_push_to_hub_uploads_the_saved_folder(tmp_path, target, monkeypatch):
    """push_to_hub is transformers' own; the Hub calls are replaced by recorders (no network)."""
    import transformers.utils.hub as hub
    from transformers.utils.hub import PushToHubMixin

    class Api:
        def create_repo(self, repo_id, **kw):
            return type("R", (), {"repo_id": repo_id})()

    class Card:
        def save(self, path):
            open(path, "w").write("card")

    uploaded = {}

    def upload(self, folder, repo_id, **kw):
        import os

        uploaded[repo_id] = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)}

    monkeypatch.setattr(hub, "hf_api", lambda: Api(), raising=False)
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: Card(), raising=False)
    monkeypatch.setattr(PushToHubMixin, "_upload_modified_files", upload)
    d = build_drafter(target.config, num_draft_layers=1, block_size=4).init_from_target(target)
    D2SDDrafterModel.from_drafter(d).push_to_hub("org/tiny-vp")
    assert set(uploaded["org/tiny-vp"]) == {"config.json", "model.safetensors", "README.md"}
