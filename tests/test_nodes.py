"""The ComfyUI nodes without ComfyUI: each node's execute called directly on a PlainHost (real
folders, real threading.Event, the pick routes served over real HTTP), and the workflow files.

The model is the embedded one when its weights exist, else the tiny SD1 pipeline saved as a
diffusers folder (which the Load node lists like any models/diffusers folder)."""
import json
import math
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import safetensors

from d3po_studio.nodes import NODES, ExportLora, LoadSession, PickImage, SampleRound, UndoUpdate, UpdateLora
from d3po_studio.nodes import host, picks, registry
from d3po_studio.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = (REPO / "core" / "embedded" / "weights" / "model_index.json").is_file()
STOCK_NODES = {"CheckpointLoaderSimple", "LoraLoader", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
               "VAEDecode", "PreviewImage", "SaveImage", "Note"}
OUR_NODES = {"D3POLoadSession", "D3POSample", "D3POPick", "D3POUpdate", "D3POExportLora", "D3POUndo"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny SD1 pipeline as a diffusers folder, written once per module."""
    if EMBEDDED:
        return None
    from d3po_studio.core.tiny import tiny_pipeline
    folder = tmp_path_factory.mktemp("tiny") / "tiny-sd1"
    tiny_pipeline("sd1").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_folder):
    """One PlainHost for the module (sessions stay open across tests, as in one ComfyUI process)."""
    h = host.PlainHost(tmp_path_factory.mktemp("comfy"))
    if tiny_folder is not None:
        (h.root / "diffusers" / tiny_folder.name).symlink_to(tiny_folder, target_is_directory=True)
    host.use(h)
    yield h
    registry.close_all()
    host.use(None)


@pytest.fixture(scope="module")
def shared(plain):
    """A session shared by the tests that do not test loading."""
    return load(plain, name="shared")


def checkpoint_choice(h) -> str:
    """'embedded' when shipped, else the tiny pipeline's folder that the `plain` fixture linked."""
    return "embedded" if EMBEDDED else "diffusers:tiny-sd1"


DTYPE, SIZE = "float32", 0       # the model's native size; 2 DDIM steps and no CFG keep CI fast


def own_lora_name(session_name, tag=""):
    """Where a session's LoRA goes: the embedded model's in a folder and name of their own."""
    if EMBEDDED:
        return f"d3po-embedded/{session_name}{tag}.embedded.safetensors"
    return f"d3po/{session_name}{tag}.safetensors"


def load(h, name="s1", lr=1e-2):
    out = LoadSession.execute(checkpoint=checkpoint_choice(h), session_name=name, lr=lr, beta=0.1, lora_rank=4,
                              dtype=DTYPE, optimizer="adamw", gradient_checkpointing=False)
    return out.result[0]


def sample(session, n=2, seed=0):
    return SampleRound.execute(session=session, prompt="a red circle", negative_prompt="", n=n, seed=seed,
                               steps=2, guidance=1.0, width=SIZE, height=SIZE).result


def test_loop_load_sample_pick_update_export_undo(plain):
    import torch
    with torch.inference_mode():          # as ComfyUI runs every node
        _loop(plain)
    session = load(plain, name="s1")      # tensors made under inference mode still train outside it
    _, rnd = sample(session, seed=1)
    assert json.loads(UpdateLora.execute(pick=registry.Pick(rnd, 1)).result[2])["updates"] == 1


def _loop(plain):
    session = load(plain, name="s1")
    assert session.folder.root == plain.root / "d3po" / "s1"
    from d3po_studio.nodes.session_nodes import model_choices
    assert model_choices(plain)[0] == "embedded"
    assert EMBEDDED or "diffusers:tiny-sd1" in model_choices(plain)
    images, rnd = sample(session, n=3)
    assert images.dtype.is_floating_point and images.shape[0] == 3 and images.shape[3] == 3
    assert 0.0 <= images.min() and images.max() <= 1.0 and rnd.n == 3
    assert any(e == "progress" for e, _ in plain.events)

    pick, picked, index = PickImage.execute(round=rnd, mode="index", index=2).result
    assert index == 2 and pick.index == 2 and picked.shape == (1, *images.shape[1:])
    assert (picked[0] == images[2]).all()

    out_session, lora_name, report = UpdateLora.execute(pick=pick).result
    assert out_session is session and lora_name == own_lora_name("s1")
    report = json.loads(report)
    assert report["updates"] == 1 and math.isfinite(report["loss"]) and report["pairs"] == 2
    assert report["added_memory_bytes"] <= report["peak_memory_bytes"]     # this update's own (item 21)
    with safetensors.safe_open(plain.loras_dir() / lora_name, "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    assert header["ss_base_model_version"] == ("d3po_studio_embedded" if EMBEDDED else "sd_v1")

    (name,) = ExportLora.execute(session=session, file_name="mine/tuned", format="kohya").result
    assert name == "mine/tuned.safetensors" and (plain.loras_dir() / name).is_file()
    with pytest.raises(ConfigError, match="inside"):
        ExportLora.execute(session=session, file_name="../escape", format="kohya")

    undone = UndoUpdate.execute(session=session)
    assert json.loads(undone.result[2])["updates"] == 0 and session.updates == 0
    assert undone.ui == {"text": ["Undid the update from the pick on 'a red circle'. "
                                  "The LoRA is back to 0 updates."]}     # shown in the node and in /history


def test_default_lora_names_follow_the_session(plain, shared):
    """Two sessions' Save LoRA with the default file name write two files, each named after its
    session (issue 11, item 17); an explicit name is kept; files are readable by others (item 20)."""
    import os
    other = load(plain, name="other")
    old = os.umask(0o022)
    try:
        (a,) = ExportLora.execute(session=shared, file_name="", format="kohya").result
        (b,) = ExportLora.execute(session=other, file_name=" ", format="kohya").result
    finally:
        os.umask(old)
    assert (a, b) == (own_lora_name("shared", "-saved"), own_lora_name("other", "-saved"))
    assert (plain.loras_dir() / a).stat().st_mode & 0o777 == 0o644
    (c,) = ExportLora.execute(session=shared, file_name="mine/x.safetensors", format="kohya").result
    assert c == "mine/x.safetensors"


def test_load_reuses_the_open_session_and_resumes_after_a_settings_change(plain):
    first = load(plain, name="reuse")
    assert load(plain, name="reuse") is first                                   # same inputs: same object, no 2nd lock
    _, rnd = sample(first)
    UpdateLora.execute(pick=registry.Pick(rnd, 0))
    again = load(plain, name="reuse", lr=5e-3)                                   # changed setting: reopened from disk
    assert again is not first and again.updates == 1 and again.settings.lr == 5e-3
    with pytest.raises(ConfigError, match="session_name"):
        LoadSession.execute(checkpoint="embedded", session_name="../x", lr=1e-2, beta=0.1, lora_rank=4,
                            dtype=DTYPE, optimizer="adamw", gradient_checkpointing=False)


def test_pick_none_logs_without_training(shared):
    session = shared
    _, rnd = sample(session)
    pick, _, index = PickImage.execute(round=rnd, mode="none", index=0).result
    assert index == -1 and pick.none
    report = json.loads(UpdateLora.execute(pick=pick).result[2])
    assert report == {"skipped": True, "updates": session.updates}
    assert session.history()[-1]["status"] == "skipped"


def test_pick_index_out_of_range(shared):
    _, rnd = sample(shared)
    with pytest.raises(ConfigError, match="out of range"):
        PickImage.execute(round=rnd, mode="index", index=5)


# ---------------------------------------------------------------------- the click, over HTTP
def _post(url, body):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _run_in_thread(fn, **kwargs):
    box = {}

    def target():
        try:
            box["result"] = fn(**kwargs)
        except BaseException as e:   # noqa: BLE001 - handed to the test thread
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _wait_pending(url, node, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with urllib.request.urlopen(url, timeout=5) as r:
            pending = json.loads(r.read())
        if node in pending:
            return pending[node]
        time.sleep(0.05)
    raise AssertionError("the Pick node never started waiting")


def _click_pick(h, url, n=2):
    """Sample on the shared session and start a click-mode Pick on another thread; returns
    once it waits."""
    _, rnd = sample(load(h, name="shared"), n=n)
    t, box = _run_in_thread(PickImage.execute, round=rnd, mode="click", index=0)
    return t, box, rnd, _wait_pending(url, h.node)


@pytest.fixture
def served(plain):
    server = plain.serve(picks.BOARD)
    yield f"http://127.0.0.1:{server.server_address[1]}{host.PICK_ROUTE}"
    server.shutdown()


def test_click_over_http_releases_the_pick(plain, served):
    t, box, rnd, info = _click_pick(plain, served)
    assert info["round"] == rnd.batch_id and info["n"] == 2 and len(info["images"]) == 2
    shown = [d for e, d in plain.events if e == "d3po.pick"]
    assert shown and shown[-1]["node"] == plain.node
    assert all((plain.temp_dir() / ref["subfolder"] / ref["filename"]).is_file() for ref in shown[-1]["images"])
    assert _post(served, {"node_id": plain.node, "index": 7})[0] == 400      # out of range: still waiting
    assert _post(served, {"node_id": "999", "index": 0})[0] == 404
    assert _post(served, {"node_id": plain.node, "index": 1}) == (200, {"ok": True})
    t.join(10)
    pick, _, index = box["result"].result
    assert index == 1 and pick.index == 1 and picks.BOARD.pending() == {}


def test_none_over_http(plain, served):
    t, box, _, _ = _click_pick(plain, served)
    assert _post(served, {"node_id": plain.node, "none": True})[0] == 200
    t.join(10)
    assert box["result"].result[0].none


def test_cancel_over_http_stops_the_run(plain, served):
    t, box, _, _ = _click_pick(plain, served)
    assert _post(served, {"node_id": plain.node, "cancel": True})[0] == 200
    t.join(10)
    assert isinstance(box["error"], host.Interrupted) and picks.BOARD.pending() == {}


def test_interrupt_stops_the_wait(plain, served):
    t, box, _, _ = _click_pick(plain, served)
    plain.interrupt()
    t.join(10)
    assert not t.is_alive() and isinstance(box["error"], host.Interrupted)
    assert picks.BOARD.pending() == {}


def test_interrupt_stops_sampling(plain, shared):
    plain.interrupt()
    with pytest.raises(host.Interrupted):
        sample(shared)


def test_interrupt_during_an_update_waits_for_its_end(plain):
    report = plain.progress(3, interruptible=False)
    plain.interrupt()
    report(1, 3)                                  # mid-update: not raised, kept
    with pytest.raises(host.Interrupted):
        plain.check_interrupt()                   # raised at the next check, after the update


@pytest.mark.parametrize("payload, message", [
    ({"index": 0}, "node_id"),
    ({"node_id": "1"}, "exactly one"),
    ({"node_id": "1", "index": 0, "none": True}, "exactly one"),
    ({"node_id": "1", "index": "0"}, "integer"),
    ([1, 2], "node_id"),
])
def test_bad_pick_requests(payload, message):
    status, body = picks.handle_post(picks.PickBoard(), payload)
    assert status == 400 and message in body["error"]


def test_nodes_that_must_rerun_every_queue():
    for cls in (SampleRound, PickImage, UpdateLora, ExportLora, UndoUpdate):
        assert math.isnan(cls.fingerprint_inputs())
    assert not hasattr(LoadSession, "fingerprint_inputs")      # cached by ComfyUI: the session persists


# ---------------------------------------------------------------------- workflow files
@pytest.mark.parametrize("path", sorted((REPO / "workflows").glob("*.json")), ids=lambda p: p.name)
def test_workflows_parse_and_name_known_nodes(path):
    wf = json.loads(path.read_text())
    types = {n["type"] for n in wf["nodes"]}
    assert types <= OUR_NODES | STOCK_NODES, types - OUR_NODES - STOCK_NODES
    ids = {n["id"]: n for n in wf["nodes"]}
    for lid, a, aslot, b, bslot, _ in wf["links"]:
        assert lid in ids[a]["outputs"][aslot]["links"] and ids[b]["inputs"][bslot]["link"] == lid


def test_loop_workflows_do_not_share_a_session_or_a_lora_file():
    """Running one shipped workflow must not overwrite another's files (issue 11, item 17)."""
    def widgets(path, node_type):
        return next(n["widgets_values"] for n in json.loads(path.read_text())["nodes"] if n["type"] == node_type)
    loops = sorted((REPO / "workflows").glob("d3po_steering_loop_*.json"))
    sessions = [widgets(p, "D3POLoadSession")[1] for p in loops]
    assert len(loops) == 2 and len(set(sessions)) == 2
    assert all(widgets(p, "D3POExportLora")[0] == "" for p in loops)     # default: named after the session
    assert widgets(REPO / "workflows" / "d3po_undo.json", "D3POLoadSession")[1] == \
        widgets(REPO / "workflows" / "d3po_steering_loop_embedded.json", "D3POLoadSession")[1]


def test_there_is_a_loop_workflow_with_a_stock_preview_branch():
    types = [{n["type"] for n in json.loads(p.read_text())["nodes"]} for p in (REPO / "workflows").glob("*.json")]
    loop = {"D3POLoadSession", "D3POSample", "D3POPick", "D3POUpdate", "D3POExportLora"}
    assert any(loop <= t and {"CheckpointLoaderSimple", "LoraLoader", "KSampler"} <= t for t in types)
    assert {cls.__name__ for cls in NODES} == {"LoadSession", "SampleRound", "PickImage", "UpdateLora",
                                              "ExportLora", "UndoUpdate"}


def test_package_is_a_comfyui_pack_and_imports_without_comfyui():
    import inspect
    import subprocess
    import sys

    import d3po_studio
    assert inspect.iscoroutinefunction(d3po_studio.comfy_entrypoint)
    assert (REPO / d3po_studio.WEB_DIRECTORY / "d3po_pick.js").is_file()
    code = ("import sys, d3po_studio, d3po_studio.nodes; "
            "assert not any(m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'server') for m in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


# ---------------------------------------------------------------------- ComfyUI-Manager install
def test_requirements_are_loose_and_never_torch():
    lines = [l.split("#")[0].strip() for l in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = [l for l in lines if l]
    assert reqs and not any(l.lower().startswith(("torch", "torchvision", "xformers")) for l in reqs)
    assert not any("==" in l or "<" in l for l in reqs)


def test_install_skips_cuda_extras_without_a_cuda_torch():
    import subprocess
    import sys

    import torch
    out = subprocess.run([sys.executable, str(REPO / "install.py"), "--dry-run"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0
    if torch.version.cuda and torch.cuda.is_available():
        assert "xformers" in out.stdout and f"torch=={torch.__version__}" in out.stdout
    else:
        assert "skipping the optional CUDA extras" in out.stdout
