"""Punctuation as labels: stripping and labelling, runs of marks, opening marks, the label set,
and rebuilding the text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from charlm.errors import CharlmError
from charlm.punctuation.marks import MarkSet, is_mark, punctuate, strip_and_label

CHINESE = (
    "曹操曰：“天下英雄，唯使君与操耳！”玄德闻言，吃了一惊。\n《三国演义》第一回、第二回？是也。"
)
ENGLISH = 'He said, "Don\'t go." (Then he left!)\n'


def marked(stripped: str, labels: np.ndarray, marks: MarkSet) -> list[tuple[str, str]]:
    """The (character, run of marks after it) of every labelled character, in order."""
    return [(stripped[i], marks.label_strings[k - 1]) for i, k in enumerate(labels) if k]


def test_chinese_runs_and_opening_marks_round_trip():
    marks = MarkSet.from_text(CHINESE)
    # The most frequent runs first, ties in code-point order; "：“" and "！”" are runs of two.
    assert marks.label_strings == ("。", "，", "、", "《", "》", "！”", "：“", "？")
    assert marks.num_labels == 9
    stripped, labels = strip_and_label(CHINESE, marks)
    assert stripped == "曹操曰天下英雄唯使君与操耳玄德闻言吃了一惊\n三国演义第一回第二回是也"
    assert labels.dtype == np.int32 and labels.shape == (len(stripped),)
    # The opening “ is in the run after 曰, and the opening 《 follows the newline.
    assert marked(stripped, labels, marks) == [
        ("曰", "：“"),
        ("雄", "，"),
        ("耳", "！”"),
        ("言", "，"),
        ("惊", "。"),
        ("\n", "《"),
        ("义", "》"),
        ("回", "、"),
        ("回", "？"),
        ("也", "。"),
    ]
    assert punctuate(stripped, labels, marks.label_strings) == CHINESE


def test_english_round_trip_keeps_whitespace_as_characters():
    marks = MarkSet.from_text(ENGLISH)
    stripped, labels = strip_and_label(ENGLISH, marks)
    assert stripped == "He said Dont go Then he left\n"
    assert marked(stripped, labels, marks) == [
        ("d", ","),
        (" ", '"'),
        ("n", "'"),
        ("o", '."'),
        (" ", "("),
        ("t", "!)"),
    ]
    assert punctuate(stripped, labels, marks.label_strings) == ENGLISH


def test_whitespace_is_not_a_mark():
    assert all(is_mark(char) for char in "，。、！？“”《》「」‘’.,;:!?'\"()-…")
    assert not any(is_mark(char) for char in " \n\t\u3000a中1$+")


def test_marks_before_the_first_character_are_dropped():
    text = "“Hi,” she said."
    marks = MarkSet.from_text(text)
    stripped, labels = strip_and_label(text, marks)
    assert stripped == "Hi she said"
    assert marked(stripped, labels, marks) == [("i", ",”"), ("d", ".")]
    assert punctuate(stripped, labels, marks.label_strings) == text[1:]


def test_rare_runs_take_the_label_of_their_longest_prefix_in_the_set():
    text = "甲。乙。丙。丁！戊！己！”庚？辛"
    marks = MarkSet.from_text(text, max_labels=2)
    assert marks.label_strings == ("。", "！")
    stripped, labels = strip_and_label(text, marks)
    # "！”" is labelled "！"; "？", with no prefix in the set, is no mark.
    assert labels.tolist() == [1, 1, 1, 2, 2, 2, 0, 0]
    assert punctuate(stripped, labels, marks.label_strings) == "甲。乙。丙。丁！戊！己！庚辛"
    longer = MarkSet(("。", "。”"))
    assert longer.label_of("。”）") == 2
    assert longer.label_of("。") == 1
    assert longer.label_of("”") == 0


def test_text_without_marks_is_refused_in_one_line():
    with pytest.raises(CharlmError, match="has no punctuation marks: nothing to learn from") as e:
        MarkSet.from_text("没有标点的文字\nno marks here", source="plain.txt")
    assert str(e.value).startswith("plain.txt has no punctuation marks")
    assert "\n" not in str(e.value)
    with pytest.raises(CharlmError, match="no punctuation marks"):
        MarkSet.from_text("")


def test_mark_set_round_trips_through_json():
    marks = MarkSet.from_text(CHINESE)
    stored = json.loads(json.dumps(marks.to_dict(), ensure_ascii=False))
    assert MarkSet.from_dict(stored) == marks
    for bad in ([], ["a"], ["。", "。"], [""], [1]):
        with pytest.raises(ValueError):
            MarkSet.from_dict({"label_strings": bad})
    with pytest.raises(ValueError, match="max_labels"):
        MarkSet.from_text(CHINESE, max_labels=0)


def test_punctuate_checks_its_labels():
    with pytest.raises(ValueError, match="labels for 3 characters"):
        punctuate("abc", [0, 1], ["."])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\]"):
        punctuate("abc", [0, 2, 0], ["."])
    assert punctuate("abc", [0, 1, 0], ["."]) == "ab.c"
