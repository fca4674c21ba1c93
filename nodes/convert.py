"""Type translation between the core (PIL images, dicts) and ComfyUI (IMAGE tensors, STRING)."""
from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import torch


def images_to_tensor(images) -> torch.Tensor:
    """PIL images of one size -> ComfyUI IMAGE: float32 (B, H, W, C) in [0, 1]."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))


def save_previews(images, temp_dir: Path, prefix: str) -> list[dict]:
    """Write PNG previews where ComfyUI's /view serves type "temp"; returns its image refs."""
    sub = "d3po"
    folder = Path(temp_dir) / sub
    folder.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(3)
    refs = []
    for i, im in enumerate(images):
        name = f"{prefix}_{tag}_{i}.png"
        im.save(folder / name)
        refs.append({"filename": name, "subfolder": sub, "type": "temp"})
    return refs


def report_text(report: dict) -> str:
    """An update report as the STRING the nodes output (JSON, floats rounded)."""
    return json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in report.items()})
