"""Errors meant for people, not tracebacks.

A `UserError` is raised for anything the user can fix (a missing file, a bad setting, a
corrupt checkpoint). The CLI prints its message and exits with code 2; every other
exception is a bug in gptrain and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""


class PeerFailure(Exception):
    """Another process of a multi-process job died or stopped answering; this one stops too."""
