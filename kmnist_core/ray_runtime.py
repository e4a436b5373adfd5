"""Connecting to Ray, the same way for every stage: reuse, join, or start a local Ray.

Token authentication stays on. A local Ray started here runs with RAY_AUTH_MODE=token set explicitly
(the same mode Ray 2.59+ picks by default, minus the WARNING it logs at every start when it picks it
itself), and Ray writes its token where RAY_AUTH_TOKEN_PATH says, else under ~/.ray/. To join a remote
cluster set RAY_AUTH_MODE=token and make the cluster's token readable (docs/clusters.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from kmnist_core.errors import KmnistError


@dataclass(frozen=True)
class RayEndpoints:
    """Where this process's Ray is, for a start line."""

    ray_address: str
    dashboard_url: str | None  # None: no dashboard, or a Ray this process was already using


def init_ray(address: str | None = None):
    """Reuse an initialized Ray (tests, a notebook), join `address` / RAY_ADDRESS (`ray job submit` sets
    it), or start a local Ray sized to this machine. Returns the `ray` module and its endpoints."""
    import ray

    if ray.is_initialized():
        return ray, RayEndpoints(ray.get_runtime_context().gcs_address, None)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        # No address: a Ray of our own ("local"), never a `ray start` cluster that happens to run here.
        context = ray.init(address=address or "local", include_dashboard=False if not address else None,
                           logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        raise KmnistError(f"cannot connect to Ray at {address}: {str(e).splitlines()[0]}") from None
    url = context.dashboard_url or None
    if url and "://" not in url:
        url = "http://" + url
    return ray, RayEndpoints(ray.get_runtime_context().gcs_address, url)
