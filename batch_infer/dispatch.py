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


class ActorPool:
    """The Ray actors of one run, the tasks each holds, and the replacements of those that died."""

    def __init__(self, ray, bundle: ModelBundle, job: JobSpec, tasks: Iterable[ChunkTask], workers: int,
                 cpus_per_worker: float, gpus_per_worker: float, depth: int,
                 after_first: Callable[[], None] | None):
        self.ray, self.job, self.depth, self.after_first = ray, job, depth, after_first
        self.threads = max(1, int(cpus_per_worker)) if bundle.device == "cpu" else 1
        self.actor_class = ray.remote(RayChunkWorker).options(num_cpus=cpus_per_worker,
                                                              num_gpus=gpus_per_worker or None, max_restarts=0)
        self.bundle_ref = [ray.put(bundle)]
        self.alive = {i: self.new_actor() for i in range(workers)}
        self.starting: dict = {}  # ready() ref of a replacement -> its handle
        self.load = dict.fromkeys(self.alive, 0)
        self.pending: dict = {}  # task ref -> (task, worker index, attempt)
        self.retry: list[tuple[ChunkTask, int]] = []
        self.tasks = iter(tasks)
        self.next_index = workers

    def new_actor(self):
        return self.actor_class.remote(self.bundle_ref, self.job, self.threads)

    def submit(self, i: int) -> bool:
        task, attempt = self.retry.pop() if self.retry else (next(self.tasks, None), 1)
        if task is None:
            return False
        self.pending[self.alive[i].run.remote(task)] = (task, i, attempt)
        self.load[i] += 1
        return True

    def fill(self) -> None:
        if self.after_first is not None:  # the first task runs alone
            if not self.pending and self.alive:
                self.submit(next(iter(self.alive)))
            return
        while self.alive:  # one task at a time to the least-loaded worker, so each has work from the start
            i = min(self.alive, key=lambda i: self.load[i])
            if self.load[i] >= self.depth or not self.submit(i):
                return

    def next_ready(self):
        """The next task or replacement that is done; refused when no worker is left to wait for."""
        refs = [*self.pending, *self.starting]
        if not refs:  # every worker is gone and no replacement has been asked for
            raise KmnistError("every prediction worker was lost")
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=REPLACEMENT_WAIT_S if not self.pending else None)
        if not ready:
            raise KmnistError(f"every prediction worker was lost and none could be started again within "
                              f"{REPLACEMENT_WAIT_S:.0f} s (is there room on the cluster?)")
        return ready[0]

    def join(self, ref) -> None:
        """A replacement is up (or failed to start): it takes work like the others."""
        handle = self.starting.pop(ref)
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            return
        self.alive[self.next_index], self.load[self.next_index] = handle, 0
        self.next_index += 1
        self.fill()

    def lost(self, task: ChunkTask, i: int, attempt: int, error: Exception) -> None:
        """Worker `i` died holding `task`: the task goes to the others, a replacement is asked for."""
        if attempt >= MAX_ATTEMPTS:
            raise KmnistError(f"chunk {task.chunk_id} failed {attempt} times: {str(error).splitlines()[0]}") from None
        self.retry.append((task, attempt + 1))
        if i in self.alive:
            del self.alive[i]
            handle = self.new_actor()
            self.starting[handle.ready.remote()] = handle
        self.fill()

    def results(self) -> Iterator[dict]:
        self.fill()
        while self.pending or self.retry:
            ref = self.next_ready()
            if ref in self.starting:
                self.join(ref)
                continue
            task, i, attempt = self.pending.pop(ref)
            self.load[i] = self.load.get(i, 1) - 1
            try:
                stats = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:  # the worker process or its node died
                self.lost(task, i, attempt, e)
                continue
            yield stats
            if self.after_first:
                self.after_first()
                self.after_first = None
            self.fill()

    def close(self) -> None:
        for actor in [*self.alive.values(), *self.starting.values()]:
            self.ray.kill(actor)


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
    pool = ActorPool(ray, bundle, job, tasks, workers, cpus_per_worker, gpus_per_worker, depth, after_first)
    try:
        yield from pool.results()
    finally:
        pool.close()
