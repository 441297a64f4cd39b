"""Evaluation: accuracy of a run or a SavedModel, and the Winograd error report.

:mod:`.evaluate` measures a checkpoint's or an exported SavedModel's accuracy on
a split; :mod:`.error_report` measures, layer by layer, how far each quantized
Winograd stage moves the output from the float convolution.  This module
re-exports their public names except the functions named like their module
(``evaluate.evaluate``, ``error_report.error_report``): ``from wa_tf.evaluation
import evaluate, error_report`` gives the modules.
"""

from wa_tf.evaluation.error_report import (
    format_report,
    plot_report,
    report_dict,
    winograd_layers,
    write_report,
)
from wa_tf.evaluation.evaluate import (
    SPLITS,
    evaluate_checkpoint,
    evaluate_savedmodel,
    split_dataset,
    take_images,
)

__all__ = [
    "SPLITS",
    "evaluate_checkpoint",
    "evaluate_savedmodel",
    "format_report",
    "plot_report",
    "report_dict",
    "split_dataset",
    "take_images",
    "winograd_layers",
    "write_report",
]
