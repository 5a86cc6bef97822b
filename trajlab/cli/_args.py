"""Validated argument types: every number the CLI takes is checked where it is parsed."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def batch_size(text: str) -> int:
    """An integer >= 2 (the noise terms need two samples)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (the gradient-noise terms need two "
                                         f"samples), got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def step_range(text: str) -> tuple[int, int]:
    """``START:STOP`` (either may be empty; stop exclusive)."""
    lo, sep, hi = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"must be START:STOP (e.g. 100:500, :500, 100:), got "
                                         f"{text!r}")
    try:
        a = int(lo) if lo.strip() else -(2**62)
        b = int(hi) if hi.strip() else 2**62
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be START:STOP with integers, got "
                                         f"{text!r}") from None
    if b <= a:
        raise argparse.ArgumentTypeError(f"STOP must be larger than START, got {text!r}")
    return a, b
