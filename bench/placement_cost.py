"""What a click's update costs with the LoRA at each placement, on the embedded model.

    OMP_NUM_THREADS=1 python -m d3po_studio.bench.placement_cost --placements attn1 conv conv+attn1 --rounds 3
    python -m d3po_studio.bench.placement_cost --model tiny --clicks 1 --rounds 1 --no-docs   # smoke run

Each (round, placement) is a fresh process with one torch thread that opens a session with
``lora_targets`` at that placement (every other setting the default) and times its clicks with
``bench/latency.py``'s synchronous loop: the update's own seconds (``prefer``'s report) and its
floor, the reference forward and the policy forward + backward of every trained step. The rounds
alternate the placements (A B A B ...), so a change of the machine's load falls on all of them;
ratios are taken against the first placement within each round, then their median across rounds.
Clicks alternate the preferred image over changing prompts, as random clicks do, so the default
evidence step stays shut and every click times the same work: the gradient passes, not a step.
Writes the "placement_cost" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from . import report
from .placement import PLACEMENTS

CHILD = """
import json, os, sys, tempfile, torch
torch.set_num_threads(1)
from d3po_studio.bench.latency import measure, open_session
model, targets, clicks = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
session = open_session(model, os.path.join(tempfile.mkdtemp(prefix="d3po-cost-"), "s"), lora_targets=targets)
try:
    result = measure(session, clicks)
finally:
    session.close()
print(json.dumps({"median": result["median"], "trainable_parameters": result["trainable_parameters"],
                  "runtime": result["runtime"]}))
"""


def targets(placement: str) -> tuple[str, ...]:
    """The lora_targets of a placement, or of several joined by "+" (``conv+attn1``)."""
    return tuple(t for name in placement.split("+") for t in PLACEMENTS[name])


def placement(text: str) -> str:
    """argparse type: a placement name, or several joined by "+"."""
    unknown = [name for name in text.split("+") if name not in PLACEMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown placement(s) {unknown}; use {sorted(PLACEMENTS)}, joined by '+'")
    return text


def run_child(model: str, placement: str, clicks: int, timeout: float = 1800) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, model, ",".join(targets(placement)), str(clicks)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{placement}: exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}")
    return json.loads(lines[-1])


def ratios(rounds: list[dict[str, dict]], key: str) -> dict[str, float]:
    """Each placement's median over rounds of its ``key`` seconds ÷ the round's first placement's."""
    first = next(iter(rounds[0]))
    return {p: statistics.median(r[p]["median"][key] / r[first]["median"][key] for r in rounds)
            for p in rounds[0]}


def markdown(rounds: list[dict[str, dict]], model: str, clicks: int, command: str) -> str:
    from ..core.config import Settings
    first, default = next(iter(rounds[0])), Settings().lora_targets
    update, floor = ratios(rounds, "update"), ratios(rounds, "floor")
    rows = []
    for p in rounds[0]:
        med = lambda k: statistics.median(r[p]["median"][k] for r in rounds)  # noqa: E731
        rows.append([f"`{', '.join(targets(p))}`" + (" (the default)" if targets(p) == default else ""),
                     f"{rounds[0][p]['trainable_parameters']:,}", f"{med('update'):.2f}", f"{update[p]:.2f}×",
                     f"{med('floor'):.2f}", f"{floor[p]:.2f}×"])
    return (f"## The update's cost by where the LoRA sits\n\nMachine: {report.machine()}. "
            f"Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`. Model: {model}; "
            f"{len(rounds)} round(s) of {clicks} timed click(s) per placement (after one warm-up click), "
            f"each in its own one-thread process, the placements alternating; ratios against "
            f"`{', '.join(targets(first))}` within each round, median over rounds. **update** = the "
            f"seconds `prefer` reports (gradient passes, evidence, checkpoint; the clicks alternate the "
            f"winner, so the evidence step stays shut); **floor** = the reference forward and the policy "
            f"forward + backward of every trained step, timed on the same pair.\n\n"
            + report.table(["LoRA on", "LoRA weights", "update, s", "÷ first", "floor, s", "÷ first"], rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="embedded (default), embedded-random or tiny (smoke)")
    p.add_argument("--placements", nargs="+", default=["attn1", "conv"], type=placement,
                   help=f"placements ({', '.join(PLACEMENTS)}), or several joined by '+' (conv+attn1)")
    p.add_argument("--clicks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--doc", default=str(report.DEFAULT_PATH))
    p.add_argument("--no-docs", action="store_true", help="print only")
    a = p.parse_args(argv)
    rounds = []
    for i in range(a.rounds):
        rounds.append({pl: run_child(a.model, pl, a.clicks) for pl in a.placements})
        print(f"round {i + 1}: " + ", ".join(f"{pl} update {r['median']['update']:.2f} s floor "
                                              f"{r['median']['floor']:.2f} s" for pl, r in rounds[-1].items()),
              flush=True)
    command = ("python -m d3po_studio.bench.placement_cost --model " + a.model + " --placements "
               + " ".join(a.placements) + f" --clicks {a.clicks} --rounds {a.rounds}")
    text = markdown(rounds, a.model, a.clicks, command)
    if not a.no_docs:
        report.write_section("placement_cost", text, a.doc)
    print(text)


if __name__ == "__main__":
    main()
