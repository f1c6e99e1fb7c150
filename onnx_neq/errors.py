"""The one exception type the CLI turns into a single line on stderr."""


class NeqError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
