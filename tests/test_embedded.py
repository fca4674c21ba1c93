"""The embedded model: world and grammar, tokenizer, checker on known images, training pieces, shipped weights."""
import random

import pytest
import torch

from d3po_studio.core.embedded import DEFAULTS, WEIGHTS_DIR, checker, train, world
from d3po_studio.core.embedded.world import PromptSpec, Scene
from d3po_studio.core.errors import ConfigError


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---------------------------------------------------------------- world and grammar
def test_prompt_round_trip():
    spec = world.parse_prompt("a large blue triangle on a white background")
    assert spec == PromptSpec("blue", "triangle", "large", "white")
    assert spec.to_prompt() == "a large blue triangle on a white background"
    assert world.parse_prompt("a red circle") == PromptSpec("red", "circle")


@pytest.mark.parametrize("prompt, message", [
    ("a pink circle", "'pink' .* not in the vocabulary"),
    ("a red blue circle", "two colours"),
    ("a large red", "names no kind"),
])
def test_bad_prompts_name_the_problem(prompt, message):
    with pytest.raises(ConfigError, match=message):
        world.parse_prompt(prompt)


def test_random_prompts_parse_and_renders_vary():
    rng = random.Random(0)
    prompts = [world.random_prompt(rng) for _ in range(50)]
    assert all(world.parse_prompt(p) for p in prompts)
    a, b = (world.render_prompt("a red square", random.Random(s)) for s in (1, 2))
    assert a.size == (64, 64) and a.tobytes() != b.tobytes()


# ---------------------------------------------------------------- checker on images with known answers
def scene(colour, kind, radius, background="white"):
    rgb, bg = world.COLOURS[colour], world.BACKGROUNDS[background]
    return world.render(Scene(colour, kind, "large" if radius > 15 else "small", background, radius, 30.0, 34.0, rgb, bg))


@pytest.mark.parametrize("colour, kind, radius, background", [
    ("red", "circle", 20.0, "white"),
    ("green", "square", 11.0, "black"),
    ("blue", "triangle", 22.0, "gray"),
    ("yellow", "triangle", 10.0, "black"),
    ("cyan", "circle", 10.0, "gray"),
    ("purple", "square", 18.0, "white"),
])
def test_checker_reads_rendered_images(colour, kind, radius, background):
    size = "large" if radius > 15 else "small"
    result = checker.check(scene(colour, kind, radius, background), f"a {size} {colour} {kind} on a {background} background")
    assert result["colour_ok"] and result["kind_ok"] and result["size_ok"] and result["background_ok"], result


def test_checker_says_no_to_the_wrong_prompt_and_to_an_empty_image():
    from PIL import Image

    assert not checker.check(scene("red", "circle", 20.0), "a blue circle")["colour_ok"]
    assert not checker.check(scene("red", "circle", 20.0), "a red square")["kind_ok"]
    empty = checker.check(Image.new("RGB", (64, 64), (240, 240, 240)), "a red circle")
    assert not empty["colour_ok"] and not empty["kind_ok"]


def test_fidelity_on_the_world_itself_is_perfect():
    rng = random.Random(3)
    prompts = [world.random_prompt(rng) for _ in range(30)]
    images = [world.render_prompt(p, rng) for p in prompts]
    rates = checker.fidelity(images, prompts)
    assert rates["colour"] == rates["kind"] == rates["both"] == 1.0


# ---------------------------------------------------------------- training pieces
def test_tokenizer_has_one_token_per_word(tmp_path):
    tokenizer = train.build_tokenizer(tmp_path / "tok")
    ids = tokenizer("a large blue triangle on a white background").input_ids
    assert len(ids) == 8 + 2  # 8 words + start + end
    assert tokenizer.unk_token_id not in ids[1:-1]


def test_batches_are_a_function_of_seed_stage_step():
    x1, p1 = train.make_batch(0, "unet", 5, 4, p_uncond=0.5)
    x2, p2 = train.make_batch(0, "unet", 5, 4, p_uncond=0.5)
    x3, _ = train.make_batch(0, "unet", 6, 4)
    assert torch.equal(x1, x2) and p1 == p2 and not torch.equal(x1, x3)
    assert x1.shape == (4, 3, 64, 64) and -1.0 <= x1.min() and x1.max() <= 1.0


def test_vae_stage_checkpoints_and_refuses_to_overwrite(tmp_path):
    cfg = train.TrainConfig(out=tmp_path, vae_steps=2, vae_batch_size=2, checkpoint_every=1, scale_images=4)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**train.VAE_CONFIG)
    before = [p.detach().clone() for p in vae.parameters()]
    train.train_vae(cfg, vae, resume=False)
    assert torch.load(tmp_path / "vae.pt", weights_only=False)["step"] == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, vae.parameters()) if b.requires_grad)
    with pytest.raises(ConfigError, match="--resume"):
        train.train_vae(cfg, vae, resume=False)
    train.train_vae(cfg, vae, resume=True)  # already complete: nothing to do


def test_config_validates_itself(tmp_path):
    with pytest.raises(ConfigError, match="unet_steps"):
        train.TrainConfig(out=tmp_path, unet_steps=0)


# ---------------------------------------------------------------- the shipped model
def test_shipped_folder_is_safetensors_only():
    files = [p for p in WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert not any(p.suffix in (".bin", ".pt", ".ckpt", ".pkl") for p in files)
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20


def test_shipped_model_samples_a_pair_offline(pipe):
    assert pipe.safety_checker is None
    assert all(m.dtype == torch.float32 for m in (pipe.unet, pipe.vae, pipe.text_encoder))  # stored fp16, loaded fp32
    images = pipe("a red circle", num_images_per_prompt=2, num_inference_steps=2, guidance_scale=DEFAULTS["guidance"],
                  eta=DEFAULTS["eta"], height=DEFAULTS["height"], width=DEFAULTS["width"],
                  generator=torch.Generator().manual_seed(0)).images
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert images[0].tobytes() != images[1].tobytes()  # eta = 1: the pair differs
