"""Write a trained D3PO LoRA as a .safetensors file that other programs load.

    from peft.utils import get_peft_model_state_dict
    from d3po_studio.core.export import export_lora

    state = get_peft_model_state_dict(pipe.unet, adapter_name="d3po")
    export_lora(state, "out/my_taste.safetensors", "kohya", rank=4, alpha=8.0, family="sd1",
                metadata={"base_model": "v1-5-pruned-emaonly.safetensors",
                          "base_model_hash": model_fingerprint(path), "num_preferences": 50})

Formats (`EXPORT_FORMATS`):
- "kohya": `lora_unet_<diffusers module path, "." -> "_">.lora_down.weight` (= peft lora_A),
  `.lora_up.weight` (= lora_B) and `.alpha` (the true alpha; readers scale by alpha / rank).
  Loaded by ComfyUI (comfy/lora.py `model_lora_keys_unet` maps `lora_unet_<diffusers path>`
  for every UNet through `utils.unet_to_diffusers`, SD 1.x/2.x and SDXL alike), by
  A1111/Forge (the Lora extension's `convert_diffusers_name_to_compvis` turns
  `lora_unet_{down,mid,up}_block(s)_…` into LDM names; the block arithmetic is the same
  for SDXL's attention blocks) and by diffusers' `load_lora_weights`.
- "diffusers": the peft layout `pipe.load_lora_weights(file)` reads (`unet.<module>.lora_A.weight`);
  the scale survives through the safetensors metadata entry `lora_adapter_metadata`
  (`{"unet.r", "unet.lora_alpha", "unet.target_modules"}`) that diffusers >= 0.34 turns into
  the LoraConfig; older readers ignore it and use alpha = rank (scale 1).

The header also carries our provenance (`d3po_studio.*`: method, base model and hash, rank,
alpha, preferences, family, settings JSON) and the kohya-conventional `ss_*` fields. A LoRA of
the embedded model (base_model "embedded") is labelled as such, never as SD 1.x
(`architecture_labels`). Files are written atomically (temp file in the same folder, fsync,
`os.replace`) with the usual permissions: 0666 less the umask, 0644 under umask 022.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save as safetensors_save

from .errors import ConfigError

FAMILIES = ("sd1", "sd2", "sdxl")
KOHYA_UNET_PREFIX = "lora_unet_"
_PEFT_KEY = re.compile(r"^(?:unet\.|base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# Multi-word names in diffusers UNet module paths; everything else in a kohya name is split on "_".
_COMPOUND_NAMES = sorted((
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut", "time_emb_proj",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "add_k_proj", "add_v_proj",
    "encoder_hid_proj", "class_embedding", "norm_out",
), key=lambda n: -n.count("_"))
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
# modelspec architecture ids (SD 2 is left out: 512-epsilon and 768-v have different ids)
_MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
# The embedded model (base_model "embedded") has SD 1.x key names but other shapes: its LoRA
# must not claim to be for SD 1.x, or tools offer it for SD 1.5 checkpoints, where it fails.
EMBEDDED_BASE_MODEL = "embedded"
_EMBEDDED_LABELS = {"ss_base_model_version": "d3po_studio_embedded",
                    "modelspec.architecture": "d3po-studio-embedded/lora"}
EXPORT_FILE_MODE = 0o666   # before the umask: 0644 under the usual umask 022, like any file a user writes


def export_lora(lora_state: dict[str, torch.Tensor], path: str | Path, format: str, *, rank: int, alpha: float,
                family: str, metadata: dict) -> Path:
    """Write `lora_state` (peft keys of a diffusers UNet) to `path` in `format`; return the path.

    metadata: settings to record; its keys "base_model", "base_model_hash" and "num_preferences"
    also get header fields of their own. Everything in it must be JSON-serialisable.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"format: unknown LoRA export format {format!r}; valid: {', '.join(sorted(EXPORT_FORMATS))}.")
    path = Path(path)
    _validate(path, rank, alpha, family, metadata)
    pairs = _split_peft_state(lora_state, rank)
    build_tensors, build_header = EXPORT_FORMATS[format]
    header = {**_provenance_header(format, rank, alpha, family, metadata), **build_header(pairs, rank, alpha)}
    _write_atomically(path, safetensors_save(build_tensors(pairs, alpha), metadata=header))
    return path


def kohya_key_to_module(key: str) -> str:
    """`lora_unet_down_blocks_0_..._to_q.lora_down.weight` -> `down_blocks.0....to_q` (diffusers module path)."""
    name = key.split(".", 1)[0]
    if not name.startswith(KOHYA_UNET_PREFIX):
        raise ConfigError(f"key {key!r}: not a kohya UNet key (expected prefix {KOHYA_UNET_PREFIX!r}).")
    parts = name[len(KOHYA_UNET_PREFIX):].split("_")
    out, i = [], 0
    while i < len(parts):
        for compound in _COMPOUND_NAMES:
            n = compound.count("_") + 1
            if "_".join(parts[i:i + n]) == compound:
                out.append(compound)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


# ----------------------------------------------------------------------------- formats

def _kohya_tensors(pairs, alpha):
    tensors = {}
    for module, (down, up) in pairs.items():
        name = KOHYA_UNET_PREFIX + module.replace(".", "_")
        if kohya_key_to_module(name) != module:
            raise ConfigError(f"module {module!r}: its kohya name {name!r} does not map back to it; "
                              "add the multi-word part to export._COMPOUND_NAMES.")
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return tensors


def _kohya_header(pairs, rank, alpha):
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": str(float(alpha))}


def _diffusers_tensors(pairs, alpha):
    tensors = {}
    for module, (lora_a, lora_b) in pairs.items():
        tensors[f"unet.{module}.lora_A.weight"] = lora_a
        tensors[f"unet.{module}.lora_B.weight"] = lora_b
    return tensors


def _diffusers_header(pairs, rank, alpha):
    # read back by diffusers' _load_sft_state_dict_metadata -> LoraConfig(**metadata["unet.*"])
    config = {"unet.r": rank, "unet.lora_alpha": float(alpha), "unet.target_modules": sorted(pairs)}
    return {"lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}


# name -> (tensors(pairs, alpha), format-specific header(pairs, rank, alpha))
EXPORT_FORMATS: dict[str, tuple[Callable, Callable]] = {
    "kohya": (_kohya_tensors, _kohya_header),
    "diffusers": (_diffusers_tensors, _diffusers_header),
}


# ----------------------------------------------------------------------------- helpers

def _validate(path: Path, rank, alpha, family, metadata) -> None:
    if path.suffix != ".safetensors":
        raise ConfigError(f"path: {path} must end in .safetensors (the format ComfyUI, A1111 and diffusers list).")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank: {rank!r} must be a positive integer.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ConfigError(f"alpha: {alpha!r} must be a positive number.")
    if family not in FAMILIES:
        raise ConfigError(f"family: unknown model family {family!r}; valid: {', '.join(FAMILIES)}.")
    if not isinstance(metadata, dict):
        raise ConfigError(f"metadata: expected a dict, got {type(metadata).__name__}.")


def _split_peft_state(lora_state, rank) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (lora_A, lora_B)} with shapes checked against `rank`."""
    if not lora_state:
        raise ConfigError("lora_state: empty; expected get_peft_model_state_dict(unet, adapter_name=...).")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in lora_state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ConfigError(f"lora_state: key {key!r} is not a peft LoRA key (<module>.lora_A.weight / lora_B.weight); "
                              "only plain LoRA on the UNet can be exported.")
        found.setdefault(m["module"], {})[m["ab"]] = tensor.detach().to("cpu").contiguous()
    pairs = {}
    for module, ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"lora_state: module {module!r} has lora_{''.join(ab)} only; both lora_A and lora_B are needed.")
        lora_a, lora_b = ab["A"], ab["B"]
        if lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            raise ConfigError(f"rank: {rank} does not match module {module!r} (lora_A {tuple(lora_a.shape)}, "
                              f"lora_B {tuple(lora_b.shape)}); pass the rank the LoRA was trained with.")
        pairs[module] = (lora_a, lora_b)
    return pairs


def _provenance_header(format, rank, alpha, family, metadata) -> dict[str, str]:
    try:
        settings = json.dumps(metadata, sort_keys=True)
    except TypeError as e:
        raise ConfigError(f"metadata: not JSON-serialisable ({e}).") from e
    base_model = str(metadata.get("base_model", ""))
    base_hash = str(metadata.get("base_model_hash", ""))
    header = {
        "format": "pt",
        "d3po_studio.method": "D3PO",
        "d3po_studio.format": format,
        "d3po_studio.family": family,
        "d3po_studio.base_model": base_model,
        "d3po_studio.base_model_hash": base_hash,
        "d3po_studio.rank": str(rank),
        "d3po_studio.alpha": str(float(alpha)),
        "d3po_studio.num_preferences": str(metadata.get("num_preferences", "")),
        "d3po_studio.settings": settings,
        "ss_sd_model_name": base_model,
        "ss_training_comment": "D3PO (direct preference optimisation from human clicks), D3PO Studio",
    }
    return {**header, **architecture_labels(family, base_model)}


def architecture_labels(family: str, base_model: str) -> dict[str, str]:
    """The header fields that say which base model a LoRA is for (kohya's and modelspec's)."""
    if base_model == EMBEDDED_BASE_MODEL:
        return dict(_EMBEDDED_LABELS)
    labels = {"ss_base_model_version": _BASE_MODEL_VERSION[family]}
    if family in _MODELSPEC_ARCH:
        labels["modelspec.architecture"] = _MODELSPEC_ARCH[family]
    return labels


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, os.replace. Mode EXPORT_FILE_MODE less the umask
    (tempfile.mkstemp would make it 0600: unreadable to another user sharing models/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), EXPORT_FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
