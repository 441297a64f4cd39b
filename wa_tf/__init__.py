"""wa_tf: Winograd-aware quantized CNNs for tf_keras and TF-MOT.

Importing wa_tf selects Keras 2 (``tf_keras``) for ``tf.keras`` and for
TF-MOT, so users need not export ``TF_USE_LEGACY_KERAS`` themselves.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from wa_tf import transforms  # noqa: E402
from wa_tf.layers import WinogradConv2D  # noqa: E402

__version__ = "0.1.0"
__all__ = ["transforms", "WinogradConv2D"]
