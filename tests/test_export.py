"""core.export: LoRA files in kohya and diffusers layout, reloaded by diffusers into a fresh pipeline.

Tolerance: the reloaded UNet's output must equal the LoRA'd UNet's output within atol 1e-5
(fp32, same base weights, same inputs); the LoRA itself moves the output by ~1e-1, and a
file whose alpha were dropped (scale 1 instead of alpha/rank = 2) would be off by as much."""
import json

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from d3po_studio.bench.placement import PLACEMENTS
from d3po_studio.core.config import Settings
from d3po_studio.core.errors import ConfigError
from d3po_studio.core.export import EXPORT_FORMATS, export_lora, kohya_key_to_module
from d3po_studio.core.loading import TOKENIZER_DIR

RANK, ALPHA = 4, 8.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
ATOL = 1e-5
META = {"base_model": "tiny.safetensors", "base_model_hash": "0123456789abcdef", "num_preferences": 7,
        "beta": 0.1, "lr": 3e-3}


def tiny_sd_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408))
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR)),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def tiny_sdxl_pipeline():
    """Shaped like diffusers' own SDXL pipeline tests: two text encoders, text_time conditioning."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=64)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    te_config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32,
                               intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                               vocab_size=49408, projection_dim=32)
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(te_config), text_encoder_2=CLIPTextModelWithProjection(te_config),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))


def add_random_lora(unet, alpha=ALPHA, targets=TARGETS):
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian"),
                     adapter_name="d3po")
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return get_peft_model_state_dict(unet, adapter_name="d3po")


def unet_output(unet, sdxl=False):
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if sdxl:
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g),
                                      "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    with torch.no_grad():
        return unet(sample, torch.tensor([500, 20]), encoder_hidden_states=context, **extra).sample


@pytest.fixture(scope="module")
def trained():
    pipe = tiny_sd_pipeline()
    base = unet_output(pipe.unet)
    state = add_random_lora(pipe.unet)
    return pipe, state, base, unet_output(pipe.unet)


def export_and_reload(tmp_path, fmt, state, base, lora_out):
    """Export ``state`` in ``fmt``, load it into a fresh tiny SD pipeline with diffusers, and check
    the fresh UNet gives the base output before and the LoRA'd output after. Returns the file."""
    assert (lora_out - base).abs().max() > 1e-2, "the LoRA must change the output for this test to mean anything"
    path = export_lora(state, tmp_path / f"{fmt}.safetensors", fmt, rank=RANK, alpha=ALPHA, family="sd1",
                       metadata=META)
    fresh = tiny_sd_pipeline()
    torch.testing.assert_close(unet_output(fresh.unet), base, rtol=0, atol=0)
    fresh.load_lora_weights(str(path))
    torch.testing.assert_close(unet_output(fresh.unet), lora_out, rtol=0, atol=ATOL)
    return path


def reloaded_weight_keys(tmp_path, fmt, targets):
    """A random LoRA on ``targets`` of a tiny SD 1.x UNet, exported and reloaded to the same outputs
    (export_and_reload); returns its peft state and the file's ``.weight`` keys."""
    pipe = tiny_sd_pipeline()
    base = unet_output(pipe.unet)
    state = add_random_lora(pipe.unet, targets=targets)
    path = export_and_reload(tmp_path, fmt, state, base, unet_output(pipe.unet))
    with safe_open(str(path), "pt") as f:
        return state, [k for k in f.keys() if k.endswith(".weight")]


@pytest.mark.parametrize("fmt", sorted(EXPORT_FORMATS))
def test_reload_into_fresh_pipeline_matches(tmp_path, trained, fmt):
    _, state, base, lora_out = trained
    export_and_reload(tmp_path, fmt, state, base, lora_out)


@pytest.mark.parametrize("targets", [Settings().lora_targets, PLACEMENTS["attn1"], PLACEMENTS["ff"]],
                         ids=["default", "self-attention", "ff"])
@pytest.mark.parametrize("fmt", sorted(EXPORT_FORMATS))
def test_the_default_and_the_offered_placements_reload_with_every_key(tmp_path, fmt, targets):
    """The default LoRA and the other placements docs/settings.md offers (the self-attention
    projections, the default before; the feed-forward layers): each file holds those modules' keys
    and no others, and diffusers reloads it to the same outputs."""
    state, weights = reloaded_weight_keys(tmp_path, fmt, targets)
    kohya = [t.replace(".", "_") for t in targets]
    assert weights and all(any(t in k for t in (*targets, *kohya)) for k in weights), weights
    assert len(weights) == 2 * len([m for m in state if "lora_A" in m])
    if fmt == "kohya":
        modules = dict(tiny_sd_pipeline().unet.named_modules())
        assert all(kohya_key_to_module(k).endswith(targets) and kohya_key_to_module(k) in modules for k in weights)


@pytest.mark.parametrize("fmt", sorted(EXPORT_FORMATS))
def test_alpha_is_not_dropped(tmp_path, trained, fmt):
    """Exported with alpha = rank, the same weights give a clearly different output: alpha matters."""
    pipe, state, base, lora_out = trained
    path = export_lora(state, tmp_path / "wrong.safetensors", fmt, rank=RANK, alpha=float(RANK), family="sd1",
                       metadata=META)
    fresh = tiny_sd_pipeline()
    fresh.load_lora_weights(str(path))
    assert (unet_output(fresh.unet) - lora_out).abs().max() > 1e-2


def test_kohya_keys_and_header(tmp_path, trained):
    pipe, state, _, _ = trained
    path = export_lora(state, tmp_path / "k.safetensors", "kohya", rank=RANK, alpha=ALPHA, family="sd1",
                       metadata=META)
    modules = dict(pipe.unet.named_modules())
    with safe_open(str(path), "pt") as f:
        keys, header = list(f.keys()), f.metadata()
        alphas = [f.get_tensor(k) for k in keys if k.endswith(".alpha")]
    assert len(keys) == 3 * len(state) // 2 and all(k.startswith("lora_unet_") for k in keys)
    for key in keys:
        module = kohya_key_to_module(key)
        assert module in modules, key
        assert module.endswith(tuple(TARGETS))
    assert alphas and all(a.shape == () and a.item() == ALPHA for a in alphas)
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "8.0"
    assert header["d3po_studio.method"] == "D3PO"
    assert header["d3po_studio.base_model"] == "tiny.safetensors"
    assert header["d3po_studio.base_model_hash"] == "0123456789abcdef"
    assert header["d3po_studio.num_preferences"] == "7"
    assert (header["d3po_studio.rank"], header["d3po_studio.alpha"]) == ("4", "8.0")
    assert json.loads(header["d3po_studio.settings"]) == META


def test_diffusers_header_carries_lora_config(tmp_path, trained):
    _, state, _, _ = trained
    path = export_lora(state, tmp_path / "d.safetensors", "diffusers", rank=RANK, alpha=ALPHA, family="sd1",
                       metadata=META)
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
        assert all(k.startswith("unet.") for k in f.keys())
    assert config["unet.r"] == RANK and config["unet.lora_alpha"] == ALPHA
    assert len(config["unet.target_modules"]) == len(state) // 2


@pytest.mark.parametrize("targets", [TARGETS, PLACEMENTS["conv"]], ids=["attention", "conv"])
def test_sdxl_kohya_keys_map_and_reload(tmp_path, targets):
    pipe = tiny_sdxl_pipeline()
    state = add_random_lora(pipe.unet, targets=targets)
    lora_out = unet_output(pipe.unet, sdxl=True)
    path = export_lora(state, tmp_path / "xl.safetensors", "kohya", rank=RANK, alpha=ALPHA, family="sdxl",
                       metadata=META)
    modules = dict(pipe.unet.named_modules())
    with safe_open(str(path), "pt") as f:
        assert all(kohya_key_to_module(k) in modules for k in f.keys())
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    fresh = tiny_sdxl_pipeline()
    fresh.load_lora_weights(str(path))
    torch.testing.assert_close(unet_output(fresh.unet, sdxl=True), lora_out, rtol=0, atol=ATOL)


def test_kohya_key_to_module_examples():
    assert kohya_key_to_module("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight") \
        == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert kohya_key_to_module("lora_unet_mid_block_attentions_0_proj_in.alpha") == "mid_block.attentions.0.proj_in"
    assert kohya_key_to_module("lora_unet_up_blocks_0_attentions_2_transformer_blocks_9_ff_net_0_proj.lora_down.weight") \
        == "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.0.proj"
    with pytest.raises(ConfigError):
        kohya_key_to_module("lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight")


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path, trained):
    _, state, _, _ = trained
    path = tmp_path / "out" / "x.safetensors"
    export_lora(state, path, "kohya", rank=RANK, alpha=ALPHA, family="sd1", metadata=META)
    first = path.read_bytes()
    export_lora(state, path, "kohya", rank=RANK, alpha=ALPHA, family="sd1", metadata={**META, "num_preferences": 8})
    assert path.read_bytes() != first
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]


@pytest.mark.parametrize("kwargs,message", [
    ({"format": "lycoris"}, "valid: diffusers, kohya"),
    ({"rank": 8}, "rank: 8 does not match"),
    ({"rank": 0}, "rank"),
    ({"alpha": 0.0}, "alpha"),
    ({"family": "flux"}, "valid: sd1, sd2, sdxl"),
    ({"path_name": "x.ckpt"}, "must end in .safetensors"),
    ({"metadata": {"bad": object()}}, "JSON"),
    ({"lora_state": {}}, "empty"),
    ({"lora_state": {"down_blocks.0.x.lora_A.weight": torch.zeros(4, 3)}}, "lora_A only"),
    ({"lora_state": {"down_blocks.0.x.weight": torch.zeros(4, 3)}}, "not a peft LoRA key"),
])
def test_bad_arguments(tmp_path, trained, kwargs, message):
    _, state, _, _ = trained
    args = {"lora_state": state, "format": "kohya", "rank": RANK, "alpha": ALPHA, "family": "sd1", "metadata": META}
    path = tmp_path / kwargs.pop("path_name", "x.safetensors")
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        export_lora(args.pop("lora_state"), path, args.pop("format"), **args)
    assert not any(tmp_path.iterdir())


def test_embedded_model_lora_is_not_labelled_sd1(tmp_path, trained):
    """The embedded model has SD 1.x key names, not SD 1.x shapes: its header must not say sd_v1."""
    _, state, _, _ = trained
    path = export_lora(state, tmp_path / "e.safetensors", "kohya", rank=RANK, alpha=ALPHA, family="sd1",
                       metadata={**META, "base_model": "embedded"})
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert header["ss_base_model_version"] == "d3po_studio_embedded"
    assert header["modelspec.architecture"] == "d3po-studio-embedded/lora"
    assert "sd_v1" not in header.values() and "stable-diffusion-v1/lora" not in header.values()
    real = export_lora(state, tmp_path / "r.safetensors", "kohya", rank=RANK, alpha=ALPHA, family="sd1",
                       metadata=META)
    with safe_open(str(real), "pt") as f:
        assert (f.metadata()["ss_base_model_version"], f.metadata()["modelspec.architecture"]) == \
            ("sd_v1", "stable-diffusion-v1/lora")


def test_exported_file_has_the_usual_permissions(tmp_path, trained):
    """0666 less the umask (0644 under 022), not mkstemp's 0600: others sharing models/ can read it."""
    import os
    _, state, _, _ = trained
    old = os.umask(0o022)
    try:
        path = export_lora(state, tmp_path / "m.safetensors", "kohya", rank=RANK, alpha=ALPHA, family="sd1",
                           metadata=META)
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)                       # a private umask is honoured, not overridden
        export_lora(state, path, "kohya", rank=RANK, alpha=ALPHA, family="sd1", metadata=META)
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
