from __future__ import annotations

import pytest
import torch
from hypothesis import settings

# Every hypothesis test is derandomized under the "ci" profile, which the test command selects
# (pyproject addopts: --hypothesis-profile=ci); `--hypothesis-profile=explore` draws new
# examples for local bug hunting.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, max_examples=500)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
