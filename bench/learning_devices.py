"""Does the learning reproduce on another device? The same learning cells (variant, chooser, images
per click, seed) run on two devices, compared at their evaluations.

    python -m d3po_studio.bench.learning_devices --cells runs/gpu "H100, cuda float16" \\
        --cells runs/cpu "CPU, bfloat16"

Each ``--cells`` folder holds cells of ``bench/learning.py`` (a report.json, or the partial.json of
a cell stopped early); a cell is compared where both folders have it, at each evaluation both
reached. The chooser's own score is shown, and for random clicks brighter's and warmer's. Writes
the "learning_devices" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from .learning import CONTROL
from .report import table, write_section

RANDOM_SCORES = ("brighter", "warmer")


def load_cells(folder) -> dict[str, dict]:
    """``{cell name: {"oracle", "checkpoints" by clicks}}`` from report.json, else partial.json."""
    cells = {}
    for path in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        report = next((path / name for name in ("report.json", "partial.json") if (path / name).exists()), None)
        if report is not None:
            data = json.loads(report.read_text())
            cells[path.name] = {"oracle": data["oracle"], "checkpoints": {c["clicks"]: c for c in data["checkpoints"]}}
    return cells


def _view(checkpoint: dict, score: str) -> tuple[float, float, float]:
    """Win rate, effect and fidelity of one evaluation, by one chooser's score."""
    o = checkpoint["oracles"][score]
    return o["win_rate"], o["effect_size"], checkpoint["fidelity_vs_base"]


def compare(a: dict[str, dict], b: dict[str, dict]) -> list[dict]:
    """One row per (cell, score, evaluation both reached): the win rate, effect and fidelity on each."""
    rows = []
    for name in sorted(set(a) & set(b)):
        random = a[name]["oracle"] == CONTROL
        x, y = a[name]["checkpoints"], b[name]["checkpoints"]
        for clicks in sorted(set(x) & set(y)):
            for score in RANDOM_SCORES if random else (a[name]["oracle"],):
                rows.append({"cell": name, "score": score, "clicks": clicks, "random": random,
                             "a": _view(x[clicks], score), "b": _view(y[clicks], score)})
    return rows


def markdown(rows: list[dict], labels: tuple[str, str], command: str) -> str:
    def cell(v):
        return f"{v[0]:.0%} / {v[1]:+.2f} / {v[2]:.0%}"
    body = [[r["cell"], r["score"], r["clicks"], cell(r["a"]), cell(r["b"]), f"{r['a'][1] - r['b'][1]:+.2f}"] for r in rows]
    purposeful = [abs(r["a"][1] - r["b"][1]) for r in rows if not r["random"]]
    randoms = [abs(r["a"][1] - r["b"][1]) for r in rows if r["random"]]
    summary = [f"|Δ effect| between the devices: purposeful choosers mean {statistics.mean(purposeful):.2f} "
               f"(at most {max(purposeful):.2f}, {len(purposeful)} comparisons)" if purposeful else "",
               f"random clicks mean {statistics.mean(randoms):.2f} (at most {max(randoms):.2f}, {len(randoms)}): "
               "the random chooser hashes the pixels, so the devices' last-bit differences give other picks, "
               "and these rows compare two independent draws of random clicks, not one" if randoms else ""]
    return "\n".join([
        "## Learning on a GPU: the same cells on two devices\n",
        f"Command: `{command}`. Cells of `bench/learning.py` run with the same settings and seeds on both "
        f"devices; each row is one cell at one evaluation that both reached (win rate / effect / fidelity, "
        f"as in the learning table; for random clicks, scored by {' and '.join(RANDOM_SCORES)}).\n",
        table(["cell", "score", "clicks", labels[0], labels[1], "Δ effect"], body), "",
        "; ".join(s for s in summary if s) + ".\n"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", nargs=2, action="append", metavar=("FOLDER", "LABEL"), required=True,
                   help="a folder of cells and the device's name (give two)")
    p.add_argument("--docs", help="markdown file to write the section into (default docs/benchmarks.md)")
    p.add_argument("--note", action="append", default=[], help="a paragraph added under the table")
    a = p.parse_args(argv)
    if len(a.cells) != 2:
        raise SystemExit("give --cells twice: FOLDER LABEL for each device")
    (fa, la), (fb, lb) = a.cells
    rows = compare(load_cells(fa), load_cells(fb))
    if not rows:
        raise SystemExit(f"no cell of {fa} is also in {fb} with an evaluation both reached")
    command = "python -m d3po_studio.bench.learning_devices " + " ".join(
        f'--cells {f} "{l}"' for f, l in a.cells)
    text = markdown(rows, (la, lb), command) + "".join(f"\n{n}\n" for n in a.note)
    write_section("learning_devices", text, **({"path": a.docs} if a.docs else {}))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
