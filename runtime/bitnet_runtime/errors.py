"""The one exception type that means "the user asked for something we cannot do".

Command-line entry points catch it and print its message on one line with a non-zero exit;
anything else escaping is a bug in bitnet-compile and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A mistake or an unsupported request on the user's side, described in one line."""


def exit_status(command: Callable[[], int]) -> int:
    """Run a command-line command: a UserError is one ``error:`` line and status 2, Ctrl-C is
    status 130; both entry points (bitnet-compile and bitnet-runtime) go through here."""
    try:
        return command()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
