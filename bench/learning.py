"""Does clicking steer the embedded model? Simulated users, measured on held-out pairs.

    nice -n 10 python -m d3po_studio.bench.learning                 # full table (~1 h on 2 cores)
    python -m d3po_studio.bench.learning --rounds 50 --modes 2      # a shorter run

For each oracle (brighter, jpeg-compressible, larger-shape) and each mode (pairs, best-of-4):
a fresh session on the embedded model, `rounds` simulated clicks, and an evaluation after
10, 25, 50 and 100 clicks on 32 held-out (prompt, seed) pairs rendered with the same noise by the
base and the tuned model (core/simulate.py defines the metrics). The random oracle is the control,
over three seeds, scored by every other oracle. Writes the "learning" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ..core.simulate import EVAL_AT, run_simulation
from .report import write_section

ORACLES = ("brighter", "jpeg-compressible", "larger-shape")
CONTROL_SEEDS = (0, 1, 2)


def run(rounds: int, modes: tuple[int, ...], eval_pairs: int, control_rounds: int, workdir: Path,
        settings: dict) -> dict:
    results = {"runs": [], "controls": []}
    for oracle in ORACLES:
        for n in modes:
            report = run_simulation(workdir / f"{oracle}-n{n}", oracle=oracle, rounds=rounds, n=n, seed=0,
                                    eval_pairs=eval_pairs, **settings)
            results["runs"].append(report)
            print(report["summary"], flush=True)
    for seed in CONTROL_SEEDS:
        report = run_simulation(workdir / f"random-s{seed}", oracle="random", rounds=control_rounds, n=2,
                                seed=seed, eval_pairs=eval_pairs, **settings)
        results["controls"].append(report)
        print(report["summary"], flush=True)
    return results


def markdown(results: dict, rounds: int, control_rounds: int, eval_pairs: int, seconds: float) -> str:
    runs, controls = results["runs"], results["controls"]
    first = (runs or controls)[0]
    s = first["settings"]
    lines = [
        "## Learning: simulated users on the embedded model",
        "",
        f"Command: `python -m d3po_studio.bench.learning --rounds {rounds} --control-rounds {control_rounds}` "
        f"({time.strftime('%Y-%m-%d')}, {seconds / 60:.0f} min on this 2-core CPU). Settings: "
        f"steps {s['steps']}, guidance {s['guidance']}, eta {s['eta']}, β {s['beta']}, lr {s['lr']}, "
        f"reduction {s['reduction']}, LoRA rank {s['lora_rank']} on {', '.join(s['lora_targets'])}, "
        f"dtype {first['runtime']['dtype']}, optimizer {first['runtime']['optimizer']}. "
        f"Evaluation: {eval_pairs} held-out (prompt, seed) pairs, base vs tuned with the same noise; "
        "win = tuned beats base by more than 0.25 σ_base of the oracle's score; effect = mean change / σ_base; "
        "fidelity = colour-and-kind correctness of tuned / base (core/embedded/checker.py). One run per cell.",
        "",
        "| oracle | mode | " + " | ".join(f"win / effect @{c}" for c in EVAL_AT if c <= rounds)
        + " | fidelity vs base | s/click |",
        "|---|---|" + "---|" * len([c for c in EVAL_AT if c <= rounds]) + "---|---|",
    ]
    for r in runs:
        lines.append(_row(r, r["oracle"], "pairs" if r["n"] == 2 else f"best of {r['n']}", rounds))
    lines += ["", f"Control: the `random` oracle, {control_rounds} clicks, mean over seeds {CONTROL_SEEDS}, "
              "scored by each oracle:", "",
              "| scored by | margin win rate | effect size |", "|---|---|---|"]
    for name in ORACLES:
        wins = [c["checkpoints"][-1]["oracles"][name]["win_rate"] for c in controls]
        effects = [c["checkpoints"][-1]["oracles"][name]["effect_size"] for c in controls]
        lines.append(f"| {name} | {statistics.mean(wins):.0%} | {statistics.mean(effects):+.2f} |")
    fid = [c["checkpoints"][-1]["fidelity_vs_base"] for c in controls if c["checkpoints"][-1]["fidelity_vs_base"]]
    if fid:
        lines.append(f"\nControl fidelity vs base: {statistics.mean(fid):.0%}.")
    return "\n".join(lines)


def _row(report: dict, oracle: str, mode: str, rounds: int) -> str:
    cells = []
    by_clicks = {c["clicks"]: c for c in report["checkpoints"]}
    for c in EVAL_AT:
        if c > rounds:
            continue
        m = by_clicks[c]["oracles"][oracle] if c in by_clicks else None
        cells.append(f"{m['win_rate']:.0%} / {m['effect_size']:+.2f}" if m else "—")
    fid = report["checkpoints"][-1]["fidelity_vs_base"]
    fid_text = f"{fid:.0%}" if fid is not None else "—"
    return f"| {oracle} | {mode} | " + " | ".join(cells) + f" | {fid_text} | {report['seconds_per_click']:.2f} |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--modes", type=int, nargs="+", default=[2, 4], help="images per click")
    p.add_argument("--control-rounds", type=int, default=50)
    p.add_argument("--eval-pairs", type=int, default=32)
    p.add_argument("--workdir", help="keep the sessions here (default: a temporary folder)")
    p.add_argument("--docs", default=None, help="benchmarks.md to write (default docs/benchmarks.md)")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="d3po-learning-"))
    start = time.perf_counter()
    results = run(args.rounds, tuple(args.modes), args.eval_pairs, args.control_rounds, workdir, {})
    text = markdown(results, args.rounds, args.control_rounds, args.eval_pairs, time.perf_counter() - start)
    kwargs = {"path": args.docs} if args.docs else {}
    write_section("learning", text, **kwargs)
    print(text)


if __name__ == "__main__":
    main()
