"""Names a user types in the app (session, export file) and the folders they may land in.

Default folders all live under one user data directory, ``data_home()``: the ``--home`` flag,
else ``$D3PO_HOME``, else ``$XDG_DATA_HOME/d3po-studio``, else ``~/.local/share/d3po-studio``.
Nothing is written to the current directory unless a folder is given.

A name is one path component from the whitelist ``[A-Za-z0-9._-]``, 1–100 characters, not
starting with a dot: ``../x``, ``/etc/passwd``, ``a/b``, ``""``, ``.`` and ``.hidden`` are refused,
so a typed name can never leave the folder it is joined to.
"""
from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

from ..core.errors import ConfigError

HOME_ENV = "D3PO_HOME"
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


def data_home(override=None) -> Path:
    """The user data directory: ``override`` (--home), $D3PO_HOME, $XDG_DATA_HOME/d3po-studio,
    or ~/.local/share/d3po-studio (not created here)."""
    if override:
        return Path(override).expanduser().resolve()
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser().resolve()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return (Path(xdg).expanduser() / "d3po-studio").resolve()


def sessions_home(home=None) -> Path:
    """Where the app creates, lists and resumes sessions by default."""
    return data_home(home) / "sessions"


def new_run_folder(root: Path, prefix: str, now: datetime.datetime | None = None) -> Path:
    """A new, empty folder ``root/prefix-YYYYmmdd-HHMMSS[-k]`` (``now`` = the current time),
    created atomically, so two callers in the same second (two tabs, two commands) never get
    the same one."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamp = f"{prefix}-{now or datetime.datetime.now():%Y%m%d-%H%M%S}"
    for k in range(1, 1000):
        folder = root / (stamp if k == 1 else f"{stamp}-{k}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise ConfigError(f"could not find a free folder name for {stamp} in {root}; remove old ones")
