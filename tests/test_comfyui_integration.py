"""The node pack inside a real ComfyUI: runs only when COMFYUI_DIR points at a ComfyUI checkout.

    COMFYUI_DIR=/work/comfy COMFYUI_PYTHON=/work/comfy-venv/bin/python pytest tests/test_comfyui_integration.py

COMFYUI_PYTHON is the interpreter of a venv holding ComfyUI's requirements and this package's
dependencies (default: the one running pytest). The test starts ComfyUI on 127.0.0.1 with the
pack symlinked into custom_nodes and a random-weight, full SD 1.5-shaped checkpoint (ComfyUI
recognises models by tensor shapes; written once, cached in the temp folder), submits
tests/comfy_api_graph.json to /prompt, answers the pick over HTTP, and checks /history, the
LoRA files and that the stock LoraLoader logged no "lora key not loaded". A second queue run
(mode "index") resumes the same session; a third is interrupted while it waits for the click.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout (and COMFYUI_PYTHON to its venv's python) to run")

REPO = Path(__file__).resolve().parents[1]
GRAPH = json.loads((Path(__file__).parent / "comfy_api_graph.json").read_text())
CKPT_NAME = GRAPH["6"]["inputs"]["ckpt_name"]
PICK_NODE, UPDATE_NODE = "3", "4"
OUR_NODES = {"D3POLoadSession", "D3POSample", "D3POPick", "D3POUpdate", "D3POExportLora", "D3POUndo"}


def sd15_random_checkpoint() -> Path:
    """A full SD 1.5-shaped checkpoint with random weights in the original (LDM) layout, fp16."""
    path = Path(tempfile.gettempdir()) / "d3po-comfyui-it" / "sd15-random-fp16.safetensors"
    if path.is_file():
        return path
    import safetensors.torch
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from d3po_studio.core.loading import CONFIGS_DIR
    from test_loading import to_ldm_checkpoint      # the diffusers -> LDM key map of the loader tests

    config = CONFIGS_DIR / "sd1"
    torch.manual_seed(0)
    parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet")).half(),
             "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")).half(),
             "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")).half()}
    state = to_ldm_checkpoint(SimpleNamespace(**parts))
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(path) + ".part")
    os.replace(str(path) + ".part", path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read()) if "json" in r.headers.get("Content-Type", "") else r.read()


def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
        return json.loads(body) if body else None


def _until(fn, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = fn()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "d3po-studio").symlink_to(REPO, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / CKPT_NAME).symlink_to(sd15_random_checkpoint())
    (base / "user").mkdir()
    port = _free_port()
    log = base / "comfyui.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", str(base)], cwd=COMFYUI_DIR, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"ComfyUI exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            return _get(url + "/object_info/D3POLoadSession")
        except (urllib.error.URLError, ConnectionError):
            return None
    try:
        _until(up, 180, "ComfyUI to start")
        yield {"url": url, "base": base, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _queue(comfy, graph) -> str:
    return _post(comfy["url"] + "/prompt", {"prompt": graph, "client_id": "d3po-test"})["prompt_id"]


def _history(comfy, prompt_id, timeout=900):
    return _until(lambda: _get(f"{comfy['url']}/history/{prompt_id}").get(prompt_id), timeout,
                  f"prompt {prompt_id} to finish")


def _pending_pick(comfy, timeout=900):
    return _until(lambda: _get(comfy["url"] + "/d3po/pick").get(PICK_NODE), timeout, "the Pick node to wait")


def test_pack_loads_with_tooltips_workflows_and_script(comfy):
    info = _get(comfy["url"] + "/object_info")
    assert OUR_NODES <= set(info)
    for node in OUR_NODES:
        for name, spec in info[node]["input"]["required"].items():
            assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    assert CKPT_NAME in info["D3POLoadSession"]["input"]["required"]["checkpoint"][1]["options"]
    templates = _get(comfy["url"] + "/workflow_templates")
    assert {"d3po_steering_loop_embedded", "d3po_steering_loop_sd15"} <= set(templates["d3po-studio"])
    assert any(e.endswith("d3po-studio/d3po_pick.js") for e in _get(comfy["url"] + "/extensions"))
    text = comfy["log"].read_text()
    assert "Cannot import" not in text and "IMPORT FAILED" not in text


def test_loop_with_a_click_then_the_stock_lora_loader(comfy):
    prompt_id = _queue(comfy, GRAPH)
    waiting = _pending_pick(comfy)
    assert waiting["n"] == 2 and len(waiting["images"]) == 2
    ref = waiting["images"][1]
    png = _get(f"{comfy['url']}/view?filename={ref['filename']}&subfolder={ref['subfolder']}&type={ref['type']}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert _post(comfy["url"] + "/d3po/pick", {"node_id": PICK_NODE, "index": 1}) == {"ok": True}

    done = _history(comfy, prompt_id)
    assert done["status"]["status_str"] == "success", done["status"]
    report = json.loads(done["outputs"][UPDATE_NODE]["text"][0])
    assert report["updates"] == 1 and report["pairs"] == 1
    loras = comfy["base"] / "models" / "loras" / "d3po"
    import safetensors
    for name in ("it.safetensors", "it-export.safetensors"):
        with safetensors.safe_open(loras / name, "pt") as f:
            keys = list(f.keys())
        assert len(keys) == 3 * 128 and all(k.startswith("lora_unet_") for k in keys), name
    log = comfy["log"].read_text()
    assert "lora key not loaded" not in log
    assert done["outputs"]["13"]["images"], "the stock preview branch made no image"

    # A second queue run resumes the same open session; mode "index" needs no click (API graphs).
    graph = json.loads(json.dumps(GRAPH))
    graph[PICK_NODE]["inputs"].update(mode="index", index=0)
    graph["2"]["inputs"]["seed"] = 2
    done = _history(comfy, _queue(comfy, graph))
    assert done["status"]["status_str"] == "success", done["status"]
    assert json.loads(done["outputs"][UPDATE_NODE]["text"][0])["updates"] == 2
    assert "lora key not loaded" not in comfy["log"].read_text()


def test_interrupt_while_waiting_for_the_click(comfy):
    graph = json.loads(json.dumps(GRAPH))
    graph["2"]["inputs"]["seed"] = 3
    prompt_id = _queue(comfy, graph)
    _pending_pick(comfy)
    _post(comfy["url"] + "/interrupt", {})
    done = _history(comfy, prompt_id, timeout=120)
    assert done["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in done["status"]["messages"])
    assert _get(comfy["url"] + "/d3po/pick") == {}
    assert UPDATE_NODE not in done["outputs"]
