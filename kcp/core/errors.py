"""The one base class of errors caused by the user's input rather than by a bug.

The CLI prints these as one line and exits 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a config key, a path, a source, a contract. The message names it."""
