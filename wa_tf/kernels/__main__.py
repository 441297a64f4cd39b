"""Builds the fused kernels for this machine: ``python -m wa_tf.kernels``.

Prints the library's path, or why it cannot be built (exit status 1); the
pipeline then runs in pure TensorFlow.  ``WA_TF_KERNELS_MARCH=x86-64-v3`` (any
``-march`` value) builds for another CPU target than this one (``native``).
"""
import sys

from wa_tf import kernels


def main():
    try:
        path = kernels.build(verbose="-v" in sys.argv[1:])
    except (RuntimeError, ValueError) as e:
        print(f"wa_tf.kernels: cannot build the fused kernels: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
