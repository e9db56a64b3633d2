"""The run skeleton that every model kind trains through: run directories, resume, the time budget, Ctrl-C, checkpoints, metrics and progress."""
