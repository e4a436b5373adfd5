"""Running chunk tasks: in this process for small local jobs, or on a pool of Ray actors.

Both take the same `ChunkTask`s and run the same `ChunkWorker.run`, so a job's rows do not depend on
where it ran. The Ray pool keeps at most `depth` tasks queued per actor: the driver holds only those
tasks' listings, however long the listing is, and each actor always has its next chunk ready.

Sizing (measured on 2 cores, docs/benchmarks.md): one actor per `cpus_per_worker` CPUs of the
cluster, each with that many torch threads and doing its own decode. Two single-threaded workers on
2 cores beat one worker with 2 threads: decode is single-threaded Python, and while one worker
decodes the other runs the model.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from batch_infer.worker import ChunkTask, ChunkWorker, JobSpec
from kmnist_core.errors import KmnistError
from kmnist_core.precision import ModelBundle

MAX_ATTEMPTS = 3  # a chunk whose worker died is sent again, to another worker, this many times
REPLACEMENT_WAIT_S = 120.0


def run_in_process(make_worker: Callable[[], ChunkWorker], tasks: Iterable[ChunkTask],
                   after_first: Callable[[], None] | None = None) -> Iterator[dict]:
    """`after_first` runs once the first task's result is back, before any other task starts."""
    worker = None
    for n, task in enumerate(tasks):
        worker = worker or make_worker()  # no model load for a run with nothing to do
        yield worker.run(task)
        if n == 0 and after_first:
            after_first()


class RayChunkWorker:
    """The Ray actor: a ChunkWorker built on the node it runs on."""

    def __init__(self, bundle_ref: list, job: JobSpec, threads: int):
        import ray

        # The model travels through the object store, so workers need no access to the model directory.
        # (Wrapped in a list so Ray does not inline it into the actor's constructor arguments.)
        self.worker = ChunkWorker(ray.get(bundle_ref[0]), job, threads, node_id=ray.get_runtime_context().get_node_id())

    def run(self, task: ChunkTask) -> dict:
        return self.worker.run(task)

    def ready(self) -> bool:
        return True


def pool_size(ray, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """As many workers as the cluster has room for."""
    resources = ray.cluster_resources()
    if gpus_per_worker > 0:
        return max(1, int(resources.get("GPU", 0) // gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) // cpus_per_worker))


def run_on_ray(ray, bundle: ModelBundle, job: JobSpec, tasks: Iterable[ChunkTask], workers: int,
               cpus_per_worker: float, gpus_per_worker: float, depth: int = 2,
               after_first: Callable[[], None] | None = None) -> Iterator[dict]:
    """Results in completion order. With `after_first`, the first task runs alone and `after_first`
    runs once its result is back, before any other task is sent.

    A worker that dies (its process killed, its node lost) is not restarted in place: its chunks go
    to the surviving workers at once, and a replacement joins the pool once it has started, which it
    may never do when its node is gone and no other node has room. Only when no worker is left and
    none could be started within REPLACEMENT_WAIT_S does the run fail (committed shards stay).
    """
    threads = max(1, int(cpus_per_worker)) if bundle.device == "cpu" else 1
    actor_class = ray.remote(RayChunkWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None,
                                                     max_restarts=0)
    bundle_ref = [ray.put(bundle)]
    new_actor = lambda: actor_class.remote(bundle_ref, job, threads)  # noqa: E731
    alive = {i: new_actor() for i in range(workers)}
    starting: dict = {}  # ready() ref of a replacement -> its handle
    load = dict.fromkeys(alive, 0)
    pending: dict = {}  # task ref -> (task, worker index, attempt)
    retry: list[tuple[ChunkTask, int]] = []
    tasks = iter(tasks)
    next_index = workers

    def submit(i: int) -> bool:
        task, attempt = retry.pop() if retry else (next(tasks, None), 1)
        if task is None:
            return False
        pending[alive[i].run.remote(task)] = (task, i, attempt)
        load[i] += 1
        return True

    def fill() -> None:
        if after_first is not None:  # the first task runs alone
            if not pending and alive:
                submit(next(iter(alive)))
            return
        while alive:  # one task at a time to the least-loaded worker, so each has work from the start
            i = min(alive, key=lambda i: load[i])
            if load[i] >= depth or not submit(i):
                return

    try:
        fill()
        while pending or retry:
            refs = [*pending, *starting]
            if not refs:  # every worker is gone and no replacement has been asked for
                raise KmnistError("every prediction worker was lost")
            ready, _ = ray.wait(refs, num_returns=1, timeout=REPLACEMENT_WAIT_S if not pending else None)
            if not ready:
                raise KmnistError(f"every prediction worker was lost and none could be started again within "
                                  f"{REPLACEMENT_WAIT_S:.0f} s (is there room on the cluster?)")
            ref = ready[0]
            if ref in starting:
                handle = starting.pop(ref)
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError:
                    continue
                alive[next_index], load[next_index] = handle, 0
                next_index += 1
                fill()
                continue
            task, i, attempt = pending.pop(ref)
            load[i] = load.get(i, 1) - 1
            try:
                stats = ray.get(ref)
            except ray.exceptions.RayActorError as e:  # the worker process or its node died
                if attempt >= MAX_ATTEMPTS:
                    raise KmnistError(f"chunk {task.chunk_id} failed {attempt} times: {str(e).splitlines()[0]}") from None
                retry.append((task, attempt + 1))
                if i in alive:
                    del alive[i]
                    handle = new_actor()
                    starting[handle.ready.remote()] = handle
                fill()
                continue
            yield stats
            if after_first:
                after_first()
                after_first = None
            fill()
    finally:
        for actor in [*alive.values(), *starting.values()]:
            ray.kill(actor)
