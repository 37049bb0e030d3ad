"""The allocator setting of :mod:`panacea.allocator`."""

from __future__ import annotations

import ctypes.util
import sys

import numpy as np
import pytest

from panacea.allocator import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c")
                    is None, reason="glibc only")
def test_glibc_takes_the_setting_and_large_arrays_still_work():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # idempotent
    a = np.ones((2064, 2064))  # above the default mmap threshold
    del a
    b = np.zeros((2064, 2064))
    assert not b.any()  # reused heap memory is still handed out zeroed by calloc
