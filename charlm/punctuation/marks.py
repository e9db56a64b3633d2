"""Punctuation as labels: punctuated text made into a tagger's training data, and back.

A mark is any character that Unicode calls punctuation (general category P…): ，。、！？“”《》
and .,;:!?'"()- alike. Whitespace and newlines are not marks: they stay in the text as
ordinary characters. Stripping the marks leaves the text a tagger reads; the label of each
character left names the marks that followed it in the punctuated text.

Runs of marks. Marks that follow one another with no character between them ("。”" where a
quoted sentence ends, "：“" where one begins) are one run, and a run is one label, the whole run
as a string. A character has at most one run after it, so one label per character is exact.
The label set (`MarkSet.from_text`) is the most frequent runs of a corpus, at most `max_labels`
of them; a rarer run is labelled as its longest prefix in the set ("！”）" as "！”" or "！"), and
as no mark (label 0) where no prefix is, so a text round-trips exactly only when all its runs
are in the set.

Opening marks. A mark that opens something (“ 《 「 ‘ and the like) stands before the character
it belongs with, so it is in the run after the character before it: in 曰：“天下 the run "：“"
follows 曰, and a 《 that starts a line follows the newline before it. That is how a tagger
restores opening marks: after the previous character, where its right context (which a
bidirectional tagger sees) says that a quotation or a title begins. Marks before the first
character of a text follow no character, and are dropped.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from charlm.errors import CharlmError

# Enough for every run a Chinese or English corpus uses often: 三国演义's commonest runs are
# ，。：“”！？、；and their pairs such as "。”" and "：“".
DEFAULT_MAX_LABELS = 32


def is_mark(char: str) -> bool:
    """Whether `char` is Unicode punctuation (general category P…)."""
    return unicodedata.category(char).startswith("P")


def _runs_after_characters(text: str) -> tuple[list[str], list[str]]:
    """`text` cut into pieces without marks and the runs of marks between them, so that
    pieces[0] + runs[0] + pieces[1] + … + pieces[-1] is the text (less any marks before its
    first character) and runs[k] follows the last character of pieces[k]."""
    marks = sorted(char for char in set(text) if is_mark(char))
    if not marks:
        return [text], []
    parts = re.split("([" + "".join(re.escape(mark) for mark in marks) + "]+)", text)
    pieces, runs = parts[0::2], parts[1::2]
    if not pieces[0]:
        # The text starts with marks, which follow no character.
        pieces, runs = pieces[1:], runs[1:]
    return pieces, runs


@dataclass(frozen=True)
class MarkSet:
    """The labels of a punctuation tagger: label k ≥ 1 is the run of marks
    `label_strings[k - 1]`, label 0 is no mark."""

    label_strings: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.label_strings:
            raise ValueError("a MarkSet needs at least one run of marks")
        for run in self.label_strings:
            if not isinstance(run, str) or not run or not all(map(is_mark, run)):
                raise ValueError(f"{run!r} is not a run of punctuation marks")
        if len(set(self.label_strings)) != len(self.label_strings):
            raise ValueError(f"runs of marks repeat in {self.label_strings!r}")

    @classmethod
    def from_text(
        cls, text: str, max_labels: int = DEFAULT_MAX_LABELS, source: str = "the text"
    ) -> MarkSet:
        """The `max_labels` runs of marks most frequent in `text`, the most frequent first (ties
        in code-point order). `source` names the text in the error raised when it has no marks."""
        if max_labels < 1:
            raise ValueError(f"max_labels must be positive, got {max_labels}")
        counts = Counter(_runs_after_characters(text)[1])
        if not counts:
            raise CharlmError(
                f"{source} has no punctuation marks: nothing to learn from; "
                "train the tagger on punctuated text"
            )
        ranked = sorted(counts, key=lambda run: (-counts[run], run))
        return cls(tuple(ranked[:max_labels]))

    @property
    def num_labels(self) -> int:
        """The number of labels, no mark included: the tagger's number of classes."""
        return len(self.label_strings) + 1

    def label_of(self, run: str) -> int:
        """The label of a run of marks: its own, else that of its longest prefix in the set,
        else 0."""
        for end in range(len(run), 0, -1):
            if run[:end] in self.label_strings:
                return self.label_strings.index(run[:end]) + 1
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"label_strings": list(self.label_strings)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MarkSet:
        return cls(tuple(data["label_strings"]))


def strip_and_label(text: str, marks: MarkSet) -> tuple[str, np.ndarray]:
    """`text` without its marks, and one int32 label per character left: that of the run of
    marks that followed it (`MarkSet.label_of`), 0 where none did."""
    pieces, runs = _runs_after_characters(text)
    stripped = "".join(pieces)
    labels = np.zeros(len(stripped), np.int32)
    # The index of the character that each run follows.
    ends = np.cumsum([len(piece) for piece in pieces[:-1]], dtype=np.int64) - 1
    label_of = {run: marks.label_of(run) for run in set(runs)}
    labels[ends] = [label_of[run] for run in runs]
    return stripped, labels


def runs_after(text: str) -> tuple[str, str, list[str]]:
    """The marks before `text`'s first character, `text` without marks, and the run of marks
    that follows each of its characters ("" where none does): what `charlm punctuate --keep`
    keeps."""
    body = text.lstrip("".join(char for char in set(text) if is_mark(char)))
    pieces, runs = _runs_after_characters(body)
    after: list[str] = []
    for piece, run in zip(pieces, [*runs, ""]):
        after += [""] * (len(piece) - 1) + [run] if piece else []
    return text[: len(text) - len(body)], "".join(pieces), after


def punctuate(text: str, labels: Sequence[int] | np.ndarray, label_strings: Sequence[str]) -> str:
    """`text` with, after each character, the run of marks that its label names (label k ≥ 1 is
    `label_strings[k - 1]`, 0 is none): the inverse of `strip_and_label`."""
    labels = np.asarray(labels)
    if labels.shape != (len(text),):
        raise ValueError(f"{labels.shape} labels for {len(text)} characters")
    if labels.size and not (labels.min() >= 0 and labels.max() <= len(label_strings)):
        raise ValueError(f"labels must be in [0, {len(label_strings)}]")
    after = ("", *label_strings)
    return "".join(char + after[label] for char, label in zip(text, labels.tolist()))
