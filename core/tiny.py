"""Tiny randomly initialised SD 1.x and SDXL pipelines, built offline from configs.

For tests and benchmark smoke runs only: their images are near-uniform grey, so there is
nothing to prefer (use the embedded model for that). 16×16 px images, 8×8×4 latents.

    from d3po_studio.core.tiny import tiny_pipeline
    pipe = tiny_pipeline("sd1")      # or "sdxl"
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, \
    UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def byte_level_tokenizer(folder: Path | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (no merges): every text encodes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    folder = Path(folder or tempfile.mkdtemp(prefix="d3po-tok-"))
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def _text_config(projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim,
                          bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="gelu")


def _vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, sample_size=16)


def tiny_pipeline(family: str = "sd1", seed: int = 0):
    """A tiny pipeline of ``family`` "sd1" or "sdxl" with seeded random weights, in float32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "sd1":
            return _tiny_sd1()
        if family == "sdxl":
            return _tiny_sdxl()
    raise ValueError(f"family={family!r}: use 'sd1' or 'sdxl'")


def _tiny_sd1() -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()), tokenizer=byte_level_tokenizer(),
        unet=unet, scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


def _tiny_sdxl() -> StableDiffusionXLPipeline:
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32)
    tokenizer = byte_level_tokenizer()
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(32)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler(**SCHEDULER))
