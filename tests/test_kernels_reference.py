"""Every fast path of the fused kernels against the pure-TF pipeline, per thread count and ISA.

Each run is tests/kernel_reference.py in a fresh interpreter (TensorFlow fixes
its thread pools when it starts); that file lists the cases and derives the
tolerances.  The weight gradient splits its work by the thread count (1, 2 and
4 threads take different code paths), and an AVX-512 CPU runs the kernels'
AVX-512 code with ``-march=native`` and their AVX2 code with
``WA_TF_KERNELS_MARCH=x86-64-v3``.
"""
import os
import subprocess
import sys

import pytest

from wa_tf import kernels
from wa_tf.machine import cpu_flags

HERE = os.path.dirname(os.path.abspath(__file__))

# The targets whose code differs on this CPU: AVX2 code is a second path only where
# native code is AVX-512 (a second build, a few minutes: slow elsewhere).
TARGETS = ["native"] + (["x86-64-v3"] if "avx512f" in cpu_flags() else [
    pytest.param("x86-64-v3", marks=pytest.mark.slow)])

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"fused kernels unavailable: {kernels.unavailable_reason()}")


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("march", TARGETS)
def test_fast_paths_match_the_pure_tf_pipeline(threads, march):
    if march != "native" and not {"avx2", "fma"} <= set(cpu_flags()):
        pytest.skip("an x86-64-v3 (AVX2 + FMA) build needs such a CPU to run")
    env = dict(os.environ, WA_TF_KERNELS_MARCH=march)
    result = subprocess.run([sys.executable, os.path.join(HERE, "kernel_reference.py"),
                             str(threads)], env=env, capture_output=True, text=True,
                            check=False, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert f"28 passed, 0 failed at {threads} threads" in result.stdout
