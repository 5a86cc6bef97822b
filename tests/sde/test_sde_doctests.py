"""The docstring examples of trajlab.sde run."""

from __future__ import annotations

import doctest

import pytest

import trajlab.sde.integral
import trajlab.sde.layer


@pytest.mark.parametrize("module", [trajlab.sde.layer, trajlab.sde.integral])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
