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
    assert info["data_home"]


def test_data_home_order(tmp_path, monkeypatch):
    """--home, then $D3PO_HOME, then $XDG_DATA_HOME/d3po-studio, then ~/.local/share/d3po-studio."""
    from d3po_studio.gradio_app.paths import data_home
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("D3PO_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert data_home() == tmp_path / "user" / ".local" / "share" / "d3po-studio"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_home() == tmp_path / "xdg" / "d3po-studio"
    monkeypatch.setenv("D3PO_HOME", str(tmp_path / "env"))
    assert data_home() == tmp_path / "env"
    assert data_home(tmp_path / "flag") == tmp_path / "flag"
    assert not list(tmp_path.iterdir())                      # nothing is created by asking


def test_ctrl_c_is_a_message(monkeypatch, tmp_path, capsys):
    import d3po_studio.core.simulate as simulate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(simulate, "run_simulation", interrupted)
    assert main(["simulate", "--oracle", "brighter", "--out", str(tmp_path / "sim")]) == 130
    err = capsys.readouterr().err
    assert "interrupted: nothing more was written" in err and "Traceback" not in err


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


@pytest.mark.parametrize("argv, message", [
    (["sample", "--prompt", "a red circle", "--out", "x", "--n", "0"], "--n '0' is out of range"),
    (["sample", "--prompt", "a red circle", "--out", "x", "--seed", str(2**64)], "seed '18446744073709551616' is out"),
    (["sample", "--prompt", "a red circle", "--out", "x", "--seed", "1e30"], "seed '1e30' is out of range"),
    (["sample", "--prompt", "a red circle", "--out", "x", "--seed", ""], "seed is empty"),
    (["sample", "--prompt", "a red circle", "--out", "x", "--scale", "nan"], "--scale 'nan' is out of range"),
    (["sample", "--prompt", "a red circle", "--out", "x", "--scale", "inf"], "--scale 'inf' is out of range"),
    (["simulate", "--oracle", "brighter", "--n", "1"], "--n '1' is out of range: use a whole number from 2"),
    (["train", "s", "--epochs", "0"], "--epochs '0' is out of range"),
])
def test_bad_numbers_are_usage_messages(argv, message, tmp_path, monkeypatch, capsys):
    """Issue 11 item 11: checked before any model loads; argparse's usage error, rc 2, no traceback."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())                       # nothing written


def test_a_damaged_checkpoint_is_a_note_or_a_message(session_on_disk, tmp_path, capsys):
    """`info` on a session whose optimizer.pt was cut short: the core opens it with a fresh
    optimizer state and says so; a damaged LoRA file is a message naming it. No traceback."""
    folder = tmp_path / "session"
    shutil.copytree(session_on_disk / "session", folder)
    (folder / ".lock").unlink(missing_ok=True)
    (ckpt,) = (folder / "checkpoints").iterdir()
    for name in ("optimizer.pt", "lora.safetensors"):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[:len(data) // 2])
        if name == "optimizer.pt":
            assert main(["info", "--session", str(folder)]) == 0
            notes = json.loads(capsys.readouterr().out)["session"]["notes"]
            assert any("optimizer.pt is missing or damaged" in n and "starts fresh" in n for n in notes)
    assert main(["info", "--session", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "\nerror: " in err and "lora.safetensors" in err and "Traceback" not in err


def test_sample_without_a_session_leaves_no_folder_behind(session_on_disk, tmp_path, monkeypatch, capsys):
    import tempfile
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert main(["sample", "--model", str(session_on_disk / "model"), "--prompt", "a red circle", "--n", "1",
                 "--seed", "4294967295", "--out", str(tmp_path / "imgs")]) == 0
    assert [p.name for p in (tmp_path / "imgs").iterdir()] == ["4294967295_0.png"]
    assert not list(scratch.iterdir())                        # the temporary session is gone


def test_simulate_and_train_show_progress_and_write_under_home(session_on_disk, tmp_path, monkeypatch, capsys):
    """Issue 11 items 10 and 12: a progress bar with the time left; default folders under
    $D3PO_HOME, nothing in the current directory."""
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("D3PO_HOME", str(home))
    assert main(["simulate", "--oracle", "brighter", "--rounds", "2", "--eval-pairs", "2",
                 "--model", str(session_on_disk / "model")]) == 0
    err = capsys.readouterr().err
    assert "simulated clicks ('brighter' oracle" in err and "2/2" in err and "<00:00" in err
    (run,) = (home / "simulations").iterdir()
    assert run.name.startswith("brighter-") and (run / "report.json").is_file()
    assert not list(cwd.iterdir())

    assert main(["train", str(run / "session"), "--out", str(tmp_path / "replay.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "replay training (optimizer steps)" in err and "2/2" in err
    assert not list(cwd.iterdir())
