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


def storage_options(text: str) -> dict:
    """fsspec options for URL stores: a JSON object, or ``@FILE`` holding one (keeps secrets
    off the command line), e.g. ``'{"anon": true}'`` or ``@s3.json``."""
    import json

    source = "the JSON"
    if text.startswith("@"):
        source = f"file {text[1:]!r}"
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {source}: {e.strerror or e}") from None
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{source} is not valid JSON ({e}); give an object such as "
            "'{\"key\": ..., \"secret\": ..., \"client_kwargs\": {\"endpoint_url\": ...}}' or "
            "@FILE") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{source} must hold a JSON object (fsspec options), "
                                         f"got {type(value).__name__}")
    return value


def add_storage_options(p: argparse.ArgumentParser) -> None:
    """The ``--storage-options`` argument of every command that opens stores."""
    p.add_argument("--storage-options", type=storage_options, default=None, metavar="JSON",
                   help="fsspec options for URL stores (s3://, gs://, ...): a JSON object or "
                   "@FILE holding one, e.g. @s3.json with key, secret and client_kwargs; "
                   "credentials can also come from the environment, as fsspec reads them")
