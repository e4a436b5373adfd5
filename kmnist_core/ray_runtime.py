"""Connecting to Ray, the same way for every stage: reuse, join, or start a local Ray.

Token authentication stays on. A local Ray started here runs with RAY_AUTH_MODE=token set explicitly:
the mode Ray 2.59+ picks by default, without the WARNING it logs at every start when it picks it itself.
Ray reads the mode when it is imported, so `prepare_auth` runs before the first `import ray` of the
process; and with the mode explicit Ray no longer makes a missing token, so `local_token` makes one as Ray
would (256 random bits, where RAY_AUTH_TOKEN_PATH says, else ~/.ray/auth_token). To join a remote cluster
set RAY_AUTH_MODE=token and make the cluster's token readable (docs/clusters.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from kmnist_core.errors import KmnistError


@dataclass(frozen=True)
class RayEndpoints:
    """Where this process's Ray is, for a start line."""

    ray_address: str
    dashboard_url: str | None  # None: no dashboard, or a Ray this process was already using


def local_token() -> None:
    """Make sure a token exists for a local Ray in token mode: RAY_AUTH_TOKEN, or the token file."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.exists():
        return
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:  # O_EXCL: two runs starting at once keep the first one's token
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def prepare_auth(address: str | None = None) -> None:
    """Before this process imports Ray: make token mode explicit for a local Ray (see the module doc).
    A process that already imported Ray (a notebook) keeps Ray's own default."""
    if address or os.environ.get("RAY_ADDRESS") or "RAY_AUTH_MODE" in os.environ or "ray" in sys.modules:
        return
    local_token()
    os.environ["RAY_AUTH_MODE"] = "token"


@contextlib.contextmanager
def own_sigterm_kept():
    """ray.init makes SIGTERM a sys.exit() in a driver; a SIGTERM handler the program set itself is put back
    (predict's child ends its run as interrupted on SIGTERM, as `ray job stop` and service managers send it,
    where Ray's would end it as a bug, with run.json left "running"). Ray's stays where there was none."""
    main = threading.current_thread() is threading.main_thread()
    own = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(own):  # not SIG_DFL, SIG_IGN or None (set outside Python)
            signal.signal(signal.SIGTERM, own)


def init_ray(address: str | None = None):
    """Reuse an initialized Ray (tests, a notebook), join `address` / RAY_ADDRESS (`ray job submit` sets
    it), or start a local Ray sized to this machine. Returns the `ray` module and its endpoints."""
    prepare_auth(address)
    import ray

    if ray.is_initialized():
        return ray, RayEndpoints(ray.get_runtime_context().gcs_address, None)
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        # No address: a Ray of our own ("local"), never a `ray start` cluster that happens to run here.
        with own_sigterm_kept():
            context = ray.init(address=address or "local", include_dashboard=False if not address else None,
                               logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError) as e:
        where = f"connect to Ray at {address}" if address else "start a local Ray"
        raise KmnistError(f"cannot {where}: {str(e).splitlines()[0]}") from None
    url = context.dashboard_url or None
    if url and "://" not in url:
        url = "http://" + url
    return ray, RayEndpoints(ray.get_runtime_context().gcs_address, url)
