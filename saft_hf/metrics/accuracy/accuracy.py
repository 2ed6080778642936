"""Accuracy as an ``evaluate`` metric module shipped with saft-hf, so it loads offline.

Load with ``saft_hf.metrics.load_accuracy()`` (``evaluate.load`` on this folder); the Hub's
``evaluate.load("accuracy")`` needs network access.
"""

import datasets
import evaluate

_DESCRIPTION = "Fraction of predictions equal to the references: (TP + TN) / N for classification."
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    normalize (bool): return the fraction (True, default) or the count of correct predictions.
Returns:
    accuracy (float): fraction (or count) correct.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Top-1 accuracy over integer class ids."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True):  # noqa: ANN001, ANN202 - evaluate's signature
        if len(predictions) == 0:
            raise ValueError("accuracy of zero predictions is undefined; evaluate at least one example.")
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(predictions) if normalize else float(correct)}
