"""DeepSpec v2 target cache: write -> read round trip against the live target, on-disk layout, CLI."""
import json
import os
import pickle
import struct

import pytest
import torch

from d2sd.assets import tiny_target_path
from d2sd.cache import INDEX_RECORD_SIZE, TargetCache, main, write_cache
from d2sd.data import builtin_records, collate, tokenize_chat
from d2sd.target import load_target, target_hidden_states
from tests.utils import rel_err


@pytest.fixture(scope="module")
def target():
    return load_target(tiny_target_path())


@pytest.fixture(scope="module")
def samples(target):
    _, tok = target
    return [tokenize_chat(r, tok) for r in builtin_records(5, seed=3)]


LAYERS = [-1, 1, 3]


@pytest.fixture(scope="module")
def reference(target, samples):
    """Per-sample fp32 features ([S, 3H]) and final hidden states ([S, H]), one unpadded forward each."""
    model, _ = target
    return [(target_hidden_states(model, s["input_ids"][None], layer_ids=LAYERS)[0],
             model.model(s["input_ids"][None]).last_hidden_state[0]) for s in samples]




# batch 1 runs the very forward of the reference, so bf16 storage must round-trip bit-exactly;
# padded batches change matmul shapes, so they are held to the storage dtype's rounding error
@pytest.mark.parametrize("hidden_dtype,batch_size,tol", [("bfloat16", 1, 0.0), ("bfloat16", 3, 8e-3),
                                                         ("float8_e4m3fn", 8, 0.08)],
                         ids=["bf16-bs1-exact", "bf16-bs3", "fp8e4m3-bs8"])
def test_round_trip(target, samples, reference, tmp_path, hidden_dtype, batch_size, tol):
    model, tok = target
    out = tmp_path / "cache"
    # a sample is ~60 tokens x 4 x 128 x (2 | 1) bytes ~ (60 | 30) KiB: one sample per shard
    shard_size = (100 if hidden_dtype == "bfloat16" else 50) * 1024
    m = write_cache(out, model, tok, samples, LAYERS, shard_size=shard_size, batch_size=batch_size,
                    hidden_dtype=hidden_dtype, progress=False)
    assert m["num_shards"] >= 3 and m["num_samples"] == len(samples)
    cache = TargetCache(out)
    assert len(cache) == len(samples) and cache.target_layer_ids == LAYERS
    H = model.config.hidden_size
    for i, (s, (feats, last)) in enumerate(zip(samples, reference)):
        item = cache[i]
        assert torch.equal(item["input_ids"], s["input_ids"]) and item["input_ids"].dtype == torch.long
        assert torch.equal(item["loss_mask"], s["loss_mask"])
        assert item["target_hidden"].shape == (len(s["input_ids"]), 3 * H)
        assert item["target_last_hidden"].shape == (len(s["input_ids"]), H)
        assert item["target_hidden"].dtype == item["target_last_hidden"].dtype == torch.bfloat16
        if tol == 0.0:
            assert torch.equal(item["target_hidden"], feats.to(torch.bfloat16))
            assert torch.equal(item["target_last_hidden"], last.to(torch.bfloat16))
        else:
            assert rel_err(item["target_hidden"], feats) < tol
            assert rel_err(item["target_last_hidden"], last) < tol
    assert torch.equal(cache[-1]["input_ids"], samples[-1]["input_ids"])
    with pytest.raises(IndexError):
        cache[len(samples)]
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone[2]["target_hidden"], cache[2]["target_hidden"])
    batch = collate([cache[0], cache[1]], tok.pad_token_id)
    assert batch["target_hidden"].shape[:2] == batch["input_ids"].shape


def test_on_disk_layout(target, samples, tmp_path):
    model, tok = target
    out = tmp_path / "c"
    write_cache(out, model, tok, samples[:3], [0, 2], shard_size=1, progress=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["version"] == 2 and m["index_record_size"] == INDEX_RECORD_SIZE == 56
    assert (m["token_dtype"], m["mask_dtype"], m["hidden_dtype"]) == ("int32", "uint8", "bfloat16")
    assert m["hidden_size"] == model.config.hidden_size and m["target_layer_ids"] == [0, 2]
    assert m["shards"] == [{"shard_id": i, "file_name": f"shard-{i:05d}.bin"} for i in range(3)]
    raw = (out / "samples.idx").read_bytes()
    assert len(raw) == 3 * 56
    H = model.config.hidden_size
    for i in range(3):
        sid, shard, S, o_ids, o_attn, o_lm, o_h, o_last = struct.unpack_from("<QIIQQQQQ", raw, i * 56)
        assert (sid, shard, S) == (i, i, len(samples[i]["input_ids"]))  # shard_size=1: one sample per shard
        assert (o_ids, o_attn, o_lm, o_h, o_last) == (0, 4 * S, 5 * S, 6 * S, 6 * S + S * 2 * H * 2)
        assert os.path.getsize(out / f"shard-{i:05d}.bin") == o_last + S * H * 2
        blob = (out / f"shard-{i:05d}.bin").read_bytes()
        assert blob[o_attn:o_lm] == b"\x01" * S


def test_writer_and_reader_errors(target, samples, tmp_path):
    model, tok = target
    out = tmp_path / "x"
    out.mkdir()
    (out / "junk").write_text("x")
    with pytest.raises(FileExistsError):
        write_cache(out, model, tok, samples, [0], progress=False)
    with pytest.raises(ValueError, match="ascending"):
        write_cache(tmp_path / "y", model, tok, samples, [2, 0], progress=False)
    with pytest.raises(FileNotFoundError, match="manifest"):
        TargetCache(tmp_path)
    good = tmp_path / "z"
    s0 = dict(samples[0], loss_mask=torch.zeros_like(samples[0]["loss_mask"]))
    m = write_cache(good, model, tok, [s0] + samples[:2], [1], progress=False)
    assert m["num_samples"] == 2  # the unsupervised sample is left out
    with open(good / "samples.idx", "ab") as f:
        f.write(b"\0" * 56)
    with pytest.raises(ValueError, match="expected 2 x 56"):
        TargetCache(good)


def test_cli_default_tiny_target(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--layer-ids" in capsys.readouterr().out
    out = tmp_path / "cli"
    main(["--out", str(out), "--num-prompts", "2", "--layer-ids", "0", "3", "--max-new-tokens", "40"])
    cache = TargetCache(out)
    assert len(cache) == 2 and cache.target_layer_ids == [0, 3]
    assert int(cache[0]["loss_mask"].sum()) > 5
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in builtin_records(2, seed=9)))
    main(["--out", str(tmp_path / "cli2"), "--data", str(data)])
    assert len(TargetCache(tmp_path / "cli2")) == 2
