"""A punctuation tagger's part of a checkpoint's metadata document (`charlm.checkpoints.schema`):
its shape, its label set and its scores, and the values that upgrade its older documents."""

from __future__ import annotations

from typing import Any

from charlm.checkpoints import schema
from charlm.punctuation.config import TaggerTrainConfig
from charlm.punctuation.marks import MarkSet
from charlm.punctuation.model import TaggerConfig

TAGGER = "tagger"

# Version 4 added a tagger's dropout rates; the taggers of version 3 trained without dropout.
NO_TAGGER_DROPOUT = {"dropout": 0.0, "embed_dropout": 0.0, "weight_drop": 0.0}
V3_BEHAVIOUR: dict[str, dict[str, Any]] = {"tagger": NO_TAGGER_DROPOUT, "train": NO_TAGGER_DROPOUT}


def check_marks(meta: dict[str, Any], source: str) -> None:
    """A tagger's label set: runs of marks, one label each besides "no mark"."""
    runs = meta["marks"]["label_strings"]
    try:
        marks = MarkSet.from_dict(meta["marks"])
    except (TypeError, ValueError) as err:
        raise schema.field_error(
            source, "marks.label_strings", f"is not a label set: {err}"
        ) from None
    if marks.num_labels != meta["tagger"]["num_labels"]:
        raise schema.field_error(
            source,
            "marks.label_strings",
            f"has {len(runs)} runs of marks but tagger.num_labels is "
            f"{meta['tagger']['num_labels']} (one more, for no mark, is needed)",
        )


schema.register(
    schema.KindSchema(
        name=TAGGER,
        what="a punctuation tagger",
        train_command="charlm punctuate train FILE",
        use_command="charlm punctuate",
        last_run_file=".charlm-last-tagger",
        configs={"tagger": TaggerConfig, "train": TaggerTrainConfig},
        shape="tagger",
        sections={"marks": {"label_strings": list}},
        # A tagger's best checkpoint is its best at breaking sentences, not its lowest loss.
        scores={"val_break_f1": float | None, "best_val_break_f1": float | None},
        upgrades={3: V3_BEHAVIOUR},
        check=check_marks,
    )
)
