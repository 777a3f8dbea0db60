"""User errors: bad input that gets a clear message and exit code 2, never a traceback."""


class UserError(Exception):
    """A problem the user can fix; the message names it and the fix. The CLI exits with `exit_code`."""

    exit_code = 2
