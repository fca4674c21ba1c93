"""The LoRA on the UNet (peft through diffusers' PeftAdapterMixin): add, switch off, save, load.

The reference policy of D3PO is the same UNet with this LoRA switched off — never a copy.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

ADAPTER = "d3po"


def add_lora(unet, rank: int, alpha: float, targets, seed: int = 0) -> list[torch.nn.Parameter]:
    """Add a fresh LoRA (B = 0, so the model starts exactly at the base) and return its params.

    The base stays frozen in its dtype; LoRA weights are float32 whatever the base dtype.
    """
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=ADAPTER)
    params = []
    for name, p in unet.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    if not params:
        raise ValueError(f"no UNet module matched lora_targets={list(targets)}")
    return params


@contextmanager
def lora_disabled(unet):
    """The reference policy: run the UNet with the LoRA off, always switching it back on."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@contextmanager
def lora_scaled(unet, scale: float):
    """Run with the LoRA at ``scale`` (0 = base, 1 = as trained), then restore 1."""
    unet.set_adapters([ADAPTER], weights=[scale])
    try:
        yield unet
    finally:
        unet.set_adapters([ADAPTER], weights=[1.0])


def lora_state(unet) -> dict[str, torch.Tensor]:
    """The LoRA weights as a CPU float32 state dict (peft keys, without the adapter name)."""
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def load_lora_state(unet, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the LoRA in place (the optimizer keeps pointing at the same params)."""
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"LoRA state has keys the UNet lacks: {missing[:3]}")
