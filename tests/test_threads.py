"""The thread governor: decodes with the count that is fastest now, and sets it on whichever thread evaluates."""

import threading

import numba
import numpy as np
import pytest

from llamalora import threads
from llamalora.generate import Context
from llamalora.threads import Governor


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def decode(governor, clock, seconds_per_token, n_tokens):
    """Run n_tokens single-token steps whose time depends on the thread count; the counts used, in order."""
    used = []
    for _ in range(n_tokens):
        n = governor.token_threads()
        t = seconds_per_token(n)
        clock.now += t
        governor.token_done(n, t)
        used.append(n)
    return used


@pytest.fixture(autouse=True)
def restore_numba_threads():
    before, governor = numba.get_num_threads(), threads._governor
    yield
    numba.set_num_threads(before)
    threads._governor = governor


def test_a_quiet_machine_keeps_every_thread_and_probes_ever_more_rarely():
    clock = FakeClock()
    g = Governor(2, clock=clock)
    used = decode(g, clock, lambda n: {2: 0.008, 1: 0.012}[n], 3000)  # 24 s of decoding
    assert g.current == 2
    ones = used.count(1)
    assert 0 < ones <= 3 * 12  # a probe of three tokens at most every few seconds
    assert g.interval == threads.LONGEST_INTERVAL
    assert ones / len(used) < 0.02


def test_a_busy_core_makes_it_decode_with_fewer_threads():
    clock = FakeClock()
    g = Governor(2, clock=clock)
    speeds = lambda n: {2: 0.060, 1: 0.012}[n]  # noqa: E731
    used = decode(g, clock, speeds, 400)
    assert g.current == 1
    first_one = used.index(1)
    assert sum(speeds(n) for n in used[:first_one]) < 0.5  # found at the first probe
    assert used[-100:].count(2) <= 3  # and it stays there, probing two threads now and then


def test_it_comes_back_when_the_other_program_stops():
    clock = FakeClock()
    g = Governor(2, clock=clock)
    busy = {"on": True}
    speeds = lambda n: {2: 0.060 if busy["on"] else 0.008, 1: 0.012}[n]  # noqa: E731
    decode(g, clock, speeds, 200)
    assert g.current == 1
    busy["on"] = False
    start = clock.now
    used = decode(g, clock, speeds, 2000)
    assert g.current == 2
    switched_at = start + sum(speeds(n) for n in used[:used.index(2)])
    assert switched_at - start < threads.LONGEST_INTERVAL + 1  # within one probe interval


def test_a_sudden_slowdown_brings_the_next_probe_forward():
    clock = FakeClock()
    g = Governor(2, clock=clock)
    busy = {"on": False}
    speeds = lambda n: {2: 0.060 if busy["on"] else 0.008, 1: 0.012}[n]  # noqa: E731
    decode(g, clock, speeds, 3000)
    assert g.interval == threads.LONGEST_INTERVAL and g.current == 2
    busy["on"] = True
    start = clock.now
    decode(g, clock, speeds, 30)
    assert g.current == 1 and clock.now - start < 1.0  # not the 4 s of the longest interval


def test_fixed_never_changes_the_count(monkeypatch):
    monkeypatch.setenv("LLAMALORA_THREADS", "fixed")
    g = threads.configure(2)
    clock = FakeClock()
    g.clock = clock
    assert set(decode(g, clock, lambda n: {2: 0.060, 1: 0.012}[n], 200)) == {2}


class CountingModel:
    """Records the numba thread count its forward runs with."""

    def __init__(self):
        self.seen = []

    def new_cache(self, n_ctx):
        return type("Cache", (), {"n": 0, "clear": lambda self, n: None})()

    def forward(self, tokens, cache, all_logits=False, lora=None):
        self.seen.append(numba.get_num_threads())
        logits = np.zeros((len(tokens), 4), dtype=np.float32)
        return logits if all_logits else logits[-1:]


def test_the_count_applies_on_every_thread_that_evaluates():
    """numba's count is per thread: a server's worker threads ran with every core whatever -t said."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs a machine with two cores")
    from llamalora.loader import set_threads

    set_threads(1)
    model = CountingModel()
    worker = threading.Thread(target=lambda: (Context(model, n_ctx=8).eval([1, 2]),
                                              Context(model, n_ctx=8).eval([3], generating=True)))
    worker.start()
    worker.join()
    assert model.seen == [1, 1]
