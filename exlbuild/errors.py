"""The one exception type a user sees: a message that names the file, key or value at fault."""


class ExlbuildError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    The message must say what is wrong (the file, key or value), and what would be valid.
    """
