"""How well predicted punctuation matches the original: sentence breaks and each mark.

A position is a sentence break when any mark follows it, so the break scores ask only whether
the tagger put some mark where the text had one; the per-mark scores ask for the very run of
marks (label string), counting a "，" where the text has "。" as a miss of one and a false
alarm of the other. Precision, recall and F1 (their harmonic mean) are those of information
retrieval; a score with nothing to divide by is 0.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MarkScore:
    """Precision, recall and F1 of one kind of prediction; `support` is how many the text has,
    `predicted` how many the tagger made."""

    precision: float
    recall: float
    f1: float
    support: int
    predicted: int

    @classmethod
    def count(cls, gold: np.ndarray, predicted: np.ndarray) -> MarkScore:
        """The score of the boolean predictions `predicted` against the truth `gold`."""
        hits, support, made = int((gold & predicted).sum()), int(gold.sum()), int(predicted.sum())
        precision = hits / made if made else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return cls(precision, recall, f1, support, made)


def score_labels(
    gold: np.ndarray, predicted: np.ndarray, label_strings: Sequence[str]
) -> tuple[MarkScore, dict[str, MarkScore]]:
    """The break score and each label string's score of `predicted` labels against `gold`
    (label k ≥ 1 is `label_strings[k - 1]`, 0 is none)."""
    gold, predicted = np.asarray(gold), np.asarray(predicted)
    breaks = MarkScore.count(gold > 0, predicted > 0)
    marks = {
        run: MarkScore.count(gold == k, predicted == k)
        for k, run in enumerate(label_strings, start=1)
    }
    return breaks, marks


@dataclass(frozen=True)
class PunctuationScores:
    """The scores of a tagger on a text (`source`) of `characters` characters without marks;
    `unknown` counts those outside the tagger's vocabulary, which it reads as having no mark."""

    source: str
    characters: int
    breaks: MarkScore
    marks: dict[str, MarkScore]
    unknown: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "characters": self.characters,
            "breaks": asdict(self.breaks),
            "marks": {run: asdict(score) for run, score in self.marks.items()},
            "unknown_characters": sum(self.unknown.values()),
            "unknown": self.unknown,
        }

    def table(self) -> list[str]:
        """The scores as lines of a table: breaks first, then each mark, the most frequent
        first (marks the text lacks and the tagger never made are left out)."""
        lines = [
            f"text:        {self.source}",
            f"characters:  {self.characters:,}",
            f"{'':12}{'precision':>10}{'recall':>8}{'F1':>8}{'support':>10}{'predicted':>11}",
        ]
        rows = [
            ("breaks", self.breaks),
            *sorted(
                ((run, s) for run, s in self.marks.items() if s.support or s.predicted),
                key=lambda item: -item[1].support,
            ),
        ]
        for name, s in rows:
            # Full-width marks take two columns: pad by display width.
            width = sum(1 + (unicodedata.east_asian_width(c) in "WF") for c in name)
            lines.append(
                f"{name}{'':{max(12 - width, 1)}}{s.precision:>10.3f}{s.recall:>8.3f}"
                f"{s.f1:>8.3f}{s.support:>10,}{s.predicted:>11,}"
            )
        if self.unknown:
            lines.append(f"unknown chars: {sum(self.unknown.values()):,} (read as having no mark)")
        return lines
