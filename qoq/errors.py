"""User-facing errors: one line, naming the fix. The CLI prints them without a traceback."""


class QoqError(Exception):
    """An error the user can fix; its message is a single line that says how."""
