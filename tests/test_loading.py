"""core.loading: diffusers folders, single-file family detection, shipped configs, refusals.

All models are tiny (built from configs) and nothing touches the hub."""
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from d3po_studio.core import loading
from d3po_studio.core.errors import ModelLoadError
from d3po_studio.core.loading import (
    CONFIGS_DIR, TOKENIZER_DIR, detect_family, load_pickle_state_dict, load_pipeline, model_family,
    model_fingerprint, read_safetensors_header,
)


def tiny_sd_pipeline(sd2: bool = False):
    """A ~2 M-parameter StableDiffusionPipeline (UNet 32/64, context 32) with the shipped tokenizer;
    sd2: SD-2-shaped (linear projections in the transformers, gelu text encoder)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, use_linear_projection=sd2)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu"))
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- diffusers folders

def test_diffusers_folder_loads_and_matches(tiny_folder):
    pipe = load_pipeline(tiny_folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert model_family(pipe) == "sd1"
    ref = tiny_sd_pipeline()
    for name, p in ref.unet.state_dict().items():
        torch.testing.assert_close(pipe.unet.state_dict()[name], p, rtol=0, atol=0)
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_dtype_is_applied(tiny_folder):
    pipe = load_pipeline(tiny_folder, torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json") as e:
        load_pipeline(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_folder_with_unsupported_pipeline_class(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="FluxPipeline"):
        load_pipeline(tmp_path)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelLoadError, match="no such file") as e:
        load_pipeline(missing)
    assert str(missing) in str(e.value)


def test_embedded_missing_says_so(monkeypatch, tmp_path):
    import d3po_studio.core.embedded as embedded

    monkeypatch.setattr(embedded, "WEIGHTS_DIR", tmp_path / "weights")
    with pytest.raises(ModelLoadError, match="embedded model is not available"):
        load_pipeline("embedded")


def test_embedded_loads_when_present(monkeypatch, tiny_folder):
    import d3po_studio.core.embedded as embedded

    monkeypatch.setattr(embedded, "WEIGHTS_DIR", tiny_folder)
    assert model_family(load_pipeline("embedded")) == "sd1"


# ----------------------------------------------------------------------------- fingerprints

def test_fingerprint_file_and_folder(tmp_path, tiny_folder):
    f = tmp_path / "a.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(3)}, f)
    h = model_fingerprint(f)
    assert len(h) == 16 and h == model_fingerprint(str(f))
    safetensors.torch.save_file({"x": torch.ones(3)}, f)
    assert model_fingerprint(f) != h
    assert model_fingerprint(tiny_folder) == model_fingerprint(tiny_folder)
    assert model_fingerprint(tiny_folder) != h


# ----------------------------------------------------------------------------- shipped configs

@pytest.mark.parametrize("family,unet_params", [
    ("sd1", 859_520_964), ("sd2", 865_910_724), ("sd2_base", 865_910_724), ("sdxl", 2_567_463_684)])
def test_shipped_unet_configs_match_published_sizes(family, unet_params):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(CONFIGS_DIR / family / "unet")))
    assert sum(p.numel() for p in unet.parameters()) == unet_params


@pytest.mark.parametrize("folder,params", [
    ("sd1/text_encoder", 123_060_480), ("sd2/text_encoder", 340_387_840), ("sdxl/text_encoder_2", 694_659_840)])
def test_shipped_text_encoder_configs(folder, params):
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(str(CONFIGS_DIR / folder))
    cls = CLIPTextModelWithProjection if folder.endswith("_2") else CLIPTextModel
    with init_empty_weights():
        model = cls(config)
    assert sum(p.numel() for p in model.parameters()) == params


def test_shipped_tokenizer_pad_tokens():
    assert loading._clip_tokenizer("!").pad_token_id == 0
    tok = loading._clip_tokenizer("<|endoftext|>")
    assert tok.pad_token_id == 49407 and len(tok) == 49408


# ----------------------------------------------------------------------------- family detection

K = loading.UNET_PREFIX


@pytest.mark.parametrize("shapes,expected", [
    ({loading.CROSS_ATTN_KEY: (320, 768), loading.CONV_IN_KEY: (320, 4, 3, 3)}, ("sd1", "sd1")),
    ({loading.CROSS_ATTN_KEY: (320, 1024)}, ("sd2", "sd2_base")),
    ({loading.CROSS_ATTN_KEY: (320, 1024), "v_pred": ()}, ("sd2", "sd2")),
    ({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
      K + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048)}, ("sdxl", "sdxl")),
])
def test_detect_family(shapes, expected):
    assert detect_family(shapes) == expected


def test_detect_sd2_v_prediction_by_norm_bias_std():
    shapes = {loading.CROSS_ATTN_KEY: (320, 1024), loading.SD2_VPRED_PROBE_KEY: (320,)}
    wide = torch.linspace(-1, 1, 320)
    assert detect_family(shapes, lambda k: wide) == ("sd2", "sd2")
    assert detect_family(shapes, lambda k: wide * 0.01) == ("sd2", "sd2_base")


@pytest.mark.parametrize("shapes,message", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "LoRA"),
    ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "diffusers"),
    ({"foo": (1,)}, "unrecognised key layout"),
    ({loading.CROSS_ATTN_KEY: (320, 512)}, "cross-attention width is 512"),
    ({loading.CONV_IN_KEY: (320, 9, 3, 3), loading.CROSS_ATTN_KEY: (320, 768)}, "inpainting"),
    ({"conditioner.embedders.0.model.transformer.resblocks.0.ln_1.bias": (1280,)}, "refiner"),
])
def test_detect_family_refusals(shapes, message):
    with pytest.raises(ModelLoadError, match=message):
        detect_family(shapes, source="x.safetensors")


# ----------------------------------------------------------------------------- corrupt / unsafe files

def test_unrecognised_safetensors_names_file(tmp_path):
    f = tmp_path / "weird.safetensors"
    safetensors.torch.save_file({"foo": torch.zeros(2)}, f)
    with pytest.raises(ModelLoadError, match="unrecognised key layout") as e:
        load_pipeline(f)
    assert str(f) in str(e.value)


@pytest.mark.parametrize("mangle,message", [
    (lambda b: b[: len(b) - 10], "truncated"),
    (lambda b: b[:4], "not a valid safetensors"),
    (lambda b: b[:8] + b"{garbage" + b[16:], "not JSON"),
    (lambda b: (10**12).to_bytes(8, "little") + b[8:], "not a valid safetensors"),
    (lambda b: b + b"extra", "trailing bytes"),
])
def test_corrupt_safetensors(tmp_path, mangle, message):
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file({loading.CROSS_ATTN_KEY: torch.zeros(8, 768)}, good)
    assert read_safetensors_header(good) == {loading.CROSS_ATTN_KEY: (8, 768)}
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(mangle(good.read_bytes()))
    with pytest.raises(ModelLoadError, match=message) as e:
        load_pipeline(bad)
    assert str(bad) in str(e.value)


class Arbitrary:
    """Not a tensor: unpickling it would import and construct arbitrary objects."""


def test_pickle_with_arbitrary_object_is_refused(tmp_path):
    f = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "obj": Arbitrary()}, f)
    with pytest.raises(ModelLoadError, match="full unpickling") as e:
        load_pipeline(f)
    assert str(f) in str(e.value)


def test_plain_pickle_with_arbitrary_object_is_refused(tmp_path):
    f = tmp_path / "evil.pt"
    with open(f, "wb") as fh:
        pickle.dump({"obj": Arbitrary()}, fh)
    with pytest.raises(ModelLoadError, match=str(f.name)):
        load_pickle_state_dict(f)


def test_pickle_of_tensors_is_accepted_and_detected(tmp_path):
    f = tmp_path / "model.ckpt"
    torch.save({"state_dict": {loading.CROSS_ATTN_KEY: torch.zeros(8, 1024)}, "global_step": 1}, f)
    state = load_pickle_state_dict(f)
    assert list(state) == [loading.CROSS_ATTN_KEY]
    shapes, get_tensor = loading._inspect_checkpoint(Path(f))
    assert detect_family(shapes, get_tensor) == ("sd2", "sd2_base")


def test_unknown_suffix(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="unknown file type"):
        load_pipeline(f)


# ----------------------------------------------------------------------------- single-file end to end

def _ldm_unet_name(name: str, up_has_attention: list[bool]) -> str:
    """diffusers UNet parameter name -> original LDM name (2 resnets per down block, 3 per up block)."""
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
              "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    module, leaf = name.rsplit(".", 1)
    if module in fixed:
        return f"{fixed[module]}.{leaf}"
    parts = module.split(".")
    if parts[0] == "mid_block":
        i = int(parts[2])
        block = f"middle_block.{1 if parts[1] == 'attentions' else 2 * i}"
        rest = parts[3:]
    else:
        i = int(parts[1])
        kind = parts[2]
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{3 * (i + 1)}.0.op.{leaf}"
            block = f"input_blocks.{3 * i + int(parts[3]) + 1}.{1 if kind == 'attentions' else 0}"
        else:
            if kind == "upsamplers":
                return f"output_blocks.{3 * i + 2}.{2 if up_has_attention[i] else 1}.{'.'.join(parts[4:])}.{leaf}"
            block = f"output_blocks.{3 * i + int(parts[3])}.{1 if kind == 'attentions' else 0}"
        rest = parts[4:]
        kind = parts[2]
    if parts[0] == "mid_block":
        kind = parts[1]
    if kind == "resnets":
        rest = [resnet.get(rest[0], rest[0])] + rest[1:]
    return ".".join([block, *rest, leaf])


def _ldm_vae_name(name: str, n_levels: int) -> tuple[str, bool]:
    """diffusers AutoencoderKL name -> (LDM name, needs a 1x1-conv reshape)."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
    parts = name.split(".")
    side, rest = parts[0], parts[1:]
    if side not in ("encoder", "decoder"):
        return name, False
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1]) if rest[0] == "down_blocks" else n_levels - 1 - int(rest[1])
        level = "down" if rest[0] == "down_blocks" else "up"
        if rest[2] == "resnets":
            rest = [level, str(i), "block", rest[3], *rest[4:]]
        else:  # downsamplers.0 / upsamplers.0
            rest = [level, str(i), "downsample" if level == "down" else "upsample", *rest[4:]]
    elif rest[0] == "mid_block" and rest[1] == "resnets":
        rest = ["mid", f"block_{int(rest[2]) + 1}", *rest[3:]]
    elif rest[0] == "mid_block":
        tail = [attn.get(p, p) for p in rest[3:] if p != "0"]
        return ".".join([side, "mid", "attn_1", *tail]), tail[-2] in ("q", "k", "v", "proj_out") and tail[-1] == "weight"
    elif rest[0] == "conv_norm_out":
        rest = ["norm_out", *rest[1:]]
    rest = ["nin_shortcut" if p == "conv_shortcut" else p for p in rest]
    return ".".join([side, *rest]), False


def to_ldm_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """An SD 1.x-layout (A1111) state dict of a diffusers SD pipeline, for single-file loading tests."""
    up_attn = ["CrossAttn" in t for t in pipe.unet.config.up_block_types]
    out = {f"model.diffusion_model.{_ldm_unet_name(k, up_attn)}": v for k, v in pipe.unet.state_dict().items()}
    n_levels = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        name, reshape = _ldm_vae_name(k, n_levels)
        out[f"first_stage_model.{name}"] = v[:, :, None, None] if reshape else v
    for k, v in pipe.text_encoder.state_dict().items():  # transformers 5 dropped the "text_model." level
        out[f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}"] = v
    return {k: v.contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory, tiny_folder):
    """The tiny pipeline's folder without weights: what core/configs/<family>/ is for real models."""
    import shutil

    config = tmp_path_factory.mktemp("tiny_config")
    for f in tiny_folder.rglob("*.json"):
        (config / f.relative_to(tiny_folder)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, config / f.relative_to(tiny_folder))
    shutil.rmtree(config / "tokenizer")  # like the shipped configs: tokenizers come from clip_tokenizer/
    return config


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_tiny_end_to_end(tmp_path, tiny_config_dir, suffix):
    """A tiny SD-1-layout checkpoint converted by diffusers through our config= mechanism, offline."""
    ref = tiny_sd_pipeline()
    ckpt = tmp_path / f"tiny{suffix}"
    state = to_ldm_checkpoint(ref)
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, ckpt)
    else:
        torch.save({"state_dict": state}, ckpt)
    pipe = load_pipeline(ckpt, config_dir=tiny_config_dir)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and model_family(pipe) == "sd1"
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()
        assert set(got) >= set(want) - {"text_model.embeddings.position_ids"}, part
        for name, p in want.items():
            torch.testing.assert_close(got[name], p, rtol=0, atol=0, msg=f"{part}.{name}")
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_single_file_conversion_failure_names_file(tmp_path):
    """A tiny checkpoint against the shipped full-size SD 1.5 config: shapes disagree -> ModelLoadError."""
    ckpt = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(to_ldm_checkpoint(tiny_sd_pipeline()), ckpt)
    with pytest.raises(ModelLoadError) as e:
        load_pipeline(ckpt, config_dir=CONFIGS_DIR / "sd1")
    assert str(ckpt) in str(e.value)


def tiny_sdxl_pipeline():
    """Tiny SDXL: text encoders of different widths (32, 48) as in the real model (768, 1280), since
    diffusers tells them apart in a single file by width."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80, cross_attention_dim=80)
    vae = AutoencoderKL(block_out_channels=(32, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    te = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, intermediate_size=37, num_attention_heads=4,
              num_hidden_layers=2, vocab_size=49408, projection_dim=32)
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=32, **te)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, hidden_act="gelu", **te)),
        tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False))


def _open_clip_state(text_model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection weights -> OpenCLIP names (fused q/k/v in_proj)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_model_state.items()}
    out = {"positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias")}
    if "text_projection.weight" in sd:  # SDXL's second encoder; SD 2's has none in diffusers
        out["text_projection"] = sd.pop("text_projection.weight").T
    sd.pop("embeddings.position_ids", None)
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        pre = f"encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat(
                [sd.pop(f"{pre}self_attn.{p}_proj.{leaf}") for p in "qkv"])
        for k in [k for k in sd if k.startswith(pre)]:
            module = k[len(pre):].rsplit(".", 1)[0]
            out[f"transformer.resblocks.{i}.{names[module]}.{k.rsplit('.', 1)[1]}"] = sd.pop(k)
    assert not sd, sd
    return out


def to_ldm_sdxl_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """An SDXL-layout (sgm: conditioner.embedders.{0,1}) state dict of a diffusers SDXL pipeline."""
    up_attn = ["CrossAttn" in t for t in pipe.unet.config.up_block_types]
    label = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    out = {}
    for k, v in pipe.unet.state_dict().items():
        module, leaf = k.rsplit(".", 1)
        name = f"{label[module]}.{leaf}" if module in label else _ldm_unet_name(k, up_attn)
        out[f"model.diffusion_model.{name}"] = v
    n_levels = len(pipe.vae.config.block_out_channels)
    for k, v in pipe.vae.state_dict().items():
        name, reshape = _ldm_vae_name(k, n_levels)
        out[f"first_stage_model.{name}"] = v[:, :, None, None] if reshape else v
    for k, v in pipe.text_encoder.state_dict().items():
        out[f"conditioner.embedders.0.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}"] = v
    for k, v in _open_clip_state(pipe.text_encoder_2.state_dict()).items():
        out[f"conditioner.embedders.1.model.{k}"] = v
    return {k: v.contiguous() for k, v in out.items()}


def test_single_file_tiny_sdxl_end_to_end(tmp_path):
    import shutil

    ref = tiny_sdxl_pipeline()
    folder = tmp_path / "xl"
    ref.save_pretrained(folder)
    config = tmp_path / "xl_config"
    for f in folder.rglob("*.json"):
        if not f.relative_to(folder).parts[0].startswith("tokenizer"):
            (config / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, config / f.relative_to(folder))
    ckpt = tmp_path / "tiny_xl.safetensors"
    state = to_ldm_sdxl_checkpoint(ref)
    safetensors.torch.save_file(state, ckpt)
    assert detect_family({k: tuple(v.shape) for k, v in state.items()}) == ("sdxl", "sdxl")
    pipe = load_pipeline(ckpt, config_dir=config)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and model_family(pipe) == "sdxl"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()
        for name, p in want.items():
            if not name.endswith("position_ids"):
                torch.testing.assert_close(got[name], p, rtol=0, atol=0, msg=f"{part}.{name}")
    assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")


def test_missing_folder_that_looks_like_a_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="no local file or folder"):
        load_pipeline("no-such-org/no-such-model-d3po")


def test_single_file_tiny_sd2_layout_end_to_end(tmp_path, tiny_config_dir):
    """SD 2 layout: OpenCLIP text encoder under cond_stage_model.model. (fused q/k/v)."""
    import shutil

    ref = tiny_sd_pipeline(sd2=True)
    folder = tmp_path / "sd2"
    ref.save_pretrained(folder)
    config = tmp_path / "sd2_config"
    shutil.copytree(folder, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "tokenizer"))
    state = {k: v for k, v in to_ldm_checkpoint(ref).items() if not k.startswith("cond_stage_model.")}
    state.update({f"cond_stage_model.model.{k}": v.contiguous()
                  for k, v in _open_clip_state(ref.text_encoder.state_dict()).items()})
    ckpt = tmp_path / "tiny_sd2.safetensors"
    safetensors.torch.save_file(state, ckpt)
    pipe = load_pipeline(ckpt, config_dir=config)
    for part in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()
        for name, p in want.items():
            if not name.endswith("position_ids"):
                torch.testing.assert_close(got[name], p, rtol=0, atol=0, msg=f"{part}.{name}")
