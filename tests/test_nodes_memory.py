"""The memory an update reports is its own, not the process's (issue 11, item 21): a CPU
process that once held 400 MB more than now must not report that old peak for a later block.

Linux only (the kernel's RSS high-water mark is reset through /proc/self/clear_refs)."""
import sys

import numpy as np
import pytest
import torch

from d3po_studio.core.runtime import current_memory_bytes, measure_memory

MB = 1 << 20
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resets the peak through /proc")


def test_the_peak_of_a_block_leaves_out_what_ran_before_it():
    cpu = torch.device("cpu")
    earlier = np.ones(400 * MB // 8)            # touched pages: the process peak rises by ~400 MB
    del earlier
    before = current_memory_bytes(cpu)
    with measure_memory(cpu) as memory:
        block = np.ones(100 * MB // 8)          # the block's own ~100 MB
        del block
    got = memory()
    assert 80 * MB <= got["added_memory_bytes"] <= 200 * MB, got
    assert got["peak_memory_bytes"] < before + 250 * MB, "the earlier 400 MB leaked into the block's peak"
    assert got["peak_memory_bytes"] >= before + got["added_memory_bytes"] - 50 * MB
