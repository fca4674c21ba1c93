"""What the page shows, as pure functions of session data: status lines, the resolution menu,
the learning curve, thumbnails and the Compare pictures. No Gradio, no Session calls here.

    >>> resolution_choices(64)[:2]
    [('64 px (native)', 'native'), ('96 px: at least 2.25x the time', '96')]
"""
from __future__ import annotations

import math
from pathlib import Path

RECENT = 5                  # clicks in the "does the model lean your way" window
COMPARE_PX = 320            # small images are shown at least this big (nearest neighbour)
LARGER = (1.5, 2.0)         # sizes offered above the native one, as multiples of it
SMALLER = (0.5, 0.75)       # sizes offered below it, for models of 512 px or more


# ------------------------------------------------------------------ resolution
def resolution_choices(native: int | None) -> list[tuple[str, str]]:
    """(label, value) pairs for the resolution menu of a model whose native side is ``native``.

    Work per image grows at least with the pixel count, so a side k times the native one takes
    at least k² the time (attention grows faster still); the label says so.
    """
    if not native:
        return [("native (the model's size)", "native")]
    below = [_round8(native * f) for f in SMALLER] if native >= 512 else []
    above = [_round8(native * f) for f in LARGER]
    choices = [(f"{px} px: faster, less detail", str(px)) for px in below]
    choices.append((f"{native} px (native)", "native"))
    choices += [(f"{px} px: at least {(px / native) ** 2:.3g}x the time", str(px)) for px in above]
    return choices


def largest_size(native: int | None) -> int | None:
    """The largest side the app accepts for a model of this native size (None = unknown)."""
    return _round8(native * max(LARGER)) if native else None


def _round8(x: float) -> int:
    return max(8, int(round(x / 8)) * 8)


# ---------------------------------------------------------------------- status
def plural(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def model_name(model: str) -> str:
    return "the embedded model" if str(model) == "embedded" else f"`{Path(str(model)).name}`"


def ask(seed: int) -> str:
    return f"Seed {seed}. **Click the image you prefer.**"


def learned_note(report: dict, clicks: int) -> str:
    """One line on what one click taught the model."""
    agreed = report.get("accuracy") if report.get("updates", 1) > 1 else None
    before = "" if agreed is None else (
        f" Before it, the model already leaned toward your pick in {agreed:.0%} of its steps.")
    return f"Learned from click {clicks} in {report['seconds']:.1f} s.{before}{evidence_note(report)}{anchor_note(report)}"


def evidence_note(report: dict) -> str:
    """With ``step_evidence``: how much of a full step the click took, and why."""
    scale = report.get("evidence_scale")
    if scale is None:
        return ""
    if scale <= 0:
        return " The model has not moved yet: it steps once your clicks agree with each other."
    return f" Your clicks agree {scale:.2f} of the way, so the model took {scale:.0%} of a full step."


def anchor_note(report: dict) -> str:
    """With ``drift_budget``: when the click's step was cut at the distance the model may go from the base."""
    cut = report.get("anchor_cut") or 0.0
    if cut <= 0:
        return ""
    return (f" The model is at its set distance from the base model, so this click moved it only "
            f"{1 - cut:.0%} of its step (undo, or raise drift_budget in a new session, to go further).")


def busy_note(pending: dict, clicks: dict[str, int]) -> str:
    """The small progress line while clicks are learned in the background."""
    running = pending.get("running")
    parts = []
    if running:
        step = f": step {pending['step']} of {pending['total']}" if pending.get("total") else ""
        parts.append(f"Learning from click {clicks.get(running, '?')}{step}")
    if pending.get("queued"):
        parts.append(f"{plural(pending['queued'], 'more click')} waiting")
    return "\u23f3 " + "; ".join(parts) + "." if parts else ""


def updates_note(done: list[dict], clicks: dict[str, int], updates: int) -> str:
    """What the background updates that just finished did: learned, cancelled or failed."""
    said = []
    for job in done:
        k = clicks.get(job["round"], "?")
        if "error" in job:
            cancelled = job["error"].startswith("Cancelled")
            said.append(f"Click {k} was {'cancelled' if cancelled else 'not learned'}"
                        + ("." if cancelled else f" ({job['error']})."))
        else:
            said.append(learned_note(job, k))
    return " ".join(said) + f" The LoRA holds {plural(updates, 'learned click')}."


def undo_note(record: dict, updates: int) -> str:
    """What Undo did, in the words of the page (no internal round id)."""
    choice = record.get("choice") or {}
    best = choice.get("best", (choice.get("ranking") or [None])[0])
    picked = f"image #{best + 1} of " if best is not None else ""
    return (f"Undid your last learned click ({picked}\u201c{record.get('prompt', '')}\u201d): the LoRA is back to "
            f"{plural(updates, 'learned click')}. The click stays in the history as undone.")


# --------------------------------------------------------------------- history
def learning_rows(rounds: list[dict]) -> list[dict]:
    """One row per click that trained: click number (counting every click), agreement, loss."""
    rows, click = [], 0
    for r in rounds:
        if not r.get("choice"):
            continue
        click += 1
        report = r.get("report") or {}
        if r["status"] in ("applied", "undone") and "loss" in report:
            fresh = report.get("updates") == 1   # a LoRA of zeros cannot lean either way yet
            rows.append({"click": click, "agreed": None if fresh else report["accuracy"], "loss": report["loss"],
                         "undone": r["status"] == "undone"})
    return rows


def leaning_sentence(rows: list[dict]) -> str:
    """The learning curve in one sentence an artist can read."""
    kept = [r for r in rows if not r["undone"] and r["agreed"] is not None]
    if not kept:
        return ("No lean to show yet: the model is compared with your picks from the second learned click on."
                if rows else "No click has been learned yet.")
    recent = kept[-RECENT:]
    share = sum(r["agreed"] for r in recent) / len(recent)
    return (f"Over your last {plural(len(recent), 'learned click')}, the model already leaned toward the image "
            f"you then picked {share:.0%} of the time (50% = no lean yet; higher = it is learning your taste).")


def learning_figure(rows: list[dict]):
    """Two panels over integer click numbers: how often the model already leaned your way
    (with a running mean), and the loss on its own log axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.2), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    clicks = [r["click"] for r in rows]
    leaning = [(r["click"], 100 * r["agreed"]) for r in rows if r["agreed"] is not None]
    top.axhline(50, color="grey", lw=0.8, ls="--")
    top.scatter([c for c, _ in leaning], [a for _, a in leaning], s=18, color="tab:blue", alpha=0.5,
                label="this click")
    top.plot([c for c, _ in leaning], _running_mean([a for _, a in leaning], RECENT), color="tab:blue", lw=2,
             label=f"mean of the last {RECENT}")
    top.set_ylim(-5, 105)
    top.yaxis.set_major_formatter(PercentFormatter())
    top.set_ylabel("model already\nleaned your way")
    top.legend(loc="lower right", fontsize=8, frameon=False)
    bottom.plot(clicks, [max(r["loss"], 1e-3) for r in rows], marker=".", color="tab:orange")
    bottom.set_yscale("log")
    bottom.set_ylabel("loss (log)")
    bottom.set_xlabel("click")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    bottom.set_xlim(0.5, max(clicks, default=1) + 0.5)
    fig.tight_layout()
    plt.close(fig)
    return fig


def _running_mean(values: list[float], k: int) -> list[float]:
    return [sum(values[max(0, i - k + 1):i + 1]) / len(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def chosen_images(rounds: list[dict], round_dir, limit: int) -> list[tuple[str, str]]:
    """(image path, caption) of the last ``limit`` picked images, newest first."""
    items = []
    for r in reversed(rounds):
        choice = r.get("choice") or {}
        best = choice.get("best", (choice.get("ranking") or [None])[0])
        if best is None or r["status"] not in ("applied", "undone"):
            continue
        mark = " (undone)" if r["status"] == "undone" else ""
        items.append((str(round_dir(r["id"]) / f"image_{best}.png"), f"{r['prompt'][:30]}{mark}"))
        if len(items) == limit:
            break
    return items


# --------------------------------------------------------------------- compare
def enlarged(image, target: int = COMPARE_PX):
    """``image`` scaled up by a whole factor to at least ``target`` px wide, nearest neighbour
    (pixels stay sharp squares); images already that big are returned as they are."""
    from PIL import Image
    factor = math.ceil(target / image.width)
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def compare_caption(prompt: str, negative: str, seed: int, scale: float, size: int, updates: int) -> str:
    negative = f" (negative: \u201c{negative}\u201d)" if negative else ""
    return (f"**\u201c{prompt}\u201d**{negative} \u00b7 seed {seed} \u00b7 {size} px \u00b7 same starting noise; "
            f"left: base model, right: LoRA at strength {scale:.2f} after {plural(updates, 'learned click')}")
