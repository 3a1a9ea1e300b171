"""The one exception users see: a clear, one-line message and exit code 2."""


class InputError(Exception):
    """Bad input from the user (file, option, data). The CLI prints the message alone and exits 2."""
