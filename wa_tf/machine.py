"""What machine this is: the CPU's model and instruction sets.

Timings from different machines are only comparable when the machine is
known, so benchmarks, latency tables and sweep results record it.  Reads
``/proc/cpuinfo`` (Linux; platform's guess elsewhere) without loading
TensorFlow.
"""

import platform
from typing import List, Optional, Set, Tuple

# ISA extensions that decide which CPU kernels (oneDNN, Eigen, XLA) can run.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def _read_cpuinfo() -> Tuple[Optional[str], Set[str]]:
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86 / Arm
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags


def cpu_info() -> Tuple[str, List[str]]:
    """(model name, the ISA extensions of :data:`ISA_FLAGS` the CPU has)."""
    model, flags = _read_cpuinfo()
    isa = [f for f in ISA_FLAGS if f in flags]
    return model or platform.processor() or platform.machine(), isa


def cpu_flags() -> List[str]:
    """Every feature flag the CPU reports, sorted (empty where /proc/cpuinfo is absent).

    Code compiled with ``-march=native`` may use any of them.
    """
    return sorted(_read_cpuinfo()[1])


def cpu_model() -> str:
    """The CPU's model name."""
    return cpu_info()[0]
