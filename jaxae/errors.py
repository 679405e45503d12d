"""The one exception type jaxae raises for bad input.

The CLI turns a :class:`JaxaeError` into a one-line message on stderr and exit
status 2; anything else is a bug and keeps its traceback.
"""


class JaxaeError(Exception):
    """Bad input from the user: a missing file, a wrong shape, an impossible setting."""


class DataError(JaxaeError):
    """A dataset that cannot be found, read or used as asked."""
