"""ComfyUI-Manager runs this after `pip install -r requirements.txt`.

Adds the optional CUDA extras (xformers: memory-efficient attention) only where this Python's
torch is a CUDA build with a GPU visible; otherwise says that it skips them. Never installs,
upgrades or downgrades torch.

    python install.py            # what the Manager runs
    python install.py --dry-run  # print the decision and the pip command, install nothing
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

CUDA_EXTRAS = ["xformers"]


def cuda_torch() -> str | None:
    """The CUDA version of the installed torch when it can use a GPU, else None."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch
    if not torch.version.cuda or not torch.cuda.is_available():
        return None
    return torch.version.cuda


def pip_command(extras: list[str]) -> list[str]:
    # The constraint keeps pip from replacing ComfyUI's torch to satisfy xformers' pin.
    import torch
    return [sys.executable, "-m", "pip", "install", *extras, f"torch=={torch.__version__}"]


def main(argv: list[str]) -> int:
    cuda = cuda_torch()
    if cuda is None:
        print("[D3PO Studio] no CUDA torch with a visible GPU: skipping the optional CUDA extras "
              f"({', '.join(CUDA_EXTRAS)}); torch SDPA attention is used instead.")
        return 0
    missing = [name for name in CUDA_EXTRAS if importlib.util.find_spec(name) is None]
    if not missing:
        print(f"[D3PO Studio] CUDA {cuda}: optional extras already installed ({', '.join(CUDA_EXTRAS)}).")
        return 0
    cmd = pip_command(missing)
    print(f"[D3PO Studio] CUDA {cuda}: installing optional extras: {' '.join(cmd[3:])}")
    if "--dry-run" in argv:
        return 0
    result = subprocess.run(cmd)
    if result.returncode != 0:
        print("[D3PO Studio] the optional extras did not install; D3PO Studio works without them "
              "(torch SDPA attention).")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
