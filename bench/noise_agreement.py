"""What a session's clicks say before any model parameter: their agreement in the noise that decided them.

    python -m d3po_studio.bench.noise_agreement --workdir runs/db07_c50 --variants db07   # ~10 s a cell
    python -m d3po_studio.bench.noise_agreement --decompose 32 --workdir runs/db07_c50 --variants db07

The two images of a pair share the prompt and x_T (core/sampling.py), so they differ only by the
noise each of the T stochastic DDIM steps draws. **decompose** asks how much of a chooser's
decision that noise's channel means carry: for N prompts of the embedded world it samples pairs
three ways — all step noise independent; only each step's channel means independent (the rest
shared); only the rest independent (the channel means shared) — and reports the variance of the
chooser's score difference in the last two as a share of the first.

Per cell of ``bench/learning.py``: each click's step noise is known from its round's seed
(core/sampling.py:drawn_noise, no model run). d = the winner's minus each loser's channel-mean noise
of every step, summed over the losers (standardised: N(0, 2) per value for a random pair), each step
weighted by its reach σ_t/√ᾱ_{t−1} — the coefficient of the noise in the ``x0`` step weight
(core/logprob.py:step_weight) — is what a click gradient of the coarse view would be if the LoRA
mapped noise to weights one to one. Of the unit vectors u = d/|d| of the first k clicks: P = |Σu|²/k,
sd = √V/k (V = 2·Σ_{i≠j}(u_i·u_j)²) and z = (P − 1)/sd, as ``bench/agreement.py`` reads them from
the click gradients (those z are shown beside, from the same rounds' reports). **null**: the same
clicks with their winners drawn at random among each click's images (for pairs, a random sign of
each d: what random clicks are), 400 times: the share of those sessions whose z ever reaches 2 from
the fifth click on, and z95, the level that only 5% of them ever reach; **first** = the first click
whose z reaches 2 and z95. **known direction**: the first 25 clicks projected on the mean unit vector
of the same chooser's other seeds (other cells of the list), as a rule told the direction in advance
would test them. Writes the "noise_agreement" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from .agreement import round_reports, z_score
from .report import table, write_section

AT = (10, 25, 50)
FROM_CLICK = 5          # the null's looks start here (the gradient statistics need a few clicks too)
REPLICATES = 400
LEVEL = 2.0
KNOWN_AT = 25           # clicks at which the known direction's test is read


def reach_weights(scheduler, eta: float) -> np.ndarray:
    """σ_t/√ᾱ_{t−1} per step of ``scheduler``'s grid: how far a coarse shift of that step's noise
    reaches the final latent (docs/algorithm.md, "Where a pair's evidence runs out")."""
    from ..core.logprob import step_coefficients
    out = []
    for t in scheduler.timesteps:
        _, alpha_prev, sigma = step_coefficients(scheduler, t, eta)
        out.append(sigma / alpha_prev ** 0.5)
    return np.array(out)


def channel_means(noise: torch.Tensor) -> torch.Tensor:
    """[..., C, h, w] standard normal noise → [..., C] standardised channel means (each N(0, 1))."""
    h, w = noise.shape[-2:]
    return noise.float().mean((-2, -1)) * (h * w) ** 0.5


def click_differences(coarse: np.ndarray, best: np.ndarray) -> np.ndarray:
    """[k, T, n, C] channel means of each click's n images, [k] winners → [k, T, C]: the sum over the
    losers of winner minus loser (n·c_best − Σ c), as a best-of-n click trains winner against each other."""
    n = coarse.shape[2]
    chosen = coarse[np.arange(len(coarse)), :, best]          # [k, T, C]
    return n * chosen - coarse.sum(2)


def click_vectors(differences: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[k, T, C] winner-minus-losers channel means → [k, T·C] unit vectors, step t weighted by weights[t]."""
    x = (differences * weights[None, :, None]).reshape(len(differences), -1)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def agreement_path(units: np.ndarray) -> np.ndarray:
    """z = (P − 1)/sd after each click k = 1..K (nan while sd = 0)."""
    gram = units @ units.T
    below = np.tril(gram, -1)                      # each click against the ones before it
    k = np.arange(1, len(units) + 1)
    power = np.cumsum(2 * below.sum(1) + np.diag(gram)) / k
    sd = np.sqrt(2 * np.cumsum(2 * (below ** 2).sum(1))) / k
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 0, (power - 1.0) / sd, np.nan)


def null_maxima(coarse: np.ndarray, weights: np.ndarray, replicates: int = REPLICATES, start: int = FROM_CLICK,
                seed: int = 0) -> np.ndarray:
    """The largest z from click ``start`` on of each of ``replicates`` sessions with the same clicks'
    images and a winner drawn at random among each click's n (for pairs: a random sign of each d)."""
    rng = np.random.default_rng(seed)
    k, n = coarse.shape[0], coarse.shape[2]
    out = np.empty(replicates)
    for r in range(replicates):
        units = click_vectors(click_differences(coarse, rng.integers(n, size=k)), weights)
        looks = agreement_path(units)[start - 1:]
        out[r] = np.nanmax(looks) if np.isfinite(looks).any() else np.nan
    return out


def along(units: np.ndarray, direction: np.ndarray, clicks: int) -> tuple[float, float]:
    """(share of the first ``clicks`` unit vectors on the side of ``direction``, t of their projections
    on it): how strongly the clicks point a way known in advance (for random clicks, t ~ N(0, 1))."""
    proj = units[:clicks] @ (direction / np.linalg.norm(direction))
    return float((proj > 0).mean()), float(proj.mean() / (proj.std(ddof=1) / len(proj) ** 0.5))


def first_at(path: np.ndarray, level: float, start: int = 1) -> int | None:
    hits = [k + 1 for k in range(start - 1, len(path)) if path[k] >= level]
    return hits[0] if hits else None


def cell_noise(cell: Path, scheduler_for, clicks: int = max(AT)
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]] | None:
    """(channel means [k, T, n, C], winners [k], reach weights [T], round reports) of a cell's first
    ``clicks`` rounds; None if a round is not an applied click of the same n images and sampling."""
    from ..core.sampling import drawn_noise
    rounds = sorted((cell / "session" / "rounds").glob("*/round.json"))[:clicks]
    coarse, best, weights, n, sampling = [], [], None, None, None
    for path in rounds:
        r = json.loads(path.read_text())
        n, sampling = n or r.get("n"), sampling or r.get("sampling")
        if (r.get("n") != n or r.get("sampling") != sampling or r.get("status") != "applied"
                or "best" not in (r.get("choice") or {})):
            return None
        if weights is None:
            scheduler, shape = scheduler_for(sampling)
            weights = reach_weights(scheduler, sampling["eta"])
        _, noise = drawn_noise(r["seed"], n, shape, sampling["steps"])
        coarse.append(channel_means(noise).numpy())   # [T, n, C]
        best.append(int(r["choice"]["best"]))
    if not coarse:
        return None
    return np.stack(coarse), np.array(best), weights, round_reports(cell)[:clicks]


def cell_row(name: list[str], coarse: np.ndarray, best: np.ndarray, weights: np.ndarray, reports: list[dict],
             at=AT, replicates: int = REPLICATES) -> list[str]:
    path = agreement_path(click_vectors(click_differences(coarse, best), weights))
    grad = [z_score(r["evidence_power"], r["evidence_null_sd"]) if "evidence_power" in r else np.nan
            for r in reports]
    maxima = null_maxima(coarse, weights, replicates)
    z95 = float(np.nanquantile(maxima, 0.95)) if np.isfinite(maxima).any() else float("nan")
    ever = float((maxima >= LEVEL).mean())

    def show(values, click):
        return f"{values[click - 1]:+.1f}" if click <= len(values) and np.isfinite(values[click - 1]) else "—"

    first_noise = first_at(path, LEVEL, FROM_CLICK)
    first_grad = first_at(np.array(grad), LEVEL)
    first_z95 = first_at(path, z95, FROM_CLICK) if np.isfinite(z95) else None
    return (list(name) + [f"{show(path, c)} / {show(grad, c)}" for c in at]
            + [f"{first_noise or '—'} / {first_grad or '—'}", f"{ever:.0%}",
               f"{z95:.1f}" if np.isfinite(z95) else "—", f"{first_z95 or '—'}"])


def rows(workdir: Path, variants: list[str], model_for=None, at=AT, replicates: int = REPLICATES,
         clicks: int = max(AT)) -> list[list[str]]:
    """One row per cell of ``variants`` in ``workdir`` (folders VARIANT__CHOOSER__nN__sSEED)."""
    from ..core.loading import load_pipeline
    from ..core.sampling import make_scheduler
    pipes: dict[str, object] = {}

    def scheduler_for_model(model):
        def scheduler_for(sampling):
            if model not in pipes:
                pipes[model] = model_for(model) if model_for else load_pipeline(model)
            pipe = pipes[model]
            scale = pipe.vae_scale_factor
            shape = (pipe.unet.config.in_channels, sampling["height"] // scale, sampling["width"] // scale)
            return make_scheduler(pipe, sampling["steps"]), shape
        return scheduler_for

    out, units = [], []
    for cell in sorted(p for p in workdir.iterdir() if p.is_dir() and p.name.count("__") == 3):
        variant, chooser, n, seed = cell.name.split("__")
        if variant not in variants:
            continue
        session = json.loads((cell / "session" / "session.json").read_text())
        found = cell_noise(cell, scheduler_for_model(session["model"]), clicks)
        if found is not None:
            mode = "pairs" if n == "n2" else f"best of {n[1:]}"
            out.append(cell_row([variant, chooser, mode, seed[1:]], *found, at=at, replicates=replicates))
            coarse, best, weights, _ = found
            units.append(((chooser, n), seed, click_vectors(click_differences(coarse, best), weights)))
    known = KNOWN_AT if KNOWN_AT <= clicks else clicks
    for row, (group, seed, u) in zip(out, units):
        others = [v for g, s, v in units if g == group and s != seed]
        if others and len(u) >= known:
            share, t = along(u, np.concatenate(others).mean(0), known)
            row.append(f"{share:.0%} / {t:+.1f}")
        else:
            row.append("—")
    return out


@torch.no_grad()
def decompose(pipe, choosers: list[str], count: int, seed: int = 0, steps: int = 10, guidance: float = 6.0,
              eta: float = 1.0, size: int = 64) -> dict[str, tuple[float, float]]:
    """{chooser: (var(coarse only differs)/var(all differ), var(fine only differs)/var(all differ))}
    over ``count`` prompts of the embedded world, one pair per prompt and way."""
    from ..core.embedded.world import random_prompt
    from ..core.logprob import step_mean
    from ..core.oracles import get_oracle
    from ..core.sampling import decode, encode_conditioning, make_scheduler, predict_noise
    device = pipe.unet.device
    scale = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, size // scale, size // scale)

    def pair(prompt: str, noise_seed: int, way: str):
        scheduler = make_scheduler(pipe, steps)
        cond = encode_conditioning(pipe, prompt, "", size, size, device)
        g = torch.Generator("cpu").manual_seed(noise_seed)
        x = (torch.randn((1, *shape), generator=g) * scheduler.init_noise_sigma).expand(2, -1, -1, -1).to(device)
        for t in scheduler.timesteps:
            eps = predict_noise(pipe.unet, x, t, cond, guidance)
            mean, sigma = step_mean(scheduler, eps, t, x, eta)
            z = torch.randn((2, *shape), generator=g)
            coarse = z.mean((-2, -1), keepdim=True)
            fine = z - coarse
            if way == "coarse":
                fine = fine[:1].expand_as(fine)
            elif way == "fine":
                coarse = coarse[:1].expand_as(coarse)
            x = mean + sigma * (coarse + fine).to(device)
        return decode(pipe, x)

    rng = random.Random(f"decompose-{seed}")
    ways = ("all", "coarse", "fine")
    diffs = {w: {c: [] for c in choosers} for w in ways}
    oracles = {c: get_oracle(c) for c in choosers}
    for i in range(count):
        prompt = random_prompt(rng)
        for way in ways:
            images = pair(prompt, 10_000 * seed + i, way)
            for c in choosers:
                a, b = oracles[c](images, prompt)
                diffs[way][c].append(a - b)
    return {c: (float(np.var(diffs["coarse"][c]) / np.var(diffs["all"][c])),
                float(np.var(diffs["fine"][c]) / np.var(diffs["all"][c]))) for c in choosers}


def markdown(found: list[list[str]], command: str, shares: dict | None, decompose_command: str | None,
             at=AT) -> str:
    import datetime
    parts = ["## What the clicks say in the noise that decided them", "",
             f"Run {datetime.date.today().isoformat()}, torch {torch.__version__}, one torch thread; "
             "bench/noise_agreement.py says what each column is.", ""]
    if shares:
        parts += [f"Command: `{decompose_command}`. Variance of the chooser's score difference within a pair when "
                  "only the channel means of each step's noise differ (the rest shared), and when only the rest "
                  "differs, as a share of its variance when all the noise differs:", "",
                  table(["chooser", "channel means differ", "the rest differs"],
                        [[c, f"{a:.0%}", f"{b:.0%}"] for c, (a, b) in shares.items()]), ""]
    if found:
        headers = (["variant", "chooser", "mode", "seed"] + [f"z @{c}: noise / gradient" for c in at]
                   + ["first z ≥ 2: noise / gradient", "random winners ever ≥ 2", "z95", "first ≥ z95",
                      f"known direction @{KNOWN_AT}: share / t"])
        parts += [f"Command: `{command}`. Per cell: **noise** = the agreement z of the clicks' "
                  "reach-weighted channel-mean noise differences, winner minus each loser (bench/noise_agreement.py), **gradient** = the "
                  "z of the click gradients from the same rounds' reports (bench/agreement.py); **random winners "
                  f"ever ≥ 2** = share of {REPLICATES} sessions with the same clicks' images and winners drawn at random whose noise "
                  f"z reached 2 from click {FROM_CLICK} on; **z95** = the level only 5% of them reach; "
                  "**first** = the first click at that level; **known direction** = the clicks tested against the "
                  "direction of the same chooser's other seeds (the mean of their unit vectors, every listed cell of the "
                  f"same chooser and images per click with another seed): the share of the first {KNOWN_AT} that point "
                  "its way and the t of their projections on it (random clicks: 50%, t ~ N(0, 1)), what a rule told the "
                  "chooser's direction in advance would see.", "", table(headers, found), ""]
    return "\n".join(parts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="a folder of bench/learning.py cells (their session folders)")
    p.add_argument("--variants", nargs="+", default=[], help="the variants whose cells to show")
    p.add_argument("--decompose", type=int, default=0, metavar="N",
                   help="also sample N prompts' pairs three ways on the embedded model (~1 s a prompt)")
    p.add_argument("--choosers", nargs="+", default=["brighter", "warmer", "greener"], help="for --decompose")
    p.add_argument("--model", default="embedded", help="for --decompose (default embedded)")
    p.add_argument("--clicks", type=int, default=max(AT), help="the first clicks of each cell to use (default 50)")
    p.add_argument("--replicates", type=int, default=REPLICATES, help="random-winner sessions per cell")
    p.add_argument("--docs", help="markdown file to write the section into (default docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true", help="print only")
    a = p.parse_args(argv)
    if not a.workdir and not a.decompose:
        p.error("give --workdir and --variants, or --decompose N, or both")
    found = rows(Path(a.workdir), a.variants, replicates=a.replicates, clicks=a.clicks) if a.workdir else []
    if a.workdir and not found:
        raise SystemExit(f"no cell of {a.variants} in {a.workdir} with clicks of one image count")
    shares = None
    if a.decompose:
        from ..core.loading import load_pipeline
        torch.manual_seed(0)
        shares = decompose(load_pipeline(a.model), a.choosers, a.decompose)
    command = (f"python -m d3po_studio.bench.noise_agreement --workdir {a.workdir} --variants {' '.join(a.variants)}"
               + (f" --clicks {a.clicks}" if a.clicks != max(AT) else ""))
    decompose_command = (f"python -m d3po_studio.bench.noise_agreement --decompose {a.decompose} --choosers "
                         f"{' '.join(a.choosers)} --model {a.model}")
    text = markdown(found, command, shares, decompose_command)
    if not a.no_docs:
        write_section("noise_agreement", text, **({"path": a.docs} if a.docs else {}))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
