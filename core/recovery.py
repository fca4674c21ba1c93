"""Reopening a session folder that a crash, a kill or a person left damaged.

Which checkpoint a session resumes (``open_head``) and what its rounds then say
(``settle_rounds``). The rules, in docs/session-format.md:

- HEAD fine: resume HEAD; if its checkpoint's LoRA is unreadable, the newest intact checkpoint
  of its chain (parent, grandparent, …), said in a note.
- HEAD missing, unreadable, or naming a missing checkpoint: the newest checkpoint whose round
  was applied (not undone), and its chain as above; never "0 updates" while an applied
  checkpoint exists. HEAD is rewritten once the state is loaded.
- Nothing intact: SessionError naming the file and the way out.
"""
from __future__ import annotations

from .errors import SessionError
from .storage import SessionFolder


def head_candidates(folder: SessionFolder) -> tuple[list[str | None], str | None]:
    """Checkpoints to try, best first, and what was wrong with HEAD (None if nothing)."""
    name, problem = folder.head_state()
    if problem is None:
        return [None] if name is None else folder.chain(name), None
    newest = newest_applied(folder)
    if newest is None:
        return [None], f"{problem}; no checkpoint holds an applied update, so the session reopened with none"
    return folder.chain(newest), problem


def newest_applied(folder: SessionFolder) -> str | None:
    """The newest checkpoint whose round is applied or pending (or unreadable), not undone."""
    for name in reversed(folder.checkpoint_names()):
        try:
            rid = folder.checkpoint_meta(name)["round"]
            record = folder.read_round(rid)
        except (SessionError, KeyError):
            return name                  # its round cannot tell: trust the checkpoint
        if record.get("status") in ("applied", "pending") and record.get("checkpoint") in (name, None):
            return name
    return None


def open_head(folder: SessionFolder, read) -> tuple[str | None, object, list[str], dict[str, str]]:
    """Load the best checkpoint with ``read(name) -> state`` (raises SessionError if damaged).

    Returns ``(name, state, notes, damaged)``: the checkpoint resumed, its state, what was said,
    and the checkpoints skipped as damaged with why.
    """
    candidates, problem = head_candidates(folder)
    notes = [problem] if problem else []
    damaged: dict[str, str] = {}
    for name in candidates:
        try:
            state = read(name)
        except SessionError as e:
            damaged[name] = str(e)
            continue
        if damaged or (problem and name is not None):
            notes.append(f"reopened at checkpoint {name} ({'; '.join(damaged.values()) or problem}); "
                         "HEAD now names it")
        return name, state, notes, damaged
    first = next(iter(damaged.values()), problem)
    raise SessionError(f"cannot reopen {folder.root}: {first}, and no earlier checkpoint is intact. "
                       "Restore that file from a backup, or start a new session (its rounds can be "
                       "retrained with `d3po-studio train`).")


def settle_rounds(folder: SessionFolder, head: str | None, damaged: dict[str, str]) -> list[str]:
    """Make every round record agree with HEAD's chain; returns notes on what changed.

    pending (killed mid-update) -> applied if HEAD's chain holds it, else interrupted;
    applied but its checkpoint damaged, or missing and newer than HEAD -> lost; applied, checkpoint newer than HEAD and not in
    its chain -> undone (an undo whose record was not written); applied, checkpoint gone and
    older than the chain -> checkpoint_pruned. A round record that cannot be read is left as it
    is (``Session.history`` lists it as damaged).
    """
    chain = folder.chain(head)
    by_round = {}
    for name in chain:
        by_round[folder.checkpoint_meta(name).get("round")] = name
    existing = set(folder.checkpoint_names())
    notes = []
    for rid in folder.round_ids():
        try:
            record = folder.read_round(rid)
        except SessionError:
            continue
        change = _settled(record, by_round, chain, damaged, existing, head)
        if change:
            record.update(change)
            folder.write_round(record)
            if change.get("status") in ("lost", "interrupted"):
                notes.append(f"round {rid}: {change['error']}")
    return notes


def _settled(record: dict, by_round: dict, chain: list[str], damaged: dict, existing: set, head) -> dict:
    status, ckpt = record.get("status"), record.get("checkpoint")
    if status == "pending":
        if record["id"] in by_round:
            return {"status": "applied", "checkpoint": by_round[record["id"]]}
        return {"status": "interrupted", "error": "the process ended before this click was trained; "
                                                  "it is not in the LoRA (pick again to train it)"}
    if status != "applied" or ckpt is None or ckpt in chain or record.get("checkpoint_pruned"):
        return {}
    newer = head is None or int(ckpt) > int(head)
    if ckpt in damaged or (newer and ckpt not in existing):
        why = damaged.get(ckpt, f"checkpoint {ckpt} is missing")
        return {"status": "lost", "error": f"{why}; the session reopened at checkpoint {head}"}
    if newer:
        return {"status": "undone"}
    return {"checkpoint_pruned": True}
