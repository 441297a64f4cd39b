"""Bad attributes and shapes give the fused-kernel ops an error, never an abort.

tests/kernel_fuzz.py calls every op with extreme attributes (negative,
zero, 2^31 - 1 sizes; NaN and out-of-range code limits) and shapes, eagerly
and while tracing (shape functions), in a process of its own: an abort ends
that process, and the case it was running is named.
"""
import os
import subprocess
import sys

import pytest

from wa_tf import kernels

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.skipif(not kernels.available(),
                    reason=f"fused kernels unavailable: {kernels.unavailable_reason()}")
@pytest.mark.parametrize("seed", [1, 2])
def test_bad_attributes_and_shapes_raise_instead_of_aborting(seed):
    cases = 300
    result = subprocess.run([sys.executable, os.path.join(HERE, "kernel_fuzz.py"), str(seed),
                             str(cases)], capture_output=True, text=True, check=False,
                            timeout=600)
    ran = [line for line in result.stdout.splitlines() if line.startswith("case ")]
    assert result.returncode == 0, (f"exit {result.returncode} in {ran[-1] if ran else 'start-up'}"
                                    f"\n{result.stderr[-3000:]}")
    last = result.stdout.splitlines()[-1]
    assert last.startswith(f"all {2 * cases} cases ran")
    computed, refused = [int(word) for word in last.split() if word.isdigit()][-2:]
    assert computed > 0 and refused > 0  # both kinds of case are reached
