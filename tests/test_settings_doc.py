"""docs/settings.md states every setting's default, and states it right.

A default changed in the code but not in the docs (or the other way round) is a broken promise:
it happened once (the code said drift_budget=0.15 while the study and every doc said 0.1).
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from d3po_studio.core.config import Settings

DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
# Defaults the table states in words, because they depend on the model.
IN_WORDS = {"height": "the model's native size", "width": "the model's native size"}


def documented_defaults() -> dict[str, str]:
    """{field: the default column's text} from the field tables (before the study sections)."""
    text = DOC.read_text().split("## How the update's defaults were chosen")[0]
    found = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`(\w+)`", cells[0])
        values = [v.strip() for v in cells[1].split(",")] if len(names) > 1 else [cells[1]]
        if len(values) == 1:          # one default for every field of the row ("`height`, `width`")
            values = values * len(names)
        assert len(values) == len(names), f"cannot read the defaults of {names} in {line!r}"
        found.update(zip(names, values))
    return found


def parse(text: str):
    """The value a default cell means: "20 (embedded: 10)" -> 20, `"d3po"` -> "d3po", auto -> "auto"."""
    text = re.sub(r"\s*\(.*\)$", "", text).strip("`").strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def test_every_setting_has_a_documented_default():
    missing = {f.name for f in dataclasses.fields(Settings)} - set(documented_defaults())
    assert not missing, f"docs/settings.md does not document {sorted(missing)}"


def test_documented_defaults_are_the_codes():
    code = Settings()
    for name, text in documented_defaults().items():
        value = getattr(code, name)
        if name in IN_WORDS:
            assert value is None and text.startswith(IN_WORDS[name]), (name, text)
        elif name == "lora_targets":
            assert parse(text) == ", ".join(value), text
        else:
            doc = parse(text)
            assert doc == value and type(doc) is type(value) or (
                isinstance(value, float) and isinstance(doc, int) and float(doc) == value), \
                f"docs/settings.md says {name} defaults to {text!r}; the code says {value!r}"
