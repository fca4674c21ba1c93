"""The d3po-studio command: help, info, export, sample, and errors as messages."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors import safe_open

from d3po_studio import Session
from d3po_studio.cli import main
from d3po_studio.core.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def session_on_disk(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_pipeline("sd1").save_pretrained(root / "model")
    with Session.open(root / "session", model=str(root / "model"), steps=3, dtype="float32") as s:
        s.prefer(s.sample("a red circle", seed=0), best=0)
    return root


def test_console_script_lists_commands():
    exe = shutil.which("d3po-studio", path=os.path.dirname(sys.executable))
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("app", "sample", "train", "export", "simulate", "info"):
        assert command in out.stdout


def test_info_reports_runtime_choices(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["runtime"]["device"] == "cpu" and info["runtime"]["attention"] == "sdpa"
    assert info["runtime"]["optimizer"] in ("adamw8bit", "adamw")
    assert any("attention" in note for note in info["runtime"]["notes"])
    assert info["versions"]["torch"]


def test_export_and_sample(session_on_disk, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    assert main(["export", str(session_on_disk / "session"), "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())
    assert main(["sample", "--session", str(session_on_disk / "session"), "--prompt", "a red circle",
                 "--n", "2", "--out", str(tmp_path / "imgs")]) == 0
    assert sorted(p.name for p in (tmp_path / "imgs").iterdir()) == ["0_0.png", "0_1.png"]


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a session folder" in capsys.readouterr().err
