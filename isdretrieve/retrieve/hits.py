"""What retrieval returns: a bank row, and the one hit record (a bank row found by a search)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BankRow:
    """One bank row: its row number, dataset index, label (−1 unknown) and path (or source index)."""

    row: int
    index: int
    label: int
    path: str


@dataclass(frozen=True)
class Hit(BankRow):
    """A bank row found by a search: its cosine ``score`` and whether its label differs from the query's
    (``label_differs``: None where either label is unknown, always for uploaded images and vectors)."""

    score: float
    label_differs: bool | None = None


def label_differs(query_label: int, label: int) -> bool | None:
    """Whether two labels differ, or None when either is unknown (negative)."""
    return None if query_label < 0 or label < 0 else query_label != label


def class_name(label: int, classes: Sequence[str]) -> str:
    """The name of ``label`` ("unlabelled" for −1; the number itself where ``classes`` names none)."""
    if label < 0:
        return "unlabelled"
    return classes[label] if label < len(classes) else str(label)
