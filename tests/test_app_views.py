"""What the page shows, as pure functions (gradio_app/views.py) and the number parsers
(core/inputs.py): hand-made inputs, exact outputs."""
import math

import pytest
from PIL import Image

from d3po_studio.core.errors import ConfigError
from d3po_studio.gradio_app import views
from d3po_studio.core.inputs import SEED_MAX, parse_count, parse_finite, parse_seed


def test_resolutions_follow_the_native_size_and_say_the_cost():
    assert views.resolution_choices(64) == [("64 px (native)", "native"), ("96 px: at least 2.25x the time", "96"),
                                            ("128 px: at least 4x the time", "128")]
    assert [v for _, v in views.resolution_choices(512)] == ["256", "384", "native", "768", "1024"]
    assert views.resolution_choices(None) == [("native (the model's size)", "native")]
    assert views.largest_size(64) == 128 and views.largest_size(None) is None


def rows(*agreed_loss):
    return [{"click": k, "agreed": a, "loss": l, "undone": False} for k, (a, l) in enumerate(agreed_loss, start=1)]


def test_learning_rows_count_every_click_and_skip_the_fresh_lora():
    rounds = [
        {"choice": {"best": 0}, "status": "applied", "report": {"accuracy": 0.0, "loss": 0.69, "updates": 1}},
        {"choice": {"none": True}, "status": "skipped", "report": {"skipped": True}},
        {"choice": None, "status": "shown"},
        {"choice": {"best": 1}, "status": "undone", "report": {"accuracy": 0.8, "loss": 45.9, "updates": 2}},
    ]
    assert views.learning_rows(rounds) == [{"click": 1, "agreed": None, "loss": 0.69, "undone": False},
                                           {"click": 3, "agreed": 0.8, "loss": 45.9, "undone": True}]


def test_leaning_sentence_reads_the_last_clicks():
    assert views.leaning_sentence([]) == "No click has been learned yet."
    assert "No lean to show yet" in views.leaning_sentence(rows((None, 0.7)))
    text = views.leaning_sentence(rows((None, 0.7), (1.0, 0.5), (0.5, 0.4)))
    assert text.startswith("Over your last 2 learned clicks, the model already leaned toward the image you "
                           "then picked 75% of the time")


def test_learning_figure_has_integer_clicks_and_loss_on_its_own_log_axis():
    """Issue 11 item 2: fractional click ticks (1.0, 1.1, …); loss spikes flattening accuracy."""
    for data in (rows((None, 0.69)), rows((None, 0.69), (0.2, 45.9), (0.9, 58.7), (0.6, 0.3))):
        fig = views.learning_figure(data)
        top, bottom = fig.axes
        lo, hi = bottom.get_xlim()
        shown = [t for t in bottom.get_xticks() if lo <= t <= hi]
        assert shown and all(float(t).is_integer() for t in shown)
        assert bottom.get_yscale() == "log" and top.get_ylim() == (-5, 105)
    assert top.lines[-1].get_ydata().tolist() == [20.0, 55.0, pytest.approx(170 / 3)]   # running mean


def test_status_notes():
    assert views.learned_note({"seconds": 1.23, "updates": 1, "accuracy": 0.0}, 1) == "Learned from click 1 in 1.2 s."
    assert views.learned_note({"seconds": 2, "updates": 3, "accuracy": 0.4}, 4).endswith(
        "Before it, the model already leaned toward your pick in 40% of its steps.")
    # step_evidence: the first clicks (or random ones) do not move the model, and the status says so
    assert views.learned_note({"seconds": 1, "updates": 1, "accuracy": 0.0, "evidence_scale": 0.0}, 1) == \
        "Learned from click 1 in 1.0 s. The model has not moved yet: it steps once your clicks agree with each other."
    assert views.learned_note({"seconds": 1, "updates": 1, "evidence_scale": 0.256}, 9).endswith(
        "Your clicks agree 0.26 of the way, so the model took 26% of a full step.")
    # drift_budget: a click cut at the anchor says so; an uncut one says nothing more
    assert views.learned_note({"seconds": 1, "updates": 1, "anchor_cut": 0.0}, 3) == "Learned from click 3 in 1.0 s."
    assert views.learned_note({"seconds": 1, "updates": 1, "anchor_cut": 0.75}, 30).endswith(
        "so this click moved it only 25% of its step (undo, or raise drift_budget in a new session, to go further).")
    clicks = {"r1": 1, "r2": 2}
    assert views.busy_note({"running": "r2", "step": 3, "total": 10, "queued": 1}, clicks) == \
        "\u23f3 Learning from click 2: step 3 of 10; 1 more click waiting."
    assert views.busy_note({"running": None, "queued": 0}, clicks) == ""
    note = views.updates_note([{"round": "r1", "error": "Cancelled: the update was cancelled by the user"},
                               {"round": "r2", "error": "UpdateError: non-finite loss"}], clicks, 0)
    assert note == ("Click 1 was cancelled. Click 2 was not learned (UpdateError: non-finite loss). "
                    "The LoRA holds 0 learned clicks.")
    assert views.undo_note({"prompt": "a red circle", "choice": {"best": 1}}, 2).startswith(
        "Undid your last learned click (image #2 of \u201ca red circle\u201d): the LoRA is back to 2 learned clicks.")


def test_enlarged_keeps_pixels_square():
    image = Image.new("RGB", (64, 64), "red")
    image.putpixel((0, 0), (0, 0, 255))
    big = views.enlarged(image)
    assert big.size == (320, 320) and big.getpixel((4, 4)) == (0, 0, 255) and big.getpixel((5, 5)) == (255, 0, 0)
    large = Image.new("RGB", (512, 512))
    assert views.enlarged(large) is large


@pytest.mark.parametrize("value, expected", [("7", 7), (7, 7), (7.0, 7), ("1e3", 1000), (SEED_MAX, SEED_MAX), (0, 0)])
def test_parse_seed_accepts(value, expected):
    assert parse_seed(value) == expected


@pytest.mark.parametrize("value, message", [
    (None, "seed is empty"), ("", "seed is empty"), (2**64, "out of range"), ("1e30", "out of range"),
    (-1, "out of range"), (5.5, "not a whole number"), ("nan", "not a whole number"),
    (math.inf, "not a whole number"), ("abc", "not a number"), (True, "not a number"),
])
def test_parse_seed_refuses(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_seed(value)


def test_parse_count_and_finite():
    assert parse_count("3", "images", 2, 4) == 3
    with pytest.raises(ConfigError, match="images '0' is out of range: use a whole number from 2 to 4"):
        parse_count("0", "images", 2, 4)
    assert parse_finite("0.5", "strength", 0.0, 2.0) == 0.5
    for bad in ("nan", "inf", "-inf", 3.0):
        with pytest.raises(ConfigError, match="out of range"):
            parse_finite(bad, "strength", 0.0, 2.0)
    with pytest.raises(ConfigError, match="not a number"):
        parse_finite(None, "scale")
