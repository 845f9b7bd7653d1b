"""The one exception type the command line turns into `error: <what> (<how to fix>)`."""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""

    def __init__(self, what: str, hint: str | None = None):
        super().__init__(what if hint is None else f"{what} ({hint})")
        self.what = what
        self.hint = hint
