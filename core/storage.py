"""The session folder on disk: atomic writes, checkpoints, rounds. No torch math here.

Layout (docs/session-format.md):

    session.json                      model, fingerprint, family, settings (format version 1)
    HEAD                              {"checkpoint": "000007"}: the state the session is at
    checkpoints/000007/               lora.safetensors, optimizer.pt, meta.json {updates, round, parent}
    rounds/<round id>/round.json      prompt, seed, settings, choice, status, report
                                      (round id = <6-digit sequence>-<YYYYmmdd>-<HHMMSS>)
    rounds/<round id>/image_<i>.png   the images shown
    rounds/<round id>/trajectory.safetensors   x_T..x_0, t, log-probs, conditioning

Every file is written to a temporary name in the same folder, flushed to disk and renamed
over the target, so a reader sees the old file or the new one, never half of one. A
checkpoint folder is complete before HEAD names it; a killed process leaves HEAD at the
last completed update.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import SessionError

FORMAT_VERSION = 1
ROUND_ID = re.compile(r"^[0-9]{6}-[0-9]{8}-[0-9]{6}$")   # sequence-date-time: sorts in order
CHECKPOINT_ID = re.compile(r"^[0-9]{6}$")


def _fsync_dir(folder: Path) -> None:
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, data) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True)))


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise SessionError(f"{path} is unreadable or not JSON ({e}); restore it or start a new session") from e


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise SessionError(f"{path} is not a readable safetensors file ({e})") from e


def _read_existing(read, path: Path):
    """``read(path)``, with a missing file as a SessionError that names it."""
    try:
        return read(path)
    except FileNotFoundError as e:
        raise SessionError(f"{path} is missing") from e


class SessionFolder:
    """Paths and atomic reads/writes of one session folder."""

    def __init__(self, root):
        self.root = Path(root)

    # ---- session.json ------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / "session.json"

    def exists(self) -> bool:
        return self.meta_path.exists()

    def read_meta(self) -> dict:
        meta = read_json(self.meta_path)
        if meta.get("format") != FORMAT_VERSION:
            raise SessionError(f"{self.meta_path} has format {meta.get('format')!r}; this version reads "
                               f"format {FORMAT_VERSION}")
        return meta

    def write_meta(self, meta: dict) -> None:
        write_json(self.meta_path, {**meta, "format": FORMAT_VERSION})

    # ---- checkpoints -------------------------------------------------------
    def head(self) -> str | None:
        """The checkpoint HEAD names (None before the first update); SessionError when HEAD is
        unreadable or names a missing checkpoint (``head_state`` says which, without raising)."""
        name, problem = self.head_state()
        if problem is not None:
            raise SessionError(problem)
        return name

    def head_state(self) -> tuple[str | None, str | None]:
        """``(name, problem)``: what HEAD names, and why it cannot be trusted (None if it can).

        A missing HEAD is fine only while no checkpoint exists (a session without updates)."""
        path = self.root / "HEAD"
        try:
            name = read_json(path)["checkpoint"]
        except FileNotFoundError:
            return None, (f"{path} is missing" if self.checkpoint_names() else None)
        except (SessionError, KeyError, TypeError) as e:
            return None, f"{path} is unreadable ({e})"
        if name is not None and not (CHECKPOINT_ID.match(str(name)) and
                                     (self.root / "checkpoints" / name / "meta.json").exists()):
            return name, f"{path} names checkpoint {name!r}, which is missing"
        return name, None

    def set_head(self, name: str | None) -> None:
        write_json(self.root / "HEAD", {"checkpoint": name})

    def checkpoint_names(self) -> list[str]:
        """Complete checkpoint folders (meta.json written), oldest first."""
        folder = self.root / "checkpoints"
        if not folder.exists():
            return []
        return sorted(p.name for p in folder.iterdir() if CHECKPOINT_ID.match(p.name) and (p / "meta.json").exists())

    def next_checkpoint_name(self) -> str:
        folder = self.root / "checkpoints"
        names = [p.name for p in folder.iterdir() if CHECKPOINT_ID.match(p.name)] if folder.exists() else []
        return f"{max((int(n) for n in names), default=0) + 1:06d}"

    def write_checkpoint(self, lora: dict, optimizer_state: dict, meta: dict,
                         evidence: dict[str, torch.Tensor] | None = None) -> str:
        """Write a complete checkpoint folder, then return its name (HEAD is not moved).
        ``evidence``: the tensors of ``step_evidence`` (core/trust_region.py), if the session keeps any."""
        name = self.next_checkpoint_name()
        folder = self.root / "checkpoints" / name
        folder.mkdir(parents=True, exist_ok=False)
        write_tensors(folder / "lora.safetensors", lora)
        atomic_write(folder / "optimizer.pt", lambda p: torch.save(optimizer_state, p))
        if evidence is not None:
            write_tensors(folder / "evidence.safetensors", evidence)
        write_json(folder / "meta.json", meta)   # written last: marks the folder complete
        return name

    def read_lora(self, name: str) -> dict:
        """The LoRA of checkpoint ``name``; SessionError naming the file if it is missing or damaged."""
        return _read_existing(read_tensors, self.root / "checkpoints" / name / "lora.safetensors")

    def read_optimizer(self, name: str) -> dict:
        """The optimizer state of checkpoint ``name``; SessionError naming the file if damaged."""
        path = self.root / "checkpoints" / name / "optimizer.pt"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:   # torch raises zip, pickle and EOF errors for a damaged file
            raise SessionError(f"{path} is missing or damaged ({type(e).__name__}: {e})") from e

    def read_evidence(self, name: str) -> dict[str, torch.Tensor] | None:
        """The ``step_evidence`` tensors of checkpoint ``name``; None if it has none (SessionError if damaged)."""
        path = self.root / "checkpoints" / name / "evidence.safetensors"
        return _read_existing(read_tensors, path) if path.exists() else None

    def read_checkpoint(self, name: str) -> tuple[dict, dict, dict]:
        return self.read_lora(name), self.read_optimizer(name), self.checkpoint_meta(name)

    def checkpoint_meta(self, name: str) -> dict:
        return _read_existing(read_json, self.root / "checkpoints" / name / "meta.json")

    def chain(self, name: str | None) -> list[str]:
        """``name``, its parent, its parent's parent, … as far as complete checkpoints go."""
        out = []
        while name is not None and name not in out:
            try:
                meta = self.checkpoint_meta(name)
            except SessionError:
                break
            out.append(name)
            name = meta.get("parent")
        return out

    def prune_checkpoints(self, keep: set[str], before_remove=None) -> list[str]:
        """Delete every checkpoint folder not in ``keep``; ``before_remove(name)`` runs first for
        each (e.g. to note in its round that the checkpoint is gone). Returns the removed names."""
        folder = self.root / "checkpoints"
        removed = []
        for p in sorted(folder.iterdir()) if folder.exists() else []:
            if CHECKPOINT_ID.match(p.name) and p.name not in keep:
                if before_remove is not None:
                    before_remove(p.name)
                (p / "meta.json").unlink(missing_ok=True)   # first: the folder is no longer complete
                for f in p.iterdir():
                    f.unlink()
                p.rmdir()
                removed.append(p.name)
        return removed

    # ---- rounds ------------------------------------------------------------
    def round_dir(self, round_id: str) -> Path:
        if not ROUND_ID.match(str(round_id)):
            raise SessionError(f"{round_id!r} is not a round id of this session")
        return self.root / "rounds" / round_id

    def round_ids(self) -> list[str]:
        folder = self.root / "rounds"
        if not folder.exists():
            return []
        return sorted(p.name for p in folder.iterdir()
                      if ROUND_ID.match(p.name) and (p / "round.json").exists())

    def next_round_id(self, now) -> str:
        """``<sequence>-<YYYYmmdd>-<HHMMSS>``: names sort in the order the rounds were made
        (the folder lock makes this process the only writer)."""
        folder = self.root / "rounds"
        made = [p.name for p in folder.iterdir() if ROUND_ID.match(p.name)] if folder.exists() else []
        last = max((int(r.split("-")[0]) for r in made), default=0)   # a half-written one counts too
        return f"{last + 1:06d}-{now.strftime('%Y%m%d-%H%M%S')}"

    def read_round(self, round_id: str) -> dict:
        return read_json(self.round_dir(round_id) / "round.json")

    def write_round(self, record: dict) -> None:
        write_json(self.round_dir(record["id"]) / "round.json", record)
