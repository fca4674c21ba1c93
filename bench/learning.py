"""Does clicking steer the embedded model? Simulated choosers, 3 seeds a cell, held-out pairs.

    python -m d3po_studio.bench.learning                       # the full study (~1 h+ on 2 cores)
    python -m d3po_studio.bench.learning --quick               # brighter + random, pairs, 25 clicks
    python -m d3po_studio.bench.learning --variant full logprob_grid=0 step_evidence=false \\
        drift_budget=null step_rms=0.02 --choosers brighter random --modes 2 --workdir runs/
                                                               # compare a setting against the defaults

A cell is (settings variant, chooser, images per click, seed): a fresh session on the embedded
model, ``--clicks`` simulated clicks (core/simulate.py), evaluated after 10, 25 and 50 clicks on
held-out (prompt, seed) pairs rendered by base and tuned model with the same noise. Cells run as
parallel processes with one torch thread each (two threads per process on a 2-core machine are
many times slower). A cell whose report.json exists in ``--workdir`` is not run again, so a study
can be resumed or extended. Writes the "learning" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..core.simulate import run_simulation
from .report import write_section

CHOOSERS = ("brighter", "jpeg-compressible", "larger-shape", "saturated", "centered", "warmer", "greener")
CONTROL = "random"
EVAL_AT = (10, 25, 50)
# Runtime choices that do not change the math, for speed: no gradient checkpointing on a 5 M model.
BENCH_SETTINGS = {"gradient_checkpointing": False}


def parse_value(text: str):
    """A settings value from the command line: null, true/false, numbers, a comma-separated tuple
    (lora_targets=to_q,to_v), else the string (so step_weight=none stays the string "none", and
    step_rms=null is None)."""
    if "," in text:
        return tuple(parse_value(part) for part in text.split(",") if part)
    lowered = text.lower()
    if lowered == "null":
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def format_value(value) -> str:
    """A settings value for a table: tuples as the command line writes them (to_q,to_v)."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(format_value, value))
    return str(value)


def cell_name(variant: str, chooser: str, n: int, seed: int) -> str:
    return f"{variant}__{chooser}__n{n}__s{seed}"


def run_cell(cell: dict) -> dict:
    """Run one cell in this process (the worker side of ``--cell``)."""
    out = Path(cell["out"])
    settings = {**BENCH_SETTINGS, **cell["settings"]}
    lag = settings.pop("lag", 0)      # not a session setting: the simulated pipelining (core/simulate.py)
    started = time.perf_counter()

    def progress(click, clicks):     # in the cell's .log: how fast it goes, for runs that get stopped
        if click % 5 == 0:
            print(f"click {click}/{clicks} at {time.perf_counter() - started:.0f} s", flush=True)
    report = run_simulation(out, oracle=cell["chooser"], rounds=cell["clicks"], n=cell["n"], seed=cell["seed"],
                            eval_pairs=cell["eval_pairs"], eval_at=EVAL_AT, lag=lag, progress=progress, **settings)
    report["variant"] = cell["variant"]
    (out / "cell.json").write_text(json.dumps({**cell, "summary": report["summary"]}))
    return report


def run_cells(cells: list[dict], jobs: int, deadline: float | None = None, stop: float | None = None,
              module: str = "d3po_studio.bench.learning") -> None:
    """Run the cells without a report as subprocesses, ``jobs`` at a time, one torch thread each.

    No cell starts ``deadline`` seconds from now or later; cells still running at ``stop`` seconds
    are killed (they leave no report; a later run with the same --workdir redoes them). Each runs
    ``python -m module --cell CELL``.
    """
    todo = [c for c in cells if not (Path(c["out"]) / "report.json").exists()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list[tuple[subprocess.Popen, dict]] = []
    start = time.monotonic()
    while todo or running:
        elapsed = time.monotonic() - start
        if deadline is not None and elapsed > deadline and todo:
            print(f"deadline: {len(todo)} cells not started", flush=True)
            todo = []
        if stop is not None and elapsed > stop:
            for proc, cell in running:
                proc.kill()
                print(f"{Path(cell['out']).name}: stopped at the deadline", flush=True)
            return
        while todo and len(running) < jobs:
            cell = todo.pop(0)
            Path(cell["out"]).parent.mkdir(parents=True, exist_ok=True)
            log = open(Path(cell["out"]).parent / (Path(cell["out"]).name + ".log"), "w")
            proc = subprocess.Popen([sys.executable, "-m", module, "--cell", json.dumps(cell)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, cell))
        time.sleep(1.0)
        for proc, cell in list(running):
            if proc.poll() is not None:
                running.remove((proc, cell))
                status = "done" if proc.returncode == 0 else f"FAILED (rc {proc.returncode}, see its .log)"
                print(f"{Path(cell['out']).name}: {status}", flush=True)


def add_output_arguments(p: argparse.ArgumentParser, workdir_help: str) -> None:
    """--workdir, --docs, --no-docs and --no-run: where a study's cells live and where its table goes."""
    p.add_argument("--workdir", help=workdir_help)
    p.add_argument("--docs", default=None, help="benchmarks.md to write (default docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true", help="print the table only")
    p.add_argument("--no-run", action="store_true", help="tabulate the cells already in --workdir, run none")


def load_reports(cells: list[dict]) -> list[dict]:
    reports = []
    for c in cells:
        path = Path(c["out"]) / "report.json"
        if path.exists():
            reports.append({**json.loads(path.read_text()), "variant": c["variant"]})
    return reports


def _stat(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt.replace('+', ''))}"


def _at(report: dict, clicks: int) -> dict | None:
    return next((c for c in report["checkpoints"] if c["clicks"] == clicks), None)


def chooser_rows(reports: list[dict], clicks: int, eval_at=EVAL_AT) -> list[str]:
    """One row per (variant, chooser, mode): its own score's win rate and effect, mean ± sd over seeds."""
    rows = []
    keys = sorted({(r["variant"], r["oracle"], r["n"]) for r in reports if r["oracle"] != CONTROL})
    for variant, chooser, n in keys:
        group = [r for r in reports if (r["variant"], r["oracle"], r["n"]) == (variant, chooser, n)]
        cells = []
        for c in eval_at:
            if c > clicks:
                continue
            points = [p for p in (_at(r, c) for r in group) if p]
            cells.append(_stat([p["oracles"][chooser]["win_rate"] * 100 for p in points], ".0f") + "% / "
                         + _stat([p["oracles"][chooser]["effect_size"] for p in points], "+.2f"))
        last = [r["checkpoints"][-1] for r in group]
        fid = [p["fidelity_vs_base"] * 100 for p in last if p.get("fidelity_vs_base") is not None]
        fresh = [p["fresh_accuracy"] * 100 for p in last if p.get("fresh_accuracy") is not None]
        secs = [r["seconds_per_click"] for r in group]
        mode = "pairs" if n == 2 else f"best of {n}"
        rows.append(f"| {variant} | {chooser} | {mode} | {len(group)} | " + " | ".join(cells)
                    + f" | {_stat(fid, '.0f')}% | {_stat(fresh, '.0f') + '%' if fresh else '—'} | {_stat(secs, '.1f')} | {_devices(group)} |")
    return rows


def _devices(group: list[dict]) -> str:
    """Where the cells ran, e.g. "cuda float16" (numbers differ slightly between devices)."""
    return ", ".join(sorted({f"{r['runtime']['device'].split(':')[0]} {r['runtime']['dtype']}" for r in group}))


def control_rows(reports: list[dict]) -> list[str]:
    """Random clicks, scored by every chooser: the drift a setting causes without any preference."""
    rows = []
    for variant, n in sorted({(r["variant"], r["n"]) for r in reports if r["oracle"] == CONTROL}):
        group = [r for r in reports if (r["variant"], r["n"], r["oracle"]) == (variant, n, CONTROL)]
        last = [r["checkpoints"][-1] for r in group]
        # a chooser added after a cell ran was not scored there: "—" rather than a wrong number
        scored = {name: [p["oracles"][name] for p in last if name in p["oracles"]] for name in CHOOSERS}
        cells = [_stat([m["win_rate"] * 100 for m in scored[name]], ".0f") + "% / "
                 + _stat([m["effect_size"] for m in scored[name]], "+.2f") if scored[name] else "—"
                 for name in CHOOSERS]
        fid = [p["fidelity_vs_base"] * 100 for p in last if p.get("fidelity_vs_base") is not None]
        mode = "pairs" if n == 2 else f"best of {n}"
        rows.append(f"| {variant} | {mode} | {len(group)} | {last[0]['clicks']} | " + " | ".join(cells)
                    + f" | {_stat(fid, '.0f')}% | {_devices(group)} |")
    return rows


def markdown(reports: list[dict], variants: dict, command: str, clicks: int, eval_pairs: int, minutes: float,
             ran: bool = True) -> str:
    when = (f"{minutes:.0f} min for the cells run this time" if ran else
            "tabulated with --no-run from the cells that earlier runs of this benchmark, same settings, left in --workdir")
    lines = [
        "## Learning: simulated choosers on the embedded model",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {when}; "
        "2 shared CPU cores, one torch thread per cell; s/click depends on the machine's load during each cell). "
        "Each cell: a fresh session, "
        f"{clicks} clicks of prompts drawn from the embedded world, {eval_pairs} held-out (prompt, seed) pairs "
        "rendered by base and tuned model with the same noise. **win** = tuned beats base by more than "
        "0.25 σ_base of the chooser's score; **effect** = mean change / σ_base; **fidelity** = colour-and-kind "
        "correctness tuned ÷ base (core/embedded/checker.py); **fresh acc.** = share of (step, pair) log-ratio "
        "comparisons that already ranked the chooser's winner first on each new batch, before its update "
        "(mean over the clicks since the previous evaluation; 50% = no generalisation). Mean ± sd over seeds.",
        "",
        "Variants (settings on top of the defaults of `core/config.py`, plus no gradient checkpointing, "
        "which changes no number): " + "; ".join(f"**{k}**: {', '.join(f'{a}={format_value(b)}' for a, b in v.items()) or 'the defaults'}"
                                                 for k, v in variants.items()) + ".",
        "",
        *tables(reports, clicks, EVAL_AT, "Control: random clicks, scored by each chooser at the last evaluation "
                "(win / effect):"),
    ]
    return "\n".join(lines)


def tables(reports: list[dict], clicks: int, eval_at, control_caption: str, unit: str = "click") -> list[str]:
    """The chooser table and the random control's table (markdown lines)."""
    shown = [c for c in eval_at if c <= clicks]
    return [
        "| variant | chooser | mode | seeds | " + " | ".join(f"win / effect @{c}" for c in shown)
        + f" | fidelity | fresh acc. | s/{unit} | device |",
        "|---|---|---|---|" + "---|" * len(shown) + "---|---|---|---|",
        *chooser_rows(reports, clicks, eval_at),
        "",
        control_caption,
        "",
        f"| variant | mode | seeds | {unit}s | " + " | ".join(CHOOSERS) + " | fidelity | device |",
        "|---|---|---|---|" + "---|" * len(CHOOSERS) + "---|---|",
        *control_rows(reports),
    ]


def plan(args) -> tuple[list[dict], dict]:
    variants = {"default": {}}
    for spec in args.variant or []:
        name, *pairs = spec
        variants[name] = {k: parse_value(v) for k, v in (p.split("=", 1) for p in pairs)}
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only}
    cells = []
    # seeds outermost: a study stopped early still has every cell's first seeds (--by variant:
    # variants outermost, in the order given, so that one stopped early has whole variants)
    grid = itertools.product(args.seeds, variants.items(), args.choosers, args.modes)
    if args.by == "variant":
        grid = ((seed, v, chooser, n) for v, seed, chooser, n in
                itertools.product(variants.items(), args.seeds, args.choosers, args.modes))
    for seed, (name, settings), chooser, n in grid:
        out = Path(args.workdir) / cell_name(name, chooser, n, seed)
        cells.append({"variant": name, "settings": settings, "chooser": chooser, "n": n, "seed": seed,
                      "clicks": args.clicks, "eval_pairs": args.eval_pairs, "out": str(out)})
    return cells, variants


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="brighter and random, pairs, 25 clicks, 2 seeds, 24 pairs")
    p.add_argument("--clicks", type=int, default=50)
    p.add_argument("--modes", type=int, nargs="+", default=[2, 4], help="images per click")
    p.add_argument("--choosers", nargs="+", default=[*CHOOSERS, CONTROL])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-pairs", type=int, default=48)
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                   help="a settings variant to run beside the defaults (repeatable)")
    p.add_argument("--only", nargs="+", help="run only these variants (e.g. default)")
    p.add_argument("--jobs", type=int, default=2, help="cells at once (one torch thread each)")
    p.add_argument("--by", choices=("seed", "variant"), default="seed", help="outermost loop of the plan")
    p.add_argument("--deadline", type=float, help="start no cell after this many seconds")
    p.add_argument("--stop", type=float, help="kill the cells still running after this many seconds")
    add_output_arguments(p, "keep the cells here; existing reports are reused (default: a temp folder)")
    args = p.parse_args(argv)
    if args.cell:
        run_cell(json.loads(args.cell))
        return
    if args.quick:
        args.clicks, args.modes, args.choosers, args.seeds, args.eval_pairs = 25, [2], ["brighter", CONTROL], [0, 1], 24
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="d3po-learning-")
    cells, variants = plan(args)
    start = time.perf_counter()
    if not args.no_run:
        run_cells(cells, args.jobs, args.deadline, args.stop)
    reports = load_reports(cells)
    command = "python -m d3po_studio.bench.learning " + " ".join(a for a in (argv or sys.argv[1:]))
    text = markdown(reports, variants, command.strip(), args.clicks, args.eval_pairs, (time.perf_counter() - start) / 60,
                    ran=not args.no_run)
    if not args.no_docs:
        write_section("learning", text, **({"path": args.docs} if args.docs else {}))
    print(text)


if __name__ == "__main__":
    main()
