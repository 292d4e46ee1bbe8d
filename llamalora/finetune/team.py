"""The finetune thread team: the calling thread and n - 1 workers share a list of tasks.

Tasks are claimed in order by whichever thread is free. Every task writes its own part of the results, each in
a fixed order, so the results do not depend on which thread ran which task.
The tasks' arithmetic runs without the GIL: numba functions compiled nogil, BLAS and numpy's ufunc loops
(with BLAS on one thread: train.use_threads sees to that).
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_team = {"threads": 1, "pool": None}
_local = threading.local()


def set_team_threads(n: int) -> None:
    """Run tasks on n threads: the caller and n - 1 workers."""
    n = max(1, int(n))
    if n == _team["threads"]:
        return
    if _team["pool"] is not None:
        _team["pool"].shutdown()
    _team["threads"] = n
    _team["pool"] = ThreadPoolExecutor(n - 1, thread_name_prefix="llamalora-team") if n > 1 else None


def team_threads() -> int:
    return _team["threads"]


def run_tasks(tasks: list) -> None:
    """Call every task (a function of no arguments), spread over the team; returns when all have run. A task's
    exception is raised here once the others have finished."""
    threads = _team["threads"]
    if threads == 1 or len(tasks) == 1:
        for task in tasks:
            task()
        return
    lock = threading.Lock()
    pending = iter(tasks)

    def claim():
        with lock:
            return next(pending, None)

    def run():
        for task in iter(claim, None):
            task()

    helpers = [_team["pool"].submit(run) for _ in range(min(threads, len(tasks)) - 1)]
    try:
        run()
    finally:
        for helper in helpers:
            helper.result()


# Tasks a piece of work is cut into per thread. More would let a held-up thread's share pass to the others, but
# every BLAS product packs its operands again, and on 2 cores two tasks per thread were slower both on the quiet
# machine (0.77 s a training step against 0.71) and beside a process holding one core (1.24 s against 1.18).
TASKS_PER_THREAD = 1


def team_tasks() -> int:
    """How many tasks to cut a piece of work into: 1 on one thread."""
    threads = _team["threads"]
    return 1 if threads == 1 else TASKS_PER_THREAD * threads


def row_blocks(n_rows: int, min_rows: int = 16, multiple: int = 1) -> list:
    """(r0, r1) blocks covering n_rows: team_tasks() of them, each at least min_rows and a multiple of `multiple`
    rows (the last block excepted)."""
    parts = team_tasks()
    if parts == 1:
        return [(0, n_rows)]
    step = max(min_rows, -(-n_rows // parts))
    step = -(-step // multiple) * multiple
    return [(r0, min(r0 + step, n_rows)) for r0 in range(0, n_rows, step)]


def for_row_blocks(n_rows: int, work, min_rows: int = 16, multiple: int = 1) -> None:
    """work(r0, r1) over row_blocks(n_rows, ...), spread over the team."""
    run_tasks([(lambda r0=r0, r1=r1: work(r0, r1)) for r0, r1 in row_blocks(n_rows, min_rows, multiple)])


def thread_buffer(key: str, shape: tuple, dtype) -> np.ndarray:
    """A buffer of this thread's that lives across calls: fresh memory on every product costs page faults."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    size = int(np.prod(shape))
    buf = buffers.get((key, np.dtype(dtype)))
    if buf is None or buf.size < size:
        buf = buffers[(key, np.dtype(dtype))] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def prerequisite(work):
    """(task, wait) for work that other tasks of one list need: put task first in the list (so that it is claimed
    before any task that waits) and call wait() in a task before using work's results. wait raises if work failed."""
    if _team["threads"] == 1:  # the tasks run in order: work is done before any task waits
        return work, lambda: None
    done = threading.Event()
    failed = []

    def task():
        try:
            work()
        except BaseException:
            failed.append(True)
            raise
        finally:
            done.set()

    def wait():
        done.wait()
        if failed:
            raise RuntimeError("a task this one needs failed")

    return task, wait
