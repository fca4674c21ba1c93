"""How far do a session's clicks agree beyond chance? ``step_evidence``'s statistics, per cell.

    python -m d3po_studio.bench.agreement --workdir runs/b11 --variants default z05 x0

Each click of a ``bench/learning.py`` cell records in its round.json (core/update.py) the clicks'
agreement P = |Σu|²/k (u: the unit click gradients, k of them; random clicks give 1 on average)
and the spread the same k gradients would give with their winners picked at random, sd = √V/k
(V = 2·Σ_{i≠j}(u_i·u_j)², core/trust_region.py:null_sd). From them: z = (P − 1)/sd, how many null
standard deviations the clicks' agreement stands above chance, and D = 2/sd², the number of
independent directions the click gradients behave as if they had (the null of |Σu|²/k is then a
χ²_D/D). Mean ± sd over a group's seeds at 10, 25 and 50 clicks.

**pull**: whether a move of the model turns the next clicks against the direction it moved along.
From the newest checkpoint's sketches of the unit gradients (core/trust_region.py:count_sketch),
each click's u_n · S/|S| (S: the sum of the clicks before it), averaged over the clicks that came
within PULL_AFTER clicks of a step (step_scale > 0) and over the others. Clicks whose winners are
independent of the model's moves would give 0 on average either way; the D3PO loss's own pull
toward the reference (docs/algorithm.md, "What β does once steps are evidence-sized") makes it
negative after a step. Writes the "learning_agreement" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.errors import SessionError
from ..core.storage import SessionFolder
from .learning import _stat
from .report import table, write_section

AT = (10, 25, 50)
PULL_AFTER = 3      # clicks after a step that count as "after a step"


def round_reports(cell: Path) -> list[dict]:
    """The report of each of the cell's rounds, in click order ({} for a round without one)."""
    rounds = sorted((cell / "session" / "rounds").glob("*/round.json"))
    return [json.loads(path.read_text()).get("report") or {} for path in rounds]


def cell_statistics(cell: Path, reports: list[dict] | None = None) -> dict[int, dict[str, float]]:
    """``{click: {"power", "null_sd"}}`` from the cell's round reports (clicks that recorded them);
    ``reports``: its ``round_reports``, if already read."""
    found = {}
    for click, report in enumerate(reports if reports is not None else round_reports(cell), start=1):
        if "evidence_power" in report and "evidence_null_sd" in report:
            found[click] = {"power": report["evidence_power"], "null_sd": report["evidence_null_sd"]}
    return found


def cell_pull(cell: Path, after: int = PULL_AFTER,
              reports: list[dict] | None = None) -> tuple[list[float], list[float]] | None:
    """(u_n·Ŝ for the clicks within ``after`` clicks of a step, the same for the others), from the
    newest checkpoint's sketches; None if the cell kept none or its clicks and sketches differ.
    ``reports``: its ``round_reports``, if already read."""
    folder = SessionFolder(cell / "session")
    try:
        head = folder.head()
        evidence = folder.read_evidence(head) if head is not None else None
    except SessionError:
        return None
    if evidence is None or "sketches" not in evidence:
        return None
    sketches = evidence["sketches"].float()
    reports = reports if reports is not None else round_reports(cell)
    steps = [r.get("step_scale", 0.0) or 0.0 for r in reports if "evidence_power" in r]
    if len(steps) != len(sketches):
        return None
    near, far = [], []
    total = sketches[0].clone()
    for n in range(1, len(sketches)):
        norm = float(total.norm())
        if norm > 0:
            (near if any(x > 0 for x in steps[max(0, n - after):n]) else far).append(float(sketches[n] @ total) / norm)
        total += sketches[n]
    return near, far


def z_score(power: float, null_sd: float) -> float:
    return (power - 1.0) / null_sd if null_sd > 0 else 0.0


def directions(null_sd: float) -> float:
    return 2.0 / null_sd ** 2 if null_sd > 0 else float("inf")


def rows(workdir: Path, variants: list[str], at=AT) -> list[list[str]]:
    """One row per (variant, chooser, images per click) with cells in ``workdir``, at clicks ``at``."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    pulls: dict[tuple[str, str, str], list[tuple[list[float], list[float]]]] = {}
    for cell in sorted(p for p in workdir.iterdir() if p.is_dir() and p.name.count("__") == 3):
        variant, chooser, n, _seed = cell.name.split("__")
        if variant in variants:
            reports = round_reports(cell)
            stats = cell_statistics(cell, reports)
            if stats:
                groups.setdefault((variant, chooser, n), []).append(stats)
                pull = cell_pull(cell, reports=reports)
                if pull is not None:
                    pulls.setdefault((variant, chooser, n), []).append(pull)
    out = []
    for (variant, chooser, n), cells in sorted(groups.items(), key=lambda kv: (variants.index(kv[0][0]), kv[0][1:])):
        row = [variant, chooser, "pairs" if n == "n2" else f"best of {n[1:]}", str(len(cells))]
        for click in at:
            here = [c[click] for c in cells if click in c]
            row.append(f"{_stat([h['power'] for h in here], '.2f')} / {_stat([h['null_sd'] for h in here], '.2f')}"
                       f" / {_stat([z_score(h['power'], h['null_sd']) for h in here], '+.1f')}"
                       f" / {_stat([directions(h['null_sd']) for h in here], '.0f')}" if here else "—")
        found = pulls.get((variant, chooser, n), [])
        near = [v for p in found for v in p[0]]
        far = [v for p in found for v in p[1]]
        row.append(f"{_mean(near)} ({len(near)}) / {_mean(far)} ({len(far)})" if found else "—")
        out.append(row)
    return out


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):+.3f}" if values else "—"


def markdown(found: list[list[str]], command: str, at=AT) -> str:
    headers = (["variant", "chooser", "mode", "seeds"] + [f"P / sd / z / D @{click}" for click in at]
               + [f"pull: u·Ŝ within {PULL_AFTER} clicks of a step (clicks) / otherwise (clicks)"])
    return "\n".join([
        "## How far the clicks agree beyond chance", "",
        f"Command: `{command}`. From each click's round report (core/update.py): **P** = |Σu|²/k, the "
        "agreement of the k unit click gradients so far (1 on average for random clicks); **sd** = the "
        "spread of P had the same clicks' winners been picked at random (√V/k, V = 2·Σ_{i≠j}(u_i·u_j)²); "
        "**z** = (P − 1)/sd; **D** = 2/sd², the number of independent directions the click gradients "
        "behave as if they had. Mean ± sd over seeds. **pull**: each click's unit gradient projected on the "
        "sum of the ones before it (from the sketches of the cell's newest checkpoint; cells run on "
        "a lent GPU kept none), averaged over the clicks that came within "
        f"{PULL_AFTER} clicks of a step and over the others, all seeds together: clicks independent of the "
        "model's moves would give 0 on average either way, and the D3PO loss's pull toward the reference makes it negative after a step.", "",
        table(headers, found), ""])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a folder of bench/learning.py cells (their session folders)")
    p.add_argument("--variants", nargs="+", required=True, help="the variants to show, in this order")
    p.add_argument("--docs", help="markdown file to write the section into (default docs/benchmarks.md)")
    p.add_argument("--at", nargs="+", type=int, default=list(AT), help="the clicks to show (default 10 25 50)")
    p.add_argument("--note", action="append", default=[], help="a paragraph added under the table")
    a = p.parse_args(argv)
    found = rows(Path(a.workdir), a.variants, a.at)
    if not found:
        raise SystemExit(f"no cell of {a.variants} in {a.workdir} recorded the evidence statistics")
    command = f"python -m d3po_studio.bench.agreement --workdir {a.workdir} --variants {' '.join(a.variants)}"
    text = markdown(found, command, a.at) + "".join(f"\n{n}\n" for n in a.note)
    write_section("learning_agreement", text, **({"path": a.docs} if a.docs else {}))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
