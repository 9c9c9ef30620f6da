"""Evaluation harness: dataset readers, benchmark class files, confusion matrix and mIoU."""

from .datasets import DATASETS, Dataset, DatasetError, DatasetSpec, folder_spec
from .metrics import IGNORE_INDEX, ConfusionMatrix
from .runner import evaluate, to_markdown, write_report
from .vocabularies import EvalVocabulary, load_vocabulary, resolve_vocabulary

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "ConfusionMatrix",
    "Dataset",
    "DatasetError",
    "DatasetSpec",
    "EvalVocabulary",
    "evaluate",
    "folder_spec",
    "load_vocabulary",
    "resolve_vocabulary",
    "to_markdown",
    "write_report",
]
