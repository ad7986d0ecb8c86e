"""User-facing errors: the CLI prints their message on one line instead of a traceback."""


class SoapvitError(ValueError):
    """Bad input from the user (argument, file, folder or model id); the message names it."""
