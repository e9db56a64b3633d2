"""Text in, tokens out: reading text, the vocabulary, token files, the corpus with its held-out split and training batches, and the corpus catalog."""
