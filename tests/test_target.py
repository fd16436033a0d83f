"""The shipped tiny target and d2sd.target: loading, layer selection vs HF hidden_states, generation."""
import json
import os

import pytest
import torch

from d2sd.assets import tiny_target_path
from d2sd.corpus import final_answer, make_problems
from d2sd.target import (
    LayerCapture,
    default_layer_ids,
    generate,
    load_target,
    num_target_layers,
    target_hidden_states,
    validate_layer_ids,
)
from tests.utils import rel_err


@pytest.fixture(scope="module")
def target():
    return load_target(tiny_target_path())


def test_shipped_files_and_size():
    path = tiny_target_path()
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "d2sd_tiny_target.json"):
        assert os.path.isfile(os.path.join(path, f)), f
    assert os.path.getsize(os.path.join(path, "model.safetensors")) <= 5 * 1024 ** 2
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["model_type"] == "qwen3" and cfg["tie_word_embeddings"]


def test_load_target_frozen_eval(target):
    model, tok = target
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token_id is not None and tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|mask|>") < model.config.vocab_size
    assert len(tok("<|mask|>", add_special_tokens=False)["input_ids"]) == 1
    text = tok.apply_chat_template([{"role": "user", "content": "Hi ?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi ?<|im_end|>\n<|im_start|>assistant\n"


def test_load_target_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_target(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_target(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weights"):
        load_target(tmp_path)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):
        load_target(f)


@pytest.mark.parametrize("layer_ids", [[-1], [0, 2], [2, 0, -1], [1, 1]], ids=["emb", "L0-2", "unsorted", "repeat"])
def test_hidden_states_match_hf(target, layer_ids):
    model, tok = target
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=g)
    h = target_hidden_states(model, ids, layer_ids=layer_ids)
    H = model.config.hidden_size
    assert h.shape == (2, 13, len(layer_ids) * H)
    ref = model(ids, output_hidden_states=True).hidden_states
    for j, l in enumerate(layer_ids):
        assert rel_err(h[..., j * H:(j + 1) * H], ref[l + 1]) < 1e-6


def test_last_layer_is_raw_layer_output(target):
    """HF's hidden_states[-1] carries the final norm; layer id L-1 is the raw layer output (docs/semantics.md / DeepSpec)."""
    model, _ = target
    L = num_target_layers(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    h = target_hidden_states(model, ids, layer_ids=[L - 1])
    ref = model(ids, output_hidden_states=True).hidden_states
    assert rel_err(model.model.norm(h), ref[L]) < 1e-6
    assert rel_err(h, ref[L]) > 1e-2


def test_hidden_states_with_padding(target):
    model, tok = target
    a = tok("Tom has 3 apples .", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    b = tok("Anna gives 2 books to Ben . How many ?", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    ids = torch.full((2, len(b)), tok.pad_token_id)
    ids[0, :len(a)], ids[1] = a, b
    attn = (torch.arange(len(b)) < torch.tensor([[len(a)], [len(b)]])).long()
    h = target_hidden_states(model, ids, attn, layer_ids=[-1, 1, 3])
    solo = target_hidden_states(model, a[None], layer_ids=[-1, 1, 3])
    assert rel_err(h[0, :len(a)], solo[0]) < 1e-5
    assert torch.isfinite(h).all()


def test_layer_id_validation(target):
    model, _ = target
    L = num_target_layers(model)
    for bad in ([L], [-2], [], None):
        with pytest.raises(ValueError):
            target_hidden_states(model, torch.zeros(1, 3, dtype=torch.long), layer_ids=bad)
    assert validate_layer_ids([-1, L - 1], L) == [-1, L - 1]
    assert default_layer_ids(36, 5) == [0, 9, 18, 26, 35] and default_layer_ids(4) == [0, 2, 3]
    with pytest.raises(RuntimeError, match="not captured"):
        LayerCapture(model, [0]).features()


def test_target_answers_builtin_prompts(target):
    model, tok = target
    problems = make_problems(12, seed=0)
    answers = generate(model, tok, [p for p, _ in problems], max_new_tokens=64, batch_size=12)
    correct = sum(final_answer(a) == final_answer(ref) for a, (_, ref) in zip(answers, problems))
    assert correct >= 11, list(zip(answers, problems))
    # left padding in a batch must not change any greedy answer
    assert generate(model, tok, [problems[0][0]])[0] == answers[0]
    assert generate(model, tok, [problems[5][0]])[0] == answers[5]
