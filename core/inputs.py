"""Numbers a user types (in the page or on the command line), checked before any work starts.

Each parser returns the clean value or raises ``ConfigError`` naming the field, the value and the
range to use, so "seed 2**64", "scale nan" or "0 images" become a message, never a traceback
from deep inside torch.

    >>> parse_seed("7")
    7
    >>> parse_seed(2**64)            # ConfigError: seed 18446744073709551616 is out of range ...
"""
from __future__ import annotations

import math

from .errors import ConfigError

SEED_MAX = 2**32 - 1          # seeds are 0..2**32-1: what numpy, torch and every UI accept


def parse_seed(value, what: str = "seed") -> int:
    """A seed: a whole number from 0 to ``SEED_MAX`` (``"5"``, ``5`` and ``5.0`` are all 5)."""
    number = _whole(value, what, f"use a whole number from 0 to {SEED_MAX}")
    if not 0 <= number <= SEED_MAX:
        raise ConfigError(f"{what} {value!r} is out of range: use a whole number from 0 to {SEED_MAX}")
    return number


def parse_count(value, what: str, low: int = 1, high: int | None = None) -> int:
    """A whole number of things (images, clicks, steps) in ``low..high``."""
    span = f"from {low} to {high}" if high is not None else f"of {low} or more"
    number = _whole(value, what, f"use a whole number {span}")
    if number < low or (high is not None and number > high):
        raise ConfigError(f"{what} {value!r} is out of range: use a whole number {span}")
    return number


def parse_finite(value, what: str, low: float | None = None, high: float | None = None) -> float:
    """A finite number (no nan, no inf) in ``low..high`` where given."""
    span = f"from {low} to {high}" if low is not None and high is not None else "that is finite"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r} is not a number: use a number {span}") from None
    if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high):
        raise ConfigError(f"{what} {value!r} is out of range: use a number {span}")
    return number


def _whole(value, what: str, fix: str) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{what} is empty: {fix}")
    if isinstance(value, bool):
        raise ConfigError(f"{what} {value!r} is not a number: {fix}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass                       # "1e3", "5.0": read as a float below
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r} is not a number: {fix}") from None
    if not math.isfinite(number) or number != int(number):
        raise ConfigError(f"{what} {value!r} is not a whole number: {fix}")
    return int(number)
