"""Host-side answer verification: extraction, equivalence, a batched worker pool."""

from mar.verify.batch import BatchVerifier
from mar.verify.batch import is_equivalent
from mar.verify.equivalence import DEFAULT_TIMEOUT
from mar.verify.equivalence import answers_match
from mar.verify.equivalence import prediction_answer
from mar.verify.equivalence import quick_match
from mar.verify.extract import extract_answer
from mar.verify.extract import extract_boxed
from mar.verify.extract import has_closed_box

__all__ = [
    "BatchVerifier",
    "DEFAULT_TIMEOUT",
    "answers_match",
    "extract_answer",
    "extract_boxed",
    "has_closed_box",
    "is_equivalent",
    "prediction_answer",
    "quick_match",
]
