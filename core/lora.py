"""LoRAs on the UNet (peft through diffusers' PeftAdapterMixin): add, switch, save, load, remove.

Several sessions may share one UNet (core/pool.py): each is its own named peft adapter, and
whoever uses the UNet first makes its adapter the only active one (``activate``), under the
pool's lock. The reference policy of D3PO is the same UNet with every adapter switched off —
never a copy.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

ADAPTER = "d3po"     # the adapter name when a UNet carries one LoRA only


def add_lora(unet, rank: int, alpha: float, targets, seed: int = 0,
             adapter: str = ADAPTER) -> list[torch.nn.Parameter]:
    """Add a fresh LoRA named ``adapter`` (B = 0, so it starts exactly at the base) and return its
    params. The new adapter is the active one afterwards.

    The base stays frozen in its dtype; LoRA weights are float32 whatever the base dtype.
    """
    for name, p in unet.named_parameters():
        if "lora_" not in name:
            p.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several on purpose
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=adapter)
    params = adapter_parameters(unet, adapter)
    if not params:
        unet.delete_adapters(adapter)
        raise ValueError(f"no UNet module matched lora_targets={list(targets)}")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def adapter_parameters(unet, adapter: str = ADAPTER) -> list[torch.nn.Parameter]:
    """The parameters of LoRA ``adapter`` (peft names them ``…lora_A.<adapter>.weight``)."""
    return [p for name, p in unet.named_parameters() if "lora_" in name and f".{adapter}." in name]


def group_by_targets(unet, params, parts: tuple[str, ...]) -> tuple[list, list[int]]:
    """``params`` reordered part by part (each part a "+"-joined set of LoRA target suffixes, as
    ``Settings.evidence_parts``), in their order within each part, and each part's weight count."""
    names = {id(p): name for name, p in unet.named_parameters()}
    groups: list[list] = [[] for _ in parts]
    for p in params:
        module = names[id(p)].split(".lora_")[0]
        for i, part in enumerate(parts):
            if any(module == t or module.endswith("." + t) for t in part.split("+")):
                groups[i].append(p)
                break
        else:
            raise ValueError(f"LoRA weight {names[id(p)]} is in none of the evidence parts {list(parts)}")
    return [p for group in groups for p in group], [sum(p.numel() for p in group) for group in groups]


def activate(unet, adapter: str, params=()) -> None:
    """Make ``adapter`` the only active LoRA of ``unet`` (scale 1); ``params`` stay trainable."""
    unet.set_adapters([adapter], weights=[1.0])
    unet.enable_adapters()
    for p in params:
        p.requires_grad_(True)


def remove_lora(unet, adapter: str) -> None:
    """Delete LoRA ``adapter`` from ``unet`` (frees its weights)."""
    if adapter in getattr(unet, "peft_config", {}):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            unet.delete_adapters(adapter)


@contextmanager
def lora_disabled(unet):
    """The reference policy: run the UNet with every LoRA off, always switching them back on."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@contextmanager
def lora_scaled(unet, scale: float, adapter: str = ADAPTER):
    """Run with only ``adapter`` active at ``scale`` (0 = base, 1 = as trained), then restore 1."""
    unet.set_adapters([adapter], weights=[scale])
    try:
        yield unet
    finally:
        unet.set_adapters([adapter], weights=[1.0])


def lora_state(unet, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The weights of LoRA ``adapter`` as a CPU float32 state dict (peft keys, without the
    adapter name, so a state saved from one adapter loads into any other of the same shape)."""
    state = get_peft_model_state_dict(unet, adapter_name=adapter)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def load_lora_state(unet, state: dict[str, torch.Tensor], adapter: str = ADAPTER) -> None:
    """Copy ``state`` into LoRA ``adapter`` in place (the optimizer keeps pointing at the same params)."""
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"LoRA state has keys the UNet lacks: {missing[:3]}")
