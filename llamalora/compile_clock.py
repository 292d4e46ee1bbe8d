"""Time spent compiling kernels, so that timings report it on a line of its own.

A first run (or the first of a new weight type) compiles numba kernels when they are first called, inside a
prompt's or a token's evaluation; counted there, it would turn the rates llama.cpp users compare into nonsense
("25.8 s / 7 tokens"). numba announces each compilation as a `numba:compile` event (loading from the cache is
not one); nested compilations are counted once, by their outermost event. Compilations hold numba's global
compiler lock, so one counter serves every thread, except the background compilation that runs while the
answer streams (decode.columns_ready, in the thread named BACKGROUND): it takes no time from an evaluation.
"""

import threading
import time

from numba.core import event


BACKGROUND = "llamalora-compile"


class CompileClock(event.Listener):
    def __init__(self):
        self.depth = 0
        self.started = 0.0
        self.total = 0.0

    def on_start(self, ev):
        if threading.current_thread().name == BACKGROUND:
            return
        if self.depth == 0:
            self.started = time.perf_counter()
        self.depth += 1

    def on_end(self, ev):
        if threading.current_thread().name == BACKGROUND:
            return
        self.depth -= 1
        if self.depth == 0:
            self.total += time.perf_counter() - self.started


CLOCK = CompileClock()
event.register("numba:compile", CLOCK)


def compile_ms() -> float:
    """Milliseconds spent compiling in this process so far (a compilation under way counts up to now)."""
    running = time.perf_counter() - CLOCK.started if CLOCK.depth else 0.0
    return 1000.0 * (CLOCK.total + running)
