"""How many threads the kernels run on: up to the user's -t, fewer while other programs hold the cores.

Between a token's few hundred parallel loops, the team's idle threads either spin or sleep. Measured on a
2-core AMD EPYC VM (SmolLM2 Q4_1, -t 2, tokens/s, several runs each): on a quiet machine sleeping threads
(OMP_WAIT_POLICY=passive) decode 33-49, since every loop then pays a wake-up, which a halted virtual CPU makes
dear; spinning ones 95-125 (GOMP_SPINCOUNT 100000: 119-125); one thread alone 73-83. Beside a program busy on
one core it turns around: spinning threads collapse to 10-40 (a thread that spins burns the time slice its
partner needs to finish its share), sleeping ones keep 49-66, and one thread alone keeps 76-83.

So the team spins for a bounded time (GOMP_SPINCOUNT, set in llamalora/__init__.py, after which an idle team
sleeps and costs nothing), and the Governor keeps measuring: now and then it decodes a few tokens with one
thread fewer or more than it uses, and keeps whichever count is faster. On a quiet machine that is -t and the
probes cost a few tokens a second; beside a busy program it is fewer threads, found within a second of the
slowdown. numba's thread count belongs to the thread that sets it, so every evaluation sets it on the calling
thread (a server's worker threads too).

LLAMALORA_THREADS=fixed keeps the count at -t (benchmarks that compare engines at equal threads use it).
"""

import os
import threading
import time
from collections import deque

import numba

PROBE_TOKENS = 3  # tokens a probe decodes at the other count (the first may pay the team's wake-up)
RECENT = 8  # tokens at the current count a probe is compared with
BETTER = 0.92  # a probe must be this much faster (time ratio) to switch
FIRST_INTERVAL, LONGEST_INTERVAL = 0.25, 4.0  # seconds between probes: doubling while the choice holds
SLOWDOWN = 1.4  # recent tokens this much slower than the best recent run: probe at once


class Governor:
    """The thread count for the next evaluation, chosen from the measured speed of single-token steps."""

    def __init__(self, max_threads: int, adaptive: bool = True, clock=time.perf_counter):
        self.max_threads = max(1, int(max_threads))
        self.adaptive = adaptive and self.max_threads > 1
        self.clock = clock
        self.current = self.max_threads
        self.recent: deque = deque(maxlen=RECENT)  # seconds per token at `current`
        self.best_recent = float("inf")
        self.interval = FIRST_INTERVAL
        self.next_probe = clock() + FIRST_INTERVAL
        self.probe_count = None  # the count under trial, while a probe runs
        self.probe_times: list = []
        self.alternate = 0  # which neighbour the next probe tries
        self.lock = threading.Lock()

    def batch_threads(self) -> int:
        """Threads for a prompt batch (the current choice; batches are not probed), set on the calling thread."""
        return use(self.current)

    def token_threads(self) -> int:
        """Threads for the next single-token step, set on the calling thread; report its time to token_done."""
        if not self.adaptive:
            return use(self.current)
        with self.lock:
            if self.probe_count is None and self.clock() >= self.next_probe and len(self.recent) >= 2:
                self.probe_count = self.neighbour()
                self.probe_times = []
            return use(self.probe_count if self.probe_count is not None else self.current)

    def token_done(self, n_threads: int, seconds: float) -> None:
        if not self.adaptive:
            return
        with self.lock:
            if self.probe_count is not None and n_threads == self.probe_count:
                self.probe_times.append(seconds)
                if len(self.probe_times) >= PROBE_TOKENS:
                    self.finish_probe()
                return
            if n_threads != self.current:
                return  # a step that began before the choice changed
            self.recent.append(seconds)
            if len(self.recent) == RECENT:
                mean = sum(self.recent) / RECENT
                self.best_recent = min(self.best_recent, mean)
                if sum(list(self.recent)[-3:]) / 3 > SLOWDOWN * self.best_recent:
                    self.probe_soon()  # slowed down: another program may have taken a core

    def neighbour(self) -> int:
        """One thread fewer or one more than now, taking turns where both exist."""
        options = [n for n in (self.current - 1, self.current + 1) if 1 <= n <= self.max_threads]
        self.alternate += 1
        return options[self.alternate % len(options)]

    def finish_probe(self) -> None:
        trial = sum(self.probe_times[1:]) / (len(self.probe_times) - 1)  # the first may pay a wake-up
        mine = sorted(self.recent)[len(self.recent) // 2]
        if trial < BETTER * mine:
            self.current = self.probe_count
            self.recent.clear()
            self.recent.extend(self.probe_times[1:])
            self.best_recent = float("inf")
            self.interval = FIRST_INTERVAL
        else:
            self.interval = min(2 * self.interval, LONGEST_INTERVAL)
        self.probe_count = None
        self.next_probe = self.clock() + self.interval

    def probe_soon(self) -> None:
        self.interval = FIRST_INTERVAL
        self.best_recent = float("inf")
        self.next_probe = self.clock()


def use(n: int) -> int:
    """Set numba's thread count for the calling thread (it is per thread) and return it."""
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


_governor: Governor | None = None


def configure(max_threads: int) -> Governor:
    """The process's governor, for up to max_threads (what -t asks for)."""
    global _governor
    _governor = Governor(max_threads, adaptive=os.environ.get("LLAMALORA_THREADS", "adaptive") != "fixed")
    _governor.batch_threads()
    return _governor


def governor() -> Governor:
    """The process's governor (every core numba has, until configure() is called)."""
    global _governor
    if _governor is None:
        _governor = Governor(numba.config.NUMBA_NUM_THREADS,
                             adaptive=os.environ.get("LLAMALORA_THREADS", "adaptive") != "fixed")
    return _governor
