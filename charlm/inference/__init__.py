"""Using a language model: sampling, held-out evaluation, dynamic evaluation, the interactive mode and the local server."""
