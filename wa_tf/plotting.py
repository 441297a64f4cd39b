"""Matplotlib for the PNG figures the binaries write (sweeps, searches, error reports).

matplotlib is optional (``pip install wa_tf[plot]``) and slow to import, so it
is imported here, on first use, with the Agg backend (no display needed).
"""


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend.

    Raises:
      ImportError: matplotlib is not installed.
    """
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    return plt
