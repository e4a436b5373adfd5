"""The one exception type a user is meant to see: the CLI prints it on one line and exits non-zero."""


class KmnistError(Exception):
    """A problem with the user's input or environment (bad path, corrupt file, unknown name)."""
