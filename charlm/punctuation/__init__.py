"""The bidirectional punctuation tagger: marks as labels, the model, its training, tagging and scoring."""
