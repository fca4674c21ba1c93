"""Each built-in oracle orders known images correctly; the registry names the valid choices."""
import random

import numpy as np
import pytest
from PIL import Image

from d3po_studio.core.embedded.world import PromptSpec, Scene, render, sample_scene
from d3po_studio.core.errors import ConfigError
from d3po_studio.core.oracles import ORACLES, get_oracle, register_oracle

PROMPT = "a red circle"


def flat(value: int) -> Image.Image:
    return Image.new("RGB", (64, 64), (value, value, value))


def noise(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def circle(radius: float) -> Image.Image:
    return render(Scene("red", "circle", "large", "white", radius, 32.0, 32.0, (215, 35, 35), (240, 240, 240)))


def test_builtins_are_registered():
    assert {"brighter", "jpeg-compressible", "larger-shape", "random"} <= set(ORACLES)


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ConfigError, match="brighter.*jpeg-compressible.*larger-shape.*random"):
        get_oracle("sharper")


def test_duplicate_registration_is_refused():
    with pytest.raises(ConfigError, match="already registered"):
        register_oracle("brighter")(lambda images, prompt: [0.0] * len(images))


@pytest.mark.parametrize("name, worse, better", [
    ("brighter", flat(40), flat(200)),
    ("jpeg-compressible", noise(), flat(128)),
    ("larger-shape", circle(9.0), circle(22.0)),
])
def test_oracle_prefers_the_expected_image(name, worse, better):
    low, high = get_oracle(name)([worse, better], PROMPT)
    assert high > low


def test_brighter_is_mean_luminance():
    assert get_oracle("brighter")([flat(0), flat(255)], PROMPT) == pytest.approx([0.0, 1.0])


def test_larger_shape_is_zero_on_a_flat_image_and_tracks_area():
    small, large = get_oracle("larger-shape")([circle(10.0), circle(20.0)], PROMPT)
    assert get_oracle("larger-shape")([flat(90)], PROMPT) == [0.0]
    assert large / small == pytest.approx(4.0, rel=0.1)  # area ~ radius**2


def test_random_is_reproducible_in_range_and_content_blind():
    oracle = get_oracle("random")
    rng = random.Random(0)
    images = [render(sample_scene(PromptSpec("blue", "square"), rng)) for _ in range(200)]
    first, again = oracle(images, PROMPT), oracle(images, PROMPT)
    assert first == again
    assert all(0.0 <= s < 1.0 for s in first)
    assert oracle(images[:1], "another prompt") != first[:1]
    brightness = get_oracle("brighter")(images, PROMPT)
    area = get_oracle("larger-shape")(images, PROMPT)
    for feature in (brightness, area):
        assert abs(np.corrcoef(first, feature)[0, 1]) < 0.25  # |r| < 0.25 at n = 200: no real correlation


def test_saturated_prefers_vivid_colours():
    vivid = render(Scene("red", "circle", "large", "white", 20.0, 32.0, 32.0, (215, 35, 35), (240, 240, 240)))
    pale = render(Scene("red", "circle", "large", "white", 20.0, 32.0, 32.0, (215, 170, 170), (240, 240, 240)))
    a, b = get_oracle("saturated")([vivid, pale], PROMPT)
    assert a > b and 0.0 <= b < a <= 1.0
    assert get_oracle("saturated")([flat(128)], PROMPT) == [0.0]


def test_centered_prefers_a_shape_in_the_middle():
    middle = render(Scene("red", "circle", "small", "white", 8.0, 32.0, 32.0, (215, 35, 35), (240, 240, 240)))
    corner = render(Scene("red", "circle", "small", "white", 8.0, 14.0, 14.0, (215, 35, 35), (240, 240, 240)))
    a, b = get_oracle("centered")([middle, corner], PROMPT)
    assert a > b and a > -0.05                   # a centred shape: offset ≈ 0
    assert get_oracle("centered")([flat(200)], PROMPT) == [-1.0]   # no shape: as far as it gets


def test_warmer_prefers_a_warm_cast():
    scene = dict(colour="green", kind="circle", size="large", background="gray", radius=20.0, cx=32.0, cy=32.0)
    warm = render(Scene(**scene, rgb=(40, 200, 40), bg_rgb=(170, 128, 100)))
    cool = render(Scene(**scene, rgb=(40, 200, 40), bg_rgb=(100, 128, 170)))
    a, b = get_oracle("warmer")([warm, cool], PROMPT)
    assert a > 0 > b and a == pytest.approx(-b, abs=1e-3)   # the same cast, mirrored
    assert get_oracle("warmer")([flat(128)], PROMPT) == [0.0]
    assert get_oracle("warmer")([Image.new("RGB", (8, 8), (255, 0, 0))], PROMPT) == [1.0]


def test_greener_prefers_a_green_cast_and_ignores_warmth():
    scene = dict(colour="red", kind="circle", size="large", background="gray", radius=20.0, cx=32.0, cy=32.0)
    green = render(Scene(**scene, rgb=(215, 35, 35), bg_rgb=(110, 160, 110)))
    magenta = render(Scene(**scene, rgb=(215, 35, 35), bg_rgb=(150, 100, 150)))
    a, b = get_oracle("greener")([green, magenta], PROMPT)
    assert a > b
    assert get_oracle("greener")([flat(128)], PROMPT) == [0.0]
    assert get_oracle("greener")([Image.new("RGB", (8, 8), (0, 255, 0))], PROMPT) == [1.0]
    warm, cool = Image.new("RGB", (8, 8), (200, 128, 56)), Image.new("RGB", (8, 8), (56, 128, 200))
    assert get_oracle("greener")([warm, cool], PROMPT) == pytest.approx([0.0, 0.0])   # red against blue: not its axis
