"""Connecting to Ray, the same way for every stage: reuse, join, or start a local Ray.

Token authentication (on by default for local clusters since Ray 2.59) stays on: a local Ray writes its
token under ~/.ray/ and this process picks it up; for a remote cluster set RAY_AUTH_MODE=token and
make the cluster's token readable (see the README's cluster section).
"""

from __future__ import annotations

import logging
import os

from kmnist_core.errors import KmnistError


def init_ray(address: str | None = None):
    """Reuse an initialized Ray (tests, `ray job submit`), join `address` / RAY_ADDRESS, or start a
    local Ray sized to this machine. Returns the `ray` module."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        try:
            ray.init(address=address, include_dashboard=False if not address else None,
                     logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise KmnistError(f"cannot connect to Ray at {address}: {str(e).splitlines()[0]}") from None
    return ray
