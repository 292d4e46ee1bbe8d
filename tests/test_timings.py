"""Timing lines: compilation on a line of its own, never inside the load or evaluation rates."""

import time

import numpy as np
from numba import njit

from llamalora.generate import Context, Timings


class CompilingModel:
    """A model whose first forward compiles a new numba function (as a first run compiles the kernels)."""

    def __init__(self):
        @njit
        def slow_to_compile(x):
            total = 0.0
            for i in range(x.shape[0]):
                total += np.sin(x[i]) * np.cos(x[i]) + np.sqrt(abs(x[i]))
            return total

        self.kernel = slow_to_compile

    def new_cache(self, n_ctx):
        return type("Cache", (), {"n": 0, "clear": lambda self, n: None})()

    def forward(self, tokens, cache, all_logits=False, lora=None):
        self.kernel(np.ones(4))
        time.sleep(0.05)  # the evaluation itself
        logits = np.zeros((len(tokens), 8), dtype=np.float32)
        return logits if all_logits else logits[-1:]


def test_compilation_is_counted_apart_from_evaluation():
    ctx = Context(CompilingModel(), n_ctx=16)
    ctx.eval([1, 2, 3])
    t = ctx.timings
    assert t.compile_ms > 50  # numba needs far more than that for any function
    assert 40 < t.prompt_ms < 50 + 0.5 * t.compile_ms  # the sleep, not the compilation
    lines = t.lines()
    assert any("compile time" in line and f"{t.compile_ms:10.2f} ms" in line for line in lines)
    before = t.compile_ms
    ctx.eval([4], generating=True)  # compiled already: nothing more
    assert t.compile_ms == before and t.gen_ms >= 40


def test_no_compile_line_when_nothing_was_compiled():
    lines = Timings(load_ms=1.0, prompt_ms=2.0, prompt_tokens=1).lines()
    assert len(lines) == 3 and not any("compile" in line for line in lines)
