"""The C runtime builds wherever there is a C compiler.

Every test of the kernels skips when they are unavailable (a machine without a compiler falls
back to PyTorch), so a source that no longer compiles would turn most of the suite into skips
and still pass: this module has no such mark and fails instead, with the compiler's message.
"""
from __future__ import annotations

import os

import pytest

from homellm.engine import kernels
from homellm.engine.kernels import build


def test_the_kernels_build_where_there_is_a_compiler():
    if os.environ.get("HOMELLM_NO_KERNELS"):
        pytest.skip("HOMELLM_NO_KERNELS is set: the kernels are off on purpose")
    if build.compiler() is None:
        pytest.skip("no C compiler on this machine: the PyTorch fallback is what runs")
    assert kernels.available(), kernels.status()
