"""The library behind ``saft-merge``: a ``MergeJob`` in, a merged model folder (and Hub repo) out."""

from .evaluation import CachedBatches, TaskEvaluator, resolve_device
from .inputs import infer_base, recorded_accuracy, recorded_validation_accuracy
from .job import MergeJob, MergeJobError, MergeUsageError
from .run import MergeOutcome, run_merge_job

__all__ = [
    "CachedBatches",
    "MergeJob",
    "MergeJobError",
    "MergeOutcome",
    "MergeUsageError",
    "TaskEvaluator",
    "infer_base",
    "recorded_accuracy",
    "recorded_validation_accuracy",
    "resolve_device",
    "run_merge_job",
]
