"""python -m d2sd.train --config / --print-config / --report-to (trackers; wandb offline)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2sd import train
from d2sd.config import TrainConfig, get_preset
from d2sd.trackers import Tracker, parse_report_to

REPO = Path(__file__).resolve().parents[1]


def test_print_config_round_trips_and_flags_override(tmp_path, capsys):
    assert train.main(["--preset", "qwen3-4b", "--lr", "1e-3", "--no-d2", "--target-layer-ids", "2", "5",
                       "--report-to", "none", "--print-config"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "run.yaml").write_text(text)
    a = train.resolve_run(["--preset", "qwen3-4b", "--lr", "1e-3", "--no-d2", "--target-layer-ids", "2", "5",
                           "--report-to", "none"])
    b = train.resolve_run(["--config", str(tmp_path / "run.yaml")])
    assert a.train == b.train and a.drafter_args == b.drafter_args and b.opts["report_to"] == "none"
    assert b.drafter_args["enable_d2_feature"] is False and b.drafter_args["target_layer_ids"] == [2, 5]
    c = train.resolve_run(["--config", str(tmp_path / "run.yaml"), "--lr", "5e-4", "--d2"])
    assert c.train.lr == 5e-4 and c.drafter_args["enable_d2_feature"] is True  # the command line wins
    assert c.train.max_length == 4096  # the preset still sits under the file


def test_config_file_layers_over_the_preset(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"preset": "tiny", "max-steps": 7, "dflash_labels": "same",
                                                   "d2": False, "loss_decay_gamma": None, "fsdp": True}))
    r = train.resolve_run(["--config", str(tmp_path / "run.json"), "--out", str(tmp_path / "o")])
    assert r.train.max_steps == 7 and r.train.lr == 2e-3  # the tiny preset's lr
    assert r.drafter_args["dflash_labels"] == "same" and r.drafter_args["loss_decay_gamma"] is None and r.fsdp


@pytest.mark.parametrize("content,match", [
    ("lr: 1e-3\nlearning_rate: 2\n", r"unknown option\(s\) \['learning_rate'\]"),
    ("max_steps: many\n", "max_steps: 'many': argument --max-steps: invalid int value"),
    ("schedule: cosine-ish\n", "invalid choice"),
    ("d2: 3\n", "expected true or false"),
    ("resume: runs/x\n", "unknown option"),
    ("- lr\n", "expected a mapping"),
    ("lr: [1\n", "not valid YAML"),
], ids=["unknown", "type", "choice", "bool", "resume", "list", "syntax"])
def test_bad_config_files_are_usage_errors(tmp_path, capsys, content, match):
    (tmp_path / "run.yaml").write_text(content)
    assert train.main(["--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert "run.yaml" in err
    import re

    assert re.search(match, err), err


def test_report_to_parsing(capsys):
    assert parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"] and parse_report_to("none") == []
    with pytest.raises(ValueError, match="unknown tracker"):
        parse_report_to("mlflow")
    assert train.main(["--report-to", "mlflow", "--print-config"]) == 2
    assert "unknown tracker" in capsys.readouterr().err


def test_tracker_flattens_rows():
    class Rec(Tracker):
        def __init__(self):
            self.got, self.flushed = [], []

        def scalar(self, name, value, step):
            self.got.append((name, value, step))

        def flush(self, step):
            self.flushed.append(step)

    t = Rec()
    t.log({"step": 3, "loss": 1.5, "acc_per_slot": [None, 0.5], "flag": True, "name": "x"})
    assert t.got == [("loss", 1.5, 3), ("acc_per_slot/1", 0.5, 3)] and t.flushed == [3]


def test_report_to_wandb_offline(tmp_path):
    pytest.importorskip("wandb")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + 1 ?"},
                                                     {"role": "assistant", "content": f"{i} + 1 = {i + 1} ."}]}) + "\n"
                            for i in range(4)))
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path), OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), WANDB_PROJECT="d2sd-test")
    env.pop("WANDB_API_KEY", None)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "d2sd.train", "--data", str(data), "--out", str(out), "--max-steps", "2",
                        "--log-every", "1", "--global-batch-size", "2", "--micro-batch-size", "2", "--num-anchors", "4",
                        "--max-length", "64", "--report-to", "wandb"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(out.rglob("*"))[:20]
    run_id = (out / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id) and list(runs[0].glob("*.wandb"))


def test_resumed_options_sit_between_the_file_and_the_command_line(tmp_path, monkeypatch):
    (tmp_path / "run.yaml").write_text("lr: 0.1\nmax_steps: 9\nseed: 5\n")
    ck = tmp_path / "run" / "checkpoints" / "step-00000001"
    monkeypatch.setattr(train.ckpt, "resolve_resume", lambda where, log: ck)
    saved = dict(dataclasses.asdict(TrainConfig(**{**get_preset("tiny")["train"], "seed": 5})), lr=0.2)
    state = {"run_opts": {"lr": 0.2, "out": str(tmp_path / "run")}, "train_config": saved, "step": 1}
    monkeypatch.setattr(train.ckpt, "load_trainer_state", lambda p: state)
    r = train.resolve_run(["--config", str(tmp_path / "run.yaml"), "--resume", str(tmp_path / "run"),
                           "--max-steps", "11"])
    # the file's max_steps and seed sit under the resumed lr; the command line's max_steps wins
    assert (r.train.lr, r.train.max_steps, r.train.seed) == (0.2, 11, 5)
    assert "config" not in r.opts and r.resume_from == ck
