"""Simulated users: an oracle clicks, then we measure what the clicks taught the model.

    d3po-studio simulate --oracle brighter --rounds 50 --n 2 --seed 0 --out sim/

Each round samples n images of a random prompt of the embedded world and prefers the one the
oracle scores highest. At checkpoints (after 10, 25, 50, 100 clicks and at the end) the tuned
model renders held-out (prompt, seed) pairs with the same noise as the base model, and for every
registered oracle we report, against the base images:

    σ_base      standard deviation of the oracle's score over the base images
    margin m    0.25 σ_base — a change a person could see, not a rounding shift
    win rate    share of pairs where score(tuned) − score(base) > m
    effect      mean(score(tuned) − score(base)) / σ_base

plus prompt fidelity (core.embedded.checker) of base and tuned images. Writes report.json,
compare.png (base row above tuned row) and curve.png (objective against clicks).
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError, UpdateError
from .oracles import ORACLES, get_oracle
from .storage import write_json

log = logging.getLogger(__name__)
EVAL_AT = (10, 25, 50, 100)
EVAL_SEED_OFFSET = 1_000_000       # held-out seeds never used for training rounds


def eval_set(count: int, seed: int) -> list[tuple[str, int]]:
    """Held-out (prompt, seed) pairs: prompts and seeds from streams the training never draws."""
    from .embedded.world import random_prompt
    rng = random.Random(f"eval-{seed}")
    return [(random_prompt(rng), EVAL_SEED_OFFSET + i) for i in range(count)]


def oracle_metrics(base_scores, tuned_scores, margin_factor: float = 0.25) -> dict:
    """Margin win rate and effect size of tuned over base (same prompts and noise)."""
    base, tuned = np.asarray(base_scores, float), np.asarray(tuned_scores, float)
    sd = float(base.std())
    diff = tuned - base
    if sd == 0.0:
        return {"win_rate": float((diff > 0).mean()), "effect_size": 0.0, "base_std": 0.0,
                "mean_change": float(diff.mean())}
    return {"win_rate": float((diff > margin_factor * sd).mean()), "effect_size": float(diff.mean() / sd),
            "base_std": sd, "mean_change": float(diff.mean())}


def score_each(oracle, images, prompts) -> list[float]:
    return [float(oracle([image], prompt)[0]) for image, prompt in zip(images, prompts)]


def evaluate(session, pairs, base_images, clicks: int, base_fidelity: dict | None = None) -> tuple[dict, list]:
    """Render the held-out pairs with the LoRA on and compare with the base images (and, given the
    base images' ``fidelity``, the tuned fidelity as a ratio of it: ``fidelity_vs_base``)."""
    from .embedded.checker import fidelity
    prompts = [p for p, _ in pairs]
    tuned = [session.render(p, s, scale=1.0)[0] for p, s in pairs]
    row = {"clicks": clicks, "oracles": {}}
    for name, oracle in ORACLES.items():
        row["oracles"][name] = oracle_metrics(score_each(oracle, base_images, prompts),
                                              score_each(oracle, tuned, prompts))
        row["oracles"][name]["tuned_mean"] = float(np.mean(score_each(oracle, tuned, prompts)))
    row["fidelity"] = fidelity(tuned, prompts)
    if base_fidelity is not None:
        row["fidelity_vs_base"] = _ratio(row["fidelity"], base_fidelity)
    return row, tuned


def run_simulation(out, *, oracle: str, rounds: int, n: int = 2, seed: int = 0, eval_pairs: int = 32,
                   model: str = "embedded", pipeline=None, eval_at=EVAL_AT, progress=None, lag: int = 0,
                   **settings) -> dict:
    """Run a simulated session in ``out``/session and write the report there. Returns the report.

    ``lag=1`` trains each click only after the next batch has been sampled, as the pipelined
    session does (the batch shown after click k comes from the LoRA of click k−1).
    """
    from .embedded.checker import fidelity
    from .session import Session
    chooser = get_oracle(oracle)
    if rounds < 1 or n < 2 or eval_pairs < 2:
        raise ConfigError("use --rounds 1 or more, --n 2 or more and --eval-pairs 2 or more")
    out = Path(out)
    if (out / "session" / "session.json").exists():
        raise ConfigError(f"{out} already holds a simulation; choose a new --out folder")
    session = Session.open(out / "session", model=model, pipeline=pipeline, seed=seed, **settings)
    with session:
        pairs = eval_set(eval_pairs, seed)
        base = [session.render(p, s, scale=0.0)[0] for p, s in pairs]
        base_fid = fidelity(base, [p for p, _ in pairs])
        rows, click_seconds, fresh, tuned, rolled_back, proxy_pairs = [], [], [], base, 0, 0
        train_rng = random.Random(f"train-{seed}")
        checkpoints = sorted({c for c in eval_at if c < rounds} | {rounds})
        queue: list = []
        for click in range(1, rounds + 1):
            seconds, report = _click(session, chooser, train_rng, n, queue, lag)
            click_seconds.append(seconds)
            fresh.append(report.get("accuracy"))
            rolled_back += bool(report.get("rolled_back"))
            proxy_pairs += (report.get("proxy") or {}).get("pairs", 0)
            if click == rounds:       # the last clicks still in the queue land before the report
                while queue:
                    rolled_back += bool(_prefer(session, queue.pop(0)).get("rolled_back"))
            if click in checkpoints:
                row, tuned = evaluate(session, pairs, base, click, base_fid)
                row["fresh_accuracy"] = _mean_recent(fresh, click - (rows[-1]["clicks"] if rows else 0))
                rows.append(row)
                write_json(out / "partial.json", {"oracle": oracle, "n": n, "seed": seed, "checkpoints": rows,
                                                  "rolled_back": rolled_back, "click_seconds": click_seconds})
            if progress:
                progress(click, rounds)
        report = {"oracle": oracle, "rounds": rounds, "n": n, "seed": seed, "model": model,
                  "rolled_back": rolled_back, "proxy_pairs": proxy_pairs,
                  "settings": session.settings.to_dict(), "runtime": session.runtime.describe(),
                  "base_fidelity": base_fid, "checkpoints": rows,
                  "seconds_per_click": float(np.median(click_seconds)), "fresh_accuracy": fresh}
    report["summary"] = _summary(report)
    write_json(out / "report.json", report)
    _compare_png(base[:8], tuned[:8], out / "compare.png")
    _curve_png(rows, oracle, float(np.mean(score_each(chooser, base, [p for p, _ in pairs]))), out / "curve.png")
    return report


def _click(session, chooser, rng: random.Random, n: int, queue: list, lag: int) -> tuple[float, dict]:
    """One simulated click: sample, let the chooser pick, train the click ``lag`` clicks back.

    Returns (seconds, update report). The report's ``accuracy`` is the fresh-pair accuracy: the
    share of (step, pair) log-ratio comparisons that already rank the chooser's winner first,
    measured before the update (with lag 0, on the batch just sampled).
    """
    from .embedded.world import random_prompt
    start = time.perf_counter()
    prompt = random_prompt(rng)
    batch = session.sample(prompt, n=n, seed=rng.randrange(EVAL_SEED_OFFSET))
    scores = chooser(batch.images, prompt)
    queue.append((batch, int(np.argmax(scores))))
    report = _prefer(session, queue.pop(0)) if len(queue) > lag else {}
    return time.perf_counter() - start, report


def _prefer(session, click: tuple) -> dict:
    """Train one click as a user's click is trained: an update that is rolled back (a non-finite
    step, out of memory) leaves the click untrained and the simulation goes on, as the app does."""
    try:
        return session.prefer(*click)
    except UpdateError as e:
        log.warning("click not trained: %s", e)
        return {"rolled_back": True}


def _mean_recent(values: list, count: int) -> float | None:
    recent = [v for v in values[-count:] if v is not None] if count > 0 else []
    return float(np.mean(recent)) if recent else None


def _ratio(tuned: dict, base: dict) -> float | None:
    return tuned["both"] / base["both"] if base.get("both") else None


def _summary(report: dict) -> dict:
    last = report["checkpoints"][-1]
    own = last["oracles"][report["oracle"]]
    return {"oracle": report["oracle"], "clicks": last["clicks"], "n": report["n"],
            "win_rate": own["win_rate"], "effect_size": own["effect_size"],
            "fidelity_vs_base": last["fidelity_vs_base"], "fresh_accuracy": last.get("fresh_accuracy"),
            "seconds_per_click": report["seconds_per_click"]}


def _compare_png(base, tuned, path: Path) -> None:
    from PIL import Image
    w, h = base[0].size
    grid = Image.new("RGB", (w * len(base), h * 2), "white")
    for i, (b, t) in enumerate(zip(base, tuned)):
        grid.paste(b, (i * w, 0))
        grid.paste(t, (i * w, h))
    grid.save(path)


def _curve_png(rows, oracle: str, base_mean: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([0] + [r["clicks"] for r in rows], [base_mean] + [r["oracles"][oracle]["tuned_mean"] for r in rows],
            marker="o")
    ax.axhline(base_mean, color="grey", lw=0.8, label="base model")
    ax.set_xlabel("clicks")
    ax.set_ylabel(f"mean '{oracle}' score, held-out")
    ax.legend()
    ax.set_title(f"D3PO steering by the '{oracle}' oracle")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

