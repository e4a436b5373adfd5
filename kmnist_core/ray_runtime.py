"""Connecting to Ray, the same way for every stage: reuse, join, or start a local Ray.

Token authentication (on by default for local clusters since Ray 2.59) stays on: a local Ray writes its
token under ~/.ray/ and this process picks it up; for a remote cluster set RAY_AUTH_MODE=token and
make the cluster's token readable (see the README's cluster section).
"""

from __future__ import annotations

import contextlib
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
            # No address: a Ray of our own ("local"), never a `ray start` cluster that happens to run here.
            ray.init(address=address or "local", include_dashboard=False if not address else None,
                     logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise KmnistError(f"cannot connect to Ray at {address}: {str(e).splitlines()[0]}") from None
    return ray


def endpoints() -> dict:
    """Where this process's Ray is, for a start line: its GCS address and dashboard URL (None when
    the Ray has no dashboard). Ray keeps the URL only on its node object (ray.init's return value
    carries it too, but a reused Ray never returns one)."""
    import ray

    url = None
    with contextlib.suppress(Exception):
        url = ray._private.worker._global_node.webui_url or None
    if url and "://" not in url:
        url = "http://" + url
    return {"ray_address": ray.get_runtime_context().gcs_address, "dashboard_url": url}

