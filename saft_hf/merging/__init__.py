"""Merging task vectors: one function per method, registered by name, computed tensor by tensor."""

from . import adamerging, basic, dare, iso, pcb, ties, tsv  # noqa: F401  (importing registers the methods)
from .adamerging import AdaMergingResult, adamerging_coefficients
from .api import merge
from .registry import (
    METHODS,
    MergeError,
    MergeMethod,
    MethodParam,
    get_method,
    parse_method_args,
    register_method,
)
from .report import MergeReport, TaskResult
from .search import SearchResult, search_coefficients

__all__ = [
    "AdaMergingResult",
    "METHODS",
    "MergeError",
    "MergeMethod",
    "MergeReport",
    "MethodParam",
    "SearchResult",
    "TaskResult",
    "adamerging_coefficients",
    "get_method",
    "merge",
    "parse_method_args",
    "register_method",
    "search_coefficients",
]
