"""The one exception type that reaches the user as a sentence, not a traceback."""


class AtlasError(Exception):
    """A problem with the user's input or the run store, stated in one clear sentence.

    The CLI prints ``str(error)`` to stderr and exits with status 2; nothing else
    should catch it. Raise it before writing anything, so a bad input leaves no files.
    """
