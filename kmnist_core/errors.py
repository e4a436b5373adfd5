"""The exception types a user is meant to see: the CLI prints them on one line and exits non-zero."""


class KmnistError(Exception):
    """A problem with the user's input or environment (bad path, corrupt file, unknown name)."""

    exit_code = 2


class Interrupted(KmnistError):
    """The user stopped a run (Ctrl-C, SIGTERM); what it committed is kept."""

    exit_code = 130  # the shell's convention for a SIGINT death
