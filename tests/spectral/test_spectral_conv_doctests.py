"""The docstring examples of the conv operator-norm modules run."""

from __future__ import annotations

import doctest

import pytest

import trajlab.spectral.conv


@pytest.mark.parametrize("module", [trajlab.spectral.conv])
def test_docstring_examples(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
