"""The nodes' schemas without ComfyUI (issue 11, items 18, 19 and 22): every input and output has a
tooltip, the Load node's tooltip lists the embedded model's vocabulary, every shipped default
prompt is inside it, and building the schemas imports none of diffusers, peft, bitsandbytes or
transformers.

`define_schema` is called against a recording stand-in for `comfy_api.latest.io` that keeps
each call's arguments; tests/test_comfyui_integration.py checks the same against ComfyUI's own."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from d3po_studio.core.embedded import vocabulary_text
from d3po_studio.core.embedded.world import VOCABULARY, parse_prompt
from d3po_studio.nodes import NODES, host

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "peft", "bitsandbytes", "transformers")

STUB = '''
import sys, types

class Call:
    """io.X.Input(...), io.Custom("T").Output(...), io.Schema(...): records its arguments."""
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
    def __call__(self, *args, **kwargs):
        return Call(*args, **kwargs)
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Call()

latest = types.ModuleType("comfy_api.latest")
latest.io = Call()
sys.modules["comfy_api"] = types.ModuleType("comfy_api")
sys.modules["comfy_api.latest"] = latest
'''


@pytest.fixture(scope="module")
def schemas(tmp_path_factory):
    namespace = {}
    exec(STUB, namespace)      # installs the stand-in in sys.modules
    host.use(host.PlainHost(tmp_path_factory.mktemp("schema")))
    try:
        yield {cls.__name__: cls.define_schema().kwargs for cls in NODES}
    finally:
        host.use(None)
        sys.modules.pop("comfy_api.latest")
        sys.modules.pop("comfy_api")


def _field(call, name):
    return call.kwargs.get(name)


def test_every_input_and_output_has_a_tooltip(schemas):
    for node, schema in schemas.items():
        for call in schema["inputs"] + schema["outputs"]:
            label = call.args[0] if call.args else _field(call, "display_name")
            assert _field(call, "tooltip"), f"{node}: {label} has no tooltip"


def test_session_outputs_say_what_they_carry(schemas):
    outputs = [c for s in schemas.values() for c in s["outputs"] if _field(c, "display_name") == "session"]
    assert len(outputs) == 3 and all("session" in _field(c, "tooltip") for c in outputs)


def test_load_tooltip_lists_the_embedded_vocabulary(schemas):
    (checkpoint,) = [c for c in schemas["LoadSession"]["inputs"] if c.args[:1] == ("checkpoint",)]
    tooltip = _field(checkpoint, "tooltip")
    assert vocabulary_text() in tooltip
    assert all(f" {word}" in tooltip for word in VOCABULARY if word not in ("a", "on"))


def test_shipped_default_prompts_are_inside_the_embedded_vocabulary(schemas):
    (prompt,) = [c for c in schemas["SampleRound"]["inputs"] if c.args[:1] == ("prompt",)]
    defaults = [_field(prompt, "default")]
    for path in (REPO / "workflows").glob("*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] in ("D3POSample", "CLIPTextEncode") and node["widgets_values"][0]:
                defaults.append(node["widgets_values"][0])
    assert len(defaults) >= 4
    for text in defaults:
        parse_prompt(text)           # raises ConfigError naming a word outside the vocabulary


def test_docs_list_the_vocabulary():
    text = (REPO / "docs" / "embedded.md").read_text()
    section = text.split("## The world it knows", 1)[1].split("\n## ", 1)[0]
    assert vocabulary_text() in section
    assert all(word in section for word in VOCABULARY)


def test_building_the_schemas_imports_no_model_library():
    """ComfyUI imports the pack and builds every schema at start-up: that must stay light."""
    code = STUB + f'''
import tempfile
from pathlib import Path
from d3po_studio.nodes import NODES, host
host.use(host.PlainHost(Path(tempfile.mkdtemp())))
for cls in NODES:
    cls.define_schema()
heavy = [m for m in {HEAVY!r} if m in sys.modules]
assert not heavy, heavy
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
