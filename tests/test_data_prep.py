"""Data preparation: regenerate (OpenAI-compatible server / in process), thinking turns, the datasets
tokenization cache, cache layers from the preset, and Hub ids from a local Hub cache (offline)."""
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from d2sd.assets import tiny_target_path
from d2sd.data import load_chat_data, load_chat_jsonl, tokenize_chat, tokenize_chat_dataset
from d2sd.data import main as data_main
from d2sd.regenerate import TargetGenerator, regenerate_records, split_thinking

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_target_path())


class FakeOpenAI:
    """A chat-completions server on 127.0.0.1 (a free port) that answers from the last user turn and
    reports a reasoning trace; records every request; ``fail`` prompts get HTTP 500."""

    def __init__(self, fail=()):
        self.requests, self.fail = [], set(fail)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                last = body["messages"][-1]["content"]
                if self.path != "/v1/chat/completions" or last in outer.fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                n = sum(m["role"] == "assistant" for m in body["messages"])
                msg = {"role": "assistant", "content": f"answer {n} to {last}", "reasoning_content": f"think {last}"}
                data = json.dumps({"choices": [{"index": 0, "message": msg}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


RECORDS = [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
                  {"role": "assistant", "content": "old"}, {"role": "user", "content": "q2"},
                  {"role": "assistant", "content": "old"}], "source": "a"},
    {"conversations": [{"from": "human", "value": "q3"}]},
    {"messages": [{"role": "assistant", "content": "no prompt"}]},
    {"messages": [{"role": "user", "content": "boom"}]},
]


def test_regenerate_through_an_openai_compatible_server_resumes(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    argv = ["regenerate", "--data", str(tmp_path / "in.jsonl"), "--out", str(out), "--concurrency", "3",
            "--model", "m", "--thinking", "--max-new-tokens", "16"]
    with FakeOpenAI(fail={"boom"}) as srv:
        assert data_main(argv + ["--server", srv.url]) == 1  # two records failed: exit status says so
        rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        assert sorted(rows) == [0, 1]
        turns = rows[0]["messages"]
        assert [t["role"] for t in turns] == ["system", "user", "assistant", "user", "assistant"]
        assert turns[2] == {"role": "assistant", "content": "answer 0 to q1", "reasoning_content": "think q1"}
        assert turns[4]["content"] == "answer 1 to q2" and rows[0]["source"] == "a"
        # the second request carried the regenerated first answer, not the old one
        second = next(r for r in srv.requests if r["messages"][-1]["content"] == "q2")
        assert second["messages"][2]["content"] == "answer 0 to q1" and second["model"] == "m"
        assert second["chat_template_kwargs"] == {"enable_thinking": True} and second["max_tokens"] == 16
        assert rows[1]["conversations"][1]["content"] == "answer 0 to q3"
        errors = [json.loads(line) for line in (tmp_path / "out.jsonl.errors.jsonl").read_text().splitlines()]
        assert sorted(e["id"] for e in errors) == [2, 3]

        # resumable: a cut line is redone, finished ids are not asked again
        out.write_text(out.read_text().splitlines()[0] + "\n" + '{"id": 1, "messa')
        srv.requests.clear()
        srv.fail.clear()
        assert data_main(argv + ["--server", srv.url]) == 1  # record 2 still has no user turn
        asked = {r["messages"][-1]["content"] for r in srv.requests}
        assert "boom" in asked and "q1" not in asked and ("q3" in asked) == (json.loads(out.read_text().splitlines()[0])["id"] == 0)
    ids = sorted(json.loads(line)["id"] for line in out.read_text().splitlines())
    assert ids == [0, 1, 3]


def test_split_thinking():
    assert split_thinking("<think>\nhm\n</think>\n\nok") == ("hm", "ok")
    assert split_thinking("plain") == (None, "plain")


def test_regenerate_in_process_with_the_tiny_target(tmp_path):
    from d2sd.target import generate, load_target

    model, tok = load_target(tiny_target_path())
    prompts = ["Tom has 12 apples . Tom gets 7 more apples . How many apples does Tom have now ?",
               "Sam has 9 cards . Sam gets 30 more cards . How many cards does Sam have now ?"]
    recs = regenerate_records([{"messages": [{"role": "user", "content": p}]} for p in prompts],
                              TargetGenerator(model, tok, max_new_tokens=12, batch_size=2))
    assert [r["messages"][1]["content"] for r in recs] == generate(model, tok, prompts, max_new_tokens=12)
    a, b = (regenerate_records([{"messages": [{"role": "user", "content": prompts[0]}]}],
                               TargetGenerator(model, tok, max_new_tokens=12, temperature=1.0, seed=3)) for _ in range(2))
    assert a == b  # sampled, seeded
    write_jsonl(tmp_path / "in.jsonl", [{"messages": [{"role": "user", "content": p}]} for p in prompts])
    assert data_main(["regenerate", "--data", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                      "--target", tiny_target_path(), "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2


THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_thinking_turns_are_kept_and_supervised(tok):
    t = type(tok).from_pretrained(tiny_target_path())
    t.chat_template = THINK_TEMPLATE
    rec = {"messages": [{"role": "user", "content": "What is 2 + 3 ?"},
                        {"role": "assistant", "content": "The answer is 5 .", "thinking": "2 + 3 = 5 ."}]}
    s = tokenize_chat(rec, t)
    supervised = t.decode(s["input_ids"][s["loss_mask"].bool()])
    assert "2 + 3 = 5" in supervised and "The answer is 5" in supervised
    plain = tokenize_chat({"messages": [rec["messages"][0], {"role": "assistant", "content": "The answer is 5 ."}]}, t)
    assert int(s["loss_mask"].sum()) > int(plain["loss_mask"].sum())


def test_datasets_tokenization_is_cached_and_matches(tmp_path, tok, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("D2SD_CACHE", str(tmp_path / "cache"))
    recs = [{"messages": [{"role": "user", "content": f"What is {i} + 1 ?"},
                          {"role": "assistant", "content": f"{i} + 1 = {i + 1} . The answer is {i + 1} ."}]}
            for i in range(9)] + [{"messages": [{"role": "user", "content": "no answer"}]}]
    write_jsonl(tmp_path / "c.jsonl", recs)
    want, want_stats = load_chat_jsonl(tmp_path / "c.jsonl", tok, max_length=20)
    got, stats = load_chat_data(tmp_path / "c.jsonl", tok, max_length=20, num_proc=2)
    assert stats == want_stats and len(got) == len(want) == 9
    for a, b in zip(got, want):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
    import d2sd.data as data

    def no_rebuild(*a, **k):
        raise AssertionError("tokenized twice")

    monkeypatch.setattr(data, "_build_tokenized", no_rebuild)
    again, _ = load_chat_data(tmp_path / "c.jsonl", tok, max_length=20)
    assert again.path == got.path and len(again) == 9
    monkeypatch.undo()
    # an explicit folder for `train --data FOLDER`; a bad line names file and line
    assert data_main(["tokenize", "--data", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "tok")]) == 0
    folder, st = load_chat_data(tmp_path / "tok", tok, max_length=8)
    assert st["samples"] == 9 and len(folder[0]["input_ids"]) == 8
    (tmp_path / "bad.jsonl").write_text(json.dumps(recs[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        tokenize_chat_dataset(tmp_path / "bad.jsonl", tok, cache_dir=str(tmp_path / "c2"))


def test_cache_layers_default_to_the_presets():
    from d2sd.cache import preset_layer_ids
    from d2sd.config import default_target_layer_ids

    assert preset_layer_ids("qwen3-4b", 36) == [1, 9, 17, 25, 33]
    assert preset_layer_ids("tiny", 4) == default_target_layer_ids(4, 2)


def test_hub_ids_resolve_from_the_local_hub_cache_offline(tmp_path):
    """--target / --dflash / --vp take Hub ids: a fake Hub cache (models--org--name/snapshots/REV + refs/main)."""
    from d2sd.models import build_drafter

    hub = tmp_path / "hf" / "hub"
    for name, fill in (("tiny-target", lambda d: shutil.copytree(tiny_target_path(), d)),
                       ("tiny-drafter", None)):
        snap = hub / f"models--org--{name}" / "snapshots" / "0123abcd"
        if fill is not None:
            fill(snap)
        (hub / f"models--org--{name}" / "refs").mkdir(parents=True)
        (hub / f"models--org--{name}" / "refs" / "main").write_text("0123abcd")
    from transformers import AutoConfig

    d = build_drafter(AutoConfig.from_pretrained(tiny_target_path()), num_draft_layers=1, block_size=4)
    d.save_pretrained(str(hub / "models--org--tiny-drafter" / "snapshots" / "0123abcd"))
    code = (
        "from d2sd.target import load_target, resolve_model\n"
        "from d2sd.models import load_drafter\n"
        "m, t = load_target('org/tiny-target')\n"
        "d = load_drafter('org/tiny-drafter', target=m)\n"
        "from d2sd.models import D2SDDrafterModel\n"
        "assert D2SDDrafterModel.from_pretrained('org/tiny-drafter', revision='main').config.drafter_config == d.config\n"
        "assert resolve_model('org/tiny-target').endswith('snapshots/0123abcd')\n"
        "try:\n    resolve_model('org/absent')\nexcept FileNotFoundError as e:\n    print('absent:', e)\n"
        "print('ok', d.config.num_draft_layers)\n"
    )
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ok 1" in r.stdout and "absent: 'org/absent' is not a local folder" in r.stdout
    # the trainer and the evaluator take the id too
    r = subprocess.run([sys.executable, "-m", "d2sd.train", "--target", "org/tiny-target", "--print-config"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "target: org/tiny-target" in r.stdout, r.stderr
