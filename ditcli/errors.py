"""The exception types the command line turns into `error: <what> (<how to fix>)`; every other exception is a bug and
keeps its traceback."""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""

    def __init__(self, what: str, hint: str | None = None):
        super().__init__(what if hint is None else f"{what} ({hint})")
        self.what = what
        self.hint = hint


class UserValueError(UserError, ValueError):
    """A value the user gave (an option, a field of a file they pass) that the core refuses: a UserError to the shell,
    and a ValueError to a caller of the library, as Python's own checks of a value are."""
