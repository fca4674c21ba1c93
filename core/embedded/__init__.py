"""The small text-to-image model that ships with D3PO Studio (see docs/embedded.md)."""
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
