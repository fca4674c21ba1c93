"""Write one named section of docs/benchmarks.md, leaving every other section alone.

A section is the text between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``.
Benchmarks each own their sections, so they can be regenerated independently.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n"


def markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section name {name!r}: use letters, digits, '_', '-' or '.'")
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def write_section(name: str, markdown: str, path=DEFAULT_PATH) -> Path:
    """Replace the block ``name`` of ``path`` with ``markdown`` (appending the block, or creating
    the file, if missing). The file is replaced atomically."""
    path = Path(path)
    start, end = markers(name)
    text = path.read_text(encoding="utf-8") if path.exists() else HEADER
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if len(pattern.findall(text)) > 1:
        raise ValueError(f"{path} has section {name!r} more than once: delete the extra copy")
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def read_section(name: str, path=DEFAULT_PATH) -> str | None:
    """The markdown of section ``name``, or None if the file or the section is missing."""
    path = Path(path)
    if not path.exists():
        return None
    start, end = markers(name)
    m = re.search(re.escape(start) + r"\n?(.*?)\n?" + re.escape(end), path.read_text(encoding="utf-8"), re.DOTALL)
    return m.group(1) if m else None


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def machine() -> str:
    """One line describing this machine (CPU model, cores, RAM, torch)."""
    import platform

    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        mem = 0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {mem / 2**30:.0f} GiB RAM, {gpu}, torch {torch.__version__}"
