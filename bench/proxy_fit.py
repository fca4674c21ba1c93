"""Which choosers can the preference model of ``proxy_candidates`` learn from clicks alone?

    python -m d3po_studio.bench.proxy_fit                 # 3 seeds × 60 pairs, ~3 min on one core

For each seed: a fresh session on the embedded model samples 60 pairs of random prompts with the
base model (no update). Every chooser (and the random control) then labels the same pairs, and the
model of core/proxy.py predicts each click from the clicks before it only (prequential accuracy,
clicks 6–60; chance 50%), and the gate of core/proxy.py is read after 20 and after 60 clicks.
A chooser the model predicts at chance leaves the gate shut: ``proxy_candidates`` then changes
nothing for it. Writes the "proxy-fit" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time

import numpy as np

from ..core import proxy
from ..core.oracles import get_oracle
from .report import write_section

CHOOSERS = ("brighter", "jpeg-compressible", "larger-shape", "saturated", "centered", "random")


def sampled_pairs(seed: int, count: int) -> list[tuple[str, list]]:
    """``count`` (prompt, images) pairs from the base embedded model, prompts of the embedded world."""
    from ..core.embedded.world import random_prompt
    from ..core.session import Session
    rng = random.Random(f"proxy-fit-{seed}")
    with Session.open(tempfile.mkdtemp(prefix="d3po-proxy-fit-"), model="embedded",
                      gradient_checkpointing=False) as session:
        return [(p, session.sample(p, n=2, seed=rng.randrange(2**31)).images)
                for p in (random_prompt(rng) for _ in range(count))]


def chooser_fit(pairs, features, chooser: str) -> dict:
    oracle = get_oracle(chooser)
    clicks = []
    for (prompt, images), f in zip(pairs, features):
        w = int(np.argmax(oracle(images, prompt)))
        clicks.append(proxy.Click(f, ((w, 1 - w),)))
    hits = proxy.prequential(clicks, window=len(clicks))
    return {"accuracy": float(np.mean(hits)), "gate20": proxy.gate(clicks[:20])["open"],
            "gate60": proxy.gate(clicks)["open"]}


def markdown(results: dict, seeds: list[int], count: int, command: str, minutes: float) -> str:
    lines = ["## Which choosers the preference model of `proxy_candidates` can learn",
             "",
             f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {minutes:.1f} min, one core). "
             f"Per seed, {count} pairs sampled by the base embedded model, labelled by every chooser; "
             "**prequential accuracy** = share of clicks 6–60 whose winner a model fitted only on the "
             "clicks before it scored higher (chance 50%); **gate open** = seeds whose gate "
             "(core/proxy.py: last 20 predictions beat chance at p < 0.05) was open after 20 / 60 clicks. "
             f"Mean ± sd over {len(seeds)} seeds.",
             "",
             "| chooser | prequential accuracy | gate open @20 | gate open @60 |",
             "|---|---|---|---|"]
    for chooser, rows in results.items():
        acc = [r["accuracy"] * 100 for r in rows]
        spread = f" ± {statistics.stdev(acc):.0f}" if len(acc) > 1 else ""
        lines.append(f"| {chooser} | {statistics.mean(acc):.0f}{spread}% | {sum(r['gate20'] for r in rows)}/{len(rows)}"
                     f" | {sum(r['gate60'] for r in rows)}/{len(rows)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    results: dict[str, list] = {c: [] for c in CHOOSERS}
    for seed in args.seeds:
        pairs = sampled_pairs(seed, args.pairs)
        features = [proxy.image_features(images) for _, images in pairs]
        for chooser in CHOOSERS:
            results[chooser].append(chooser_fit(pairs, features, chooser))
    command = "python -m d3po_studio.bench.proxy_fit " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, args.seeds, args.pairs, command.strip(), (time.perf_counter() - start) / 60)
    if not args.no_docs:
        write_section("proxy-fit", text)
    print(text)


if __name__ == "__main__":
    main()
