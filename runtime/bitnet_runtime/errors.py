"""The one exception type that means "the user asked for something we cannot do".

Command-line entry points catch it and print its message on one line with a non-zero exit;
anything else escaping is a bug in bitnet-compile and keeps its traceback.
"""


class UserError(Exception):
    """A mistake or an unsupported request on the user's side, described in one line."""
