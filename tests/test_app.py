"""The Gradio app, running on 127.0.0.1, driven over its HTTP API with gradio_client.

Uses the embedded model when its weights exist, else the tiny SD1 pipeline saved as a diffusers
folder (so the app loads it the way it loads any user model).
"""
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from safetensors import safe_open

from d3po_studio.core.embedded import WEIGHTS_DIR

HOSTILE = ["../x", "/etc/passwd", "a/b", "", ".", "..", ".hidden", "a\\b", "x" * 101]
SAMPLING = dict(prompt="a red circle", negative="", n=2, seed_mode="same seed", seed=5, steps=2,
                guidance=4.0, resolution="native")


def app_model(tmp_dir: Path) -> str:
    """"embedded" when its weights are there, else the tiny SD1 pipeline as a diffusers folder."""
    if (WEIGHTS_DIR / "model_index.json").exists():
        return "embedded"
    from d3po_studio.core.tiny import tiny_pipeline
    folder = tmp_dir / "tiny-sd1"
    tiny_pipeline("sd1").save_pretrained(folder)
    return str(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from d3po_studio.gradio_app import launch
    from d3po_studio.gradio_app.registry import REGISTRY
    root = tmp_path_factory.mktemp("app")
    model = app_model(tmp_path_factory.mktemp("model"))
    demo = launch(model=model, port=free_port(), sessions_dir=root / "sessions",
                  export_dir=root / "exports", block=False)
    yield demo, root, model
    demo.close()
    REGISTRY.close_all()


def learned(client, timeout: float = 120) -> str:
    """Tick /progress (the page's timer) until the clicks queued by /prefer are learned; the
    status it then reports."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy, status, *_ = client.predict(0, api_name="/progress")
        if status and "The LoRA holds" in status:
            return status
        time.sleep(0.2)
    raise AssertionError(f"no update reported within {timeout} s")


def rounds(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rounds/*/round.json"))]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_click_loop_undo_export(server):
    demo, root, _ = server
    c = Client(demo.local_url, verbose=False)
    c.predict("s1", 3e-3, 0.1, 4, api_name="/new_session")
    gallery, seed, status, *_ = c.predict(**SAMPLING, api_name="/sample")
    assert len(gallery["value"]) == 2 and seed == 5 and "Click the image you prefer" in status

    out = c.predict(best=1, **SAMPLING, api_name="/prefer")       # the next pair, before the update
    assert out[1] == 5 and "Click 1 saved" in out[2] and "**1 click**" in out[3]
    assert "Learned from click 1" in learned(c)
    c.predict(**SAMPLING, api_name="/skip")
    c.predict(best=0, **SAMPLING, api_name="/prefer")
    note, summary, *_ = c.predict(api_name="/undo")
    assert "Undid your last learned click (image #1 of “a red circle”)" in note and "back to 1 learned click" in note
    assert "3 clicks** — 1 update in the LoRA now; 1 applied, 1 skipped, 1 undone" in summary

    folder = root / "sessions" / "s1"
    recs = rounds(folder)
    assert [r["status"] for r in recs] == ["applied", "skipped", "undone", "shown"]
    assert recs[0]["choice"] == {"best": 1} and recs[1]["choice"] == {"none": True}
    assert all(r["seed"] == 5 for r in recs)
    assert json.loads((folder / "HEAD").read_text())["checkpoint"] is not None

    path, note = c.predict("my-lora", "kohya", api_name="/export")
    for f in (folder / "exports" / "my-lora.kohya.safetensors", root / "exports" / "my-lora.kohya.safetensors"):
        with safe_open(str(f), "pt") as st:
            keys = list(st.keys())
            assert st.metadata()["d3po_studio.num_preferences"] == "1"     # after the undo
        assert keys and all(k.startswith("lora_unet_") for k in keys)
    c.predict("my-lora", "diffusers", api_name="/export")
    assert (folder / "exports" / "my-lora.diffusers.safetensors").is_file()

    base, tuned, caption = c.predict(prompt="a red circle", negative="", seed=3, scale=1.0, steps=2,
                                     guidance=4.0, resolution="native", api_name="/compare")
    assert Path(base).is_file() and Path(tuned).is_file()


def test_settings_rank_fixed_after_first_click_and_errors_shown(server):
    demo, root, _ = server
    c = Client(demo.local_url, verbose=False)
    c.predict("s2", 3e-3, 0.1, 4, api_name="/new_session")
    c.predict(3e-3, 0.1, 8, api_name="/apply_settings")          # before any click: allowed
    c.predict(**SAMPLING, api_name="/sample")
    c.predict(best=0, **SAMPLING, api_name="/prefer")
    with pytest.raises(AppError, match="fixed after the first update"):
        c.predict(3e-3, 0.1, 4, api_name="/apply_settings")
    c.predict(1e-3, 0.2, 8, api_name="/apply_settings")           # lr and beta may change
    settings = json.loads((root / "sessions" / "s2" / "session.json").read_text())["settings"]
    assert (settings["lr"], settings["beta"], settings["lora_rank"]) == (1e-3, 0.2, 8)
    with pytest.raises(AppError, match="resolution 'abc'"):
        c.predict(**{**SAMPLING, "resolution": "abc"}, api_name="/sample")
    c.predict(**SAMPLING, api_name="/sample")                      # the server still works


def test_hostile_names_are_refused(server):
    demo, root, _ = server
    c = Client(demo.local_url, verbose=False)
    before = sorted(p.relative_to(root.parent) for p in root.parent.rglob("*"))
    for name in HOSTILE:
        with pytest.raises(AppError, match="not allowed"):
            c.predict(name, 3e-3, 0.1, 4, api_name="/new_session")
        with pytest.raises(AppError, match="not allowed"):
            c.predict(name, api_name="/resume_session")
    c.predict("s3", 3e-3, 0.1, 4, api_name="/new_session")
    for name in HOSTILE:
        with pytest.raises(AppError, match="not allowed"):
            c.predict(name, "kohya", api_name="/export")
    after = sorted(p.relative_to(root.parent) for p in root.parent.rglob("*"))
    new = [p for p in after if p not in before]
    assert new and all(p.parts[:3] == (root.name, "sessions", "s3") for p in new), new


def test_only_session_files_are_served(server):
    demo, root, _ = server
    image = next((root / "sessions").glob("*/rounds/*/image_0.png"), None)
    assert image is not None, "run after a test that sampled"
    base = demo.local_url.rstrip("/") + "/gradio_api/file="
    assert http_status(base + str(image)) == 200
    assert http_status(base + "/etc/passwd") in (403, 404)
    assert http_status(base + str(Path.cwd() / "pyproject.toml")) in (403, 404)
    assert http_status(base + str(Path(__file__).resolve())) in (403, 404)


def test_a_session_belongs_to_one_tab(server):
    demo, root, _ = server
    a, b = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
    a.predict("shared", 3e-3, 0.1, 4, api_name="/new_session")
    with pytest.raises(AppError, match="open in another browser tab"):
        b.predict("shared", api_name="/resume_session")
    with pytest.raises(AppError, match="no session is open in this tab"):
        b.predict(api_name="/undo")
    a.predict(**SAMPLING, api_name="/sample")
    b.predict("other", 3e-3, 0.1, 4, api_name="/new_session")
    b.predict(**SAMPLING, api_name="/sample")
    b.predict(best=1, **SAMPLING, api_name="/prefer")
    learned(b)
    assert [r["status"] for r in rounds(root / "sessions" / "shared")] == ["shown"]
    assert [r["status"] for r in rounds(root / "sessions" / "other")] == ["applied", "shown"]


def test_second_preference_on_a_round_is_a_message(server):
    """A double click reaching the server: the core refuses it, the page shows why."""
    from d3po_studio.gradio_app.callbacks import AppConfig, Callbacks
    from d3po_studio.gradio_app.registry import SessionRegistry
    demo, root, model = server
    cb = Callbacks(AppConfig(model=model, sessions_dir=root / "direct", registry=SessionRegistry()))
    tab = gr.Request(session_hash="tab-1")
    cb.new_session("d", 3e-3, 0.1, 4, request=tab)
    folder = str(root / "direct" / "d")
    sampling = list(SAMPLING.values())
    _, round_id, *_ = cb.sample(folder, *sampling, request=tab, progress=lambda *a, **k: None)
    cb.prefer(folder, round_id, 0, *sampling, request=tab, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="already has a preference"):
        cb.prefer(folder, round_id, 1, *sampling, request=tab, progress=lambda *a, **k: None)
    cb.registry.close_all()


def test_a_model_that_fails_to_load_is_a_message(tmp_path):
    from d3po_studio.gradio_app import launch
    demo = launch(model=str(tmp_path / "no-such-model.safetensors"), port=free_port(),
                  sessions_dir=tmp_path / "sessions", block=False)
    try:
        c = Client(demo.local_url, verbose=False)
        with pytest.raises(AppError, match="ModelLoadError"):
            c.predict("s", 3e-3, 0.1, 4, api_name="/new_session")
        assert c.predict(api_name="/list_sessions") is not None     # still serving
        assert not (tmp_path / "sessions" / "s").exists()
    finally:
        demo.close()


@pytest.mark.parametrize("name", HOSTILE + [" ", "a b", "é", "x\x00", "~root"])
def test_safe_name_refuses(name):
    from d3po_studio.core.errors import ConfigError
    from d3po_studio.gradio_app.paths import safe_name
    with pytest.raises(ConfigError, match="not allowed"):
        safe_name(name)


@pytest.mark.parametrize("name", ["s1", "my.session", "A_b-3", "x" * 100, "a..b"])
def test_safe_name_accepts(name):
    from d3po_studio.gradio_app.paths import safe_name
    assert safe_name(name) == name


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    from d3po_studio.core.errors import ConfigError
    from d3po_studio.gradio_app.paths import child
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(ConfigError, match="outside"):
        child(tmp_path / "root", "link")
    assert child(tmp_path / "root", "ok") == (tmp_path / "root" / "ok").resolve()
