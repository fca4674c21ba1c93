"""Names a user types in the app (session, export file) and the folders they may land in.

A name is one path component from the whitelist ``[A-Za-z0-9._-]``, 1–100 characters, not
starting with a dot: ``../x``, ``/etc/passwd``, ``a/b``, ``""``, ``.`` and ``.hidden`` are refused,
so a typed name can never leave the folder it is joined to.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..core.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")


def safe_name(name, what: str = "name") -> str:
    """Return ``name`` stripped of surrounding spaces if it is a safe single-folder name."""
    if not isinstance(name, str) or not _NAME.match(name.strip()):
        raise ConfigError(f"{what} {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-', "
                          "not starting with a dot (no '/', no '..')")
    return name.strip()


def child(root: Path, name, what: str = "name") -> Path:
    """``root / name`` for a safe ``name``, checked once more to resolve inside ``root``."""
    root = Path(root).resolve()
    path = (root / safe_name(name, what)).resolve()
    if path.parent != root:
        raise ConfigError(f"{what} {name!r} resolves outside {root}; choose another name")
    return path


def export_file_name(name, fmt: str) -> str:
    """A safe export file name ending in ``.safetensors`` (added when missing)."""
    name = safe_name(name, "export file name")
    return name if name.endswith(".safetensors") else f"{name}.{fmt}.safetensors"
