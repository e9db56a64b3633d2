"""Checkpoint files: the safetensors format, atomic writes, run directories, and the metadata schema that each model kind registers its section with."""
