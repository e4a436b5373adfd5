"""Connecting to Ray, the same way for every stage: reuse, join, or start a local Ray.

Token authentication (on by default for local clusters since Ray 2.59) stays on: a local Ray writes its
token under ~/.ray/ and this process picks it up; for a remote cluster set RAY_AUTH_MODE=token and
make the cluster's token readable (see the README's cluster section).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

from kmnist_core.errors import KmnistError

# Ray Data hands every actor-pool worker its map function as an object-store ref (ray.put of the
# MapTransformer, actor_pool_map_operator.py), so Ray Core logs this at E level for every actor on every
# healthy run (ray#53727). The ref is owned by the driver for the whole run, so the loss it warns about
# needs the driver itself to be gone.
RAY_53727 = re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the "
                       rb"object store and max_restarts > 0")


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


@contextmanager
def without_known_ray_noise() -> Iterator[None]:
    """Drop the ray#53727 line (RAY_53727) from this process's stderr; every other byte passes through.

    Ray's C++ core writes to file descriptor 2, so fd 2 goes through a pipe that a thread filters.
    Text without a newline that is not a log line (a progress bar) is passed on at once.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        pending = b""
        while chunk := os.read(read_fd, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not RAY_53727.search(line))
            if pending and not pending.startswith(b"["):  # Ray's log lines start with "[timestamp"
                kept, pending = kept + pending, b""
            if kept:
                os.write(saved, kept)
        if pending:
            os.write(saved, pending)
        os.close(read_fd)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes this process's write end of the pipe
        # Processes Ray started may still hold the pipe; don't wait for them to let go of it.
        thread.join(timeout=2)
