"""The one exception type that charlm raises for problems a user can fix."""


class CharlmError(Exception):
    """A problem with the user's input or files, stated as one line that says what to do.

    The CLI prints the message and exits with status 1; library callers can catch it.
    """
