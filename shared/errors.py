"""Exceptions that carry a message meant for the person at the terminal."""


class UserError(Exception):
    """Bad input or configuration: the message is one line that names the problem and the fix.

    The CLI prints it as ``error: <message>`` and exits with status 2, before any job row exists.
    """
