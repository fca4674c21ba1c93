"""What a click's update costs with today's defaults against the update the learning issue started
from, on the embedded model, with the clicks that step and the clicks that do not apart.

    OMP_NUM_THREADS=1 python -m d3po_studio.bench.update_cost --clicks 18 --timed-from 11
    python -m d3po_studio.bench.update_cost --model tiny --clicks 3 --timed-from 2 --no-docs   # smoke run

One process, one torch thread, one loaded model: a session per variant (every setting the
default but what the variant names; ``filed`` is the update the learning issue measured, the
official per-step rule on every attention projection with a plain AdamW step and nothing else),
all sharing the pipeline as sessions on one model do. Every click, each session samples the same
prompt and seed (best of ``--n``), the ``brighter`` chooser picks, and its ``prefer`` is timed; the
sessions take turns click by click, so a change of the machine's load falls on all of them. A
session's default clicks step once its clicks agree (``step_evidence``) and probe the winners of
its earlier clicks (``anchor_clicks``), so the clicks from ``--timed-from`` on are the ones
reported for the clicks that step (the clicks without a step from the second on); each is divided
by the same click's ``filed`` update, and the median of those ratios is the figure. Writes the "update_cost"
section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import numpy as np
import torch

from . import report
from .learning import format_value, parse_value
from .placement import PLACEMENTS

# The update the learning issue measured "today's per click" with: the official per-step rule
# (no step weight), β 0.3, log-probs summed over the latent, a plain optimizer step of lr 1e-2,
# the LoRA on every attention projection, and none of what the issue added.
FILED = {"step_weight": "none", "beta": 0.3, "reduction": "sum", "lr": 1e-2, "logprob_grid": 0,
         "step_evidence": False, "step_rms": None, "drift_budget": None, "anchor_clicks": 0,
         "lora_targets": PLACEMENTS["attn"]}


def open_sessions(model: str, variants: dict[str, dict], folder) -> dict:
    from .latency import open_session
    return {name: open_session(model, f"{folder}/{name}", **settings) for name, settings in variants.items()}


def measure(sessions: dict, clicks: int, n: int, seed: int = 0) -> list[dict]:
    """Per click: each session's update seconds and whether its click stepped."""
    from ..core.embedded.world import random_prompt
    from ..core.oracles import get_oracle
    chooser, rng, rows = get_oracle("brighter"), random.Random(seed), []
    for click in range(clicks):
        prompt, image_seed = random_prompt(rng), rng.randrange(10 ** 6)
        row = {"click": click + 1}
        for name, session in sessions.items():
            batch = session.sample(prompt, n=n, seed=image_seed)
            rep = session.prefer(batch, best=int(np.argmax(chooser(batch.images, prompt))))
            row[name] = {"seconds": rep["seconds"], "stepped": rep.get("step_scale", 1.0) > 0,
                         "anchor_cut": rep.get("anchor_cut")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def ratios(rows: list[dict], name: str, baseline: str, timed_from: int) -> dict[str, list[float]]:
    """``name``'s update ÷ ``baseline``'s on the same click: for the clicks that stepped from click
    ``timed_from`` on (once there are earlier winners to probe), and for those that did not from
    the second click on (the first warms up)."""
    out = {"stepped": [], "no step": []}
    for i, row in enumerate(rows[1:], start=2):
        ratio = row[name]["seconds"] / row[baseline]["seconds"]
        if not row[name]["stepped"]:
            out["no step"].append(ratio)
        elif i >= timed_from:
            out["stepped"].append(ratio)
    return out


def markdown(rows: list[dict], variants: dict[str, dict], baseline: str, timed_from: int, n: int,
             runtime: str, command: str) -> str:
    table = []
    for name, settings in variants.items():
        split = ratios(rows, name, baseline, timed_from)
        seconds = [row[name]["seconds"] for row in rows[timed_from - 1:] if row[name]["stepped"]]
        cells = [f"{statistics.median(r):.2f}× ({min(r):.2f}–{max(r):.2f}, {len(r)} click{'s' if len(r) != 1 else ''})" if r else "—"
                 for r in (split["stepped"], split["no step"])]
        described = ", ".join(f"`{k}={format_value(v)}`" for k, v in settings.items()) or "today's defaults"
        table.append([name, described, f"{statistics.median(seconds):.2f}" if seconds else "—"] + cells)
    return (f"## What a click's update costs against the update the learning issue started from\n\n"
            f"Machine: {report.machine()}; {runtime}. Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`. "
            f"One process with one torch thread, a session per variant on the one loaded model, taking "
            f"turns click by click; each click best of {n} on the same prompt and seed for every session, "
            f"the `brighter` chooser picking. **÷ {baseline}** = the median of the update's seconds (`prefer`'s "
            f"report) ÷ the same click's `{baseline}` update (range and count in brackets), apart for the "
            f"clicks on which the variant's step moved the LoRA (clicks {timed_from}–{len(rows)}, once there "
            f"are earlier winners to probe) and those on which it did not (no evidence yet; from click 2). "
            f"**update, s** = the median seconds of the clicks that stepped. `{baseline}` = "
            + ", ".join(f"`{k}={format_value(v)}`" for k, v in variants[baseline].items()) + ".\n\n"
            + report.table(["variant", "settings", "update, s (median)", f"÷ {baseline}, clicks that step",
                            f"÷ {baseline}, clicks without a step"], table))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="embedded (default), embedded-random or tiny (smoke)")
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="a variant: a name and the settings it changes (repeatable); "
                        "`filed` and `default` are always measured")
    p.add_argument("--clicks", type=int, default=18)
    p.add_argument("--timed-from", type=int, default=11, help="the first click reported")
    p.add_argument("--n", type=int, default=4, help="images per click (best of n)")
    p.add_argument("--doc", default=str(report.DEFAULT_PATH))
    p.add_argument("--no-docs", action="store_true", help="print only")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    variants = {"filed": FILED, "default": {}}
    for name, *pairs in a.variant or []:
        variants[name] = {k: parse_value(v) for k, v in (pair.split("=", 1) for pair in pairs)}
    sessions = open_sessions(a.model, variants, tempfile.mkdtemp(prefix="d3po-cost-"))
    try:
        rows = measure(sessions, a.clicks, a.n)
        described = next(iter(sessions.values())).runtime.describe()
        runtime = f"{described['dtype']} weights, {described['attention']} attention, {described['optimizer']}"
    finally:
        for session in sessions.values():
            session.close()
    command = (f"python -m d3po_studio.bench.update_cost --model {a.model} --clicks {a.clicks} "
               f"--timed-from {a.timed_from} --n {a.n}"
               + "".join(f" --variant {name} " + " ".join(f"{k}={format_value(v)}" for k, v in s.items())
                         for name, s in variants.items() if name not in ("filed", "default")))
    text = markdown(rows, variants, "filed", a.timed_from, a.n, runtime, command)
    if not a.no_docs:
        report.write_section("update_cost", text, a.doc)
    print(text)


if __name__ == "__main__":
    main()
