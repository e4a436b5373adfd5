"""The exception types a user is meant to see: the CLI prints them on one line and exits non-zero."""


class KmnistError(Exception):
    """A problem with the user's input or environment (bad path, corrupt file, unknown name)."""

    exit_code = 2


class Interrupted(KmnistError):
    """The user stopped a run (Ctrl-C, SIGTERM); what it committed is kept."""

    exit_code = 130  # the shell's convention for a SIGINT death


TRAIN_EXTRA = "kmnist-batch[train]"  # torch and torchvision: train, tune, the model recipe, GPU inference


def require_torch(what: str):
    """torch, or a KmnistError naming what needs it and the extra that installs it (predict, report and
    review run without it; pyproject.toml)."""
    try:
        import torch
    except ImportError:
        raise KmnistError(f"{what} needs torch, which this install lacks: pip install '{TRAIN_EXTRA}'") from None
    return torch
