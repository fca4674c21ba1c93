"""What one session trains: its LoRA adapter and its optimizer, in memory and in checkpoints.

    ts = TrainState(folder, unet, "d3po", params, optimizer, settings)
    state = ts.read("000007")        # from disk, checked, not yet loaded (SessionError if damaged)
    ts.load(state)                   # into the adapter and optimizer; settings' lr applies
    saved = ts.snapshot(updates)     # in memory, e.g. to roll an update back
    name = ts.commit(round_id, parent, updates)   # a checkpoint; the caller then moves HEAD

Reading never changes anything and loading never touches the disk, so a caller can check a
checkpoint before it moves HEAD to it (``Session.undo``).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from .errors import SessionError
from .lora import load_lora_state, lora_state
from .storage import SessionFolder
from .trust_region import Evidence


@dataclass
class State:
    """A LoRA and optimizer state with its update count, read from disk or taken in memory."""
    lora: dict
    optimizer: dict
    updates: int
    note: str | None = None       # what reading it had to give up, in words
    evidence: Evidence = dataclasses.field(default_factory=Evidence)   # step_evidence's running sum


class TrainState:
    """The adapter ``adapter`` of ``unet`` and its optimizer, for one session folder."""

    def __init__(self, folder: SessionFolder, unet, adapter: str, params, optimizer, settings):
        self.folder, self.unet, self.adapter = folder, unet, adapter
        self.params, self.optimizer, self.settings = params, optimizer, settings
        self.fresh = State(lora_state(unet, adapter), copy.deepcopy(optimizer.state_dict()), 0)
        self.evidence = Evidence()    # what step_evidence has seen of the clicks (core/trust_region.py)

    def read(self, name: str | None) -> State:
        """Checkpoint ``name`` (None = the fresh LoRA). A damaged or mismatched LoRA raises
        SessionError naming the file; a damaged optimizer file costs a fresh optimizer state,
        said in the state's note."""
        if name is None:
            return State(self.fresh.lora, copy.deepcopy(self.fresh.optimizer), 0)
        lora = self.folder.read_lora(name)
        if {k: v.shape for k, v in lora.items()} != {k: v.shape for k, v in self.fresh.lora.items()}:
            raise SessionError(f"{self.folder.root / 'checkpoints' / name / 'lora.safetensors'} does not match "
                               "this session's LoRA shape (rank or targets differ)")
        updates = self.folder.checkpoint_meta(name)["updates"]
        notes, evidence = [], Evidence()
        try:
            saved = self.folder.read_evidence(name)
            evidence = Evidence.from_tensors(saved) if saved is not None else evidence
        except (SessionError, KeyError, IndexError) as e:
            notes.append(f"{e}; the evidence of step_evidence starts again from here (the LoRA is intact)")
        try:
            optimizer = self.folder.read_optimizer(name)
        except SessionError as e:
            optimizer = copy.deepcopy(self.fresh.optimizer)
            notes.insert(0, f"{e}; the optimizer state starts fresh from here (the LoRA is intact)")
        return State(lora, optimizer, updates, "; ".join(notes) or None, evidence)

    def load(self, state: State) -> None:
        """Copy ``state`` into the adapter and optimizer; the settings' lr and weight decay apply
        (a restored optimizer would otherwise bring back the ones it was saved with)."""
        self.optimizer.zero_grad(set_to_none=True)
        load_lora_state(self.unet, state.lora, self.adapter)
        self.optimizer.load_state_dict(state.optimizer)
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = self.settings.lr, self.settings.weight_decay
        self.evidence = state.evidence.copy()

    def snapshot(self, updates: int) -> State:
        return State(lora_state(self.unet, self.adapter), copy.deepcopy(self.optimizer.state_dict()), updates,
                     evidence=self.evidence.copy())

    def commit(self, round_id: str, parent: str | None, updates: int) -> str:
        """Write the current state as a complete checkpoint; returns its name (HEAD not moved)."""
        evidence = self.evidence.to_tensors() if self.evidence.count else None
        return self.folder.write_checkpoint(lora_state(self.unet, self.adapter), self.optimizer.state_dict(),
                                            {"updates": updates, "round": round_id, "parent": parent}, evidence)

    def prune(self, head: str | None) -> list[str]:
        """Keep the newest ``keep_checkpoints`` of HEAD's chain; a round whose checkpoint goes
        says so (``checkpoint_pruned``) before the folder is deleted."""
        def note_in_round(name: str) -> None:
            try:
                record = self.folder.read_round(self.folder.checkpoint_meta(name)["round"])
            except (SessionError, KeyError):
                return
            if record.get("checkpoint") == name:
                self.folder.write_round({**record, "checkpoint_pruned": True})
        keep = set(self.folder.chain(head)[:self.settings.keep_checkpoints])
        return self.folder.prune_checkpoints(keep, before_remove=note_in_round)
