"""The command line's errors.

They live in a module of their own, which imports nothing of the project, so that the entry point
(`service/cli.py`), every command module and the shared helpers raise and catch the same classes
without importing each other.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. `classifier-gateway` prints the message as one line on stderr
    and exits 1, so the message says what went wrong and what to do about it."""


class TransientError(UserError):
    """The server is unreachable, overloaded or failing for now (connection refused, timeout, 429,
    5xx): worth another try when watching a job, which must not be given up for one bad poll."""
