"""The character-level language model: its recurrent cells and their gradient, the matmul, the loss, dropout, its configuration and its training step."""
