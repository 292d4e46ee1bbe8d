"""The AVX2 kernels on any x86-64 host: the integer kernel tests again, and the batched columns beside them, in a
child process whose numba compiles for a Haswell-class CPU (tests/cpu_targets.py), when this process's target
takes another instruction set (AVX-512 VNNI, or none). Where the target is AVX2 already, those tests ran in this
process."""

import os
import subprocess
import sys

import pytest

import cpu_targets
from llamalora.kernels import intmatvec

HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = [
    pytest.mark.skipif(intmatvec.ISA == intmatvec.AVX2, reason="the compile target is AVX2: the tests ran here"),
    pytest.mark.skipif(not cpu_targets.host_can_run("haswell"), reason="the host cannot run code built for Haswell"),
    pytest.mark.skipif(os.environ.get("LLAMALORA_KERNELS") == "portable", reason="integer kernels switched off"),
]


def run_for_haswell(args):
    return subprocess.run([sys.executable, *args], env=cpu_targets.environment("haswell"), cwd=HERE,
                          capture_output=True, text=True)


def test_a_haswell_target_takes_the_avx2_kernels():
    child = run_for_haswell(["-c", "from llamalora.kernels import intmatvec, simd, halfdot; "
                                   "print(intmatvec.ISA, simd.WIDE_TILES, halfdot.F16_KIND == halfdot.F16)"])
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["avx2", "False", "True"]


def test_the_integer_kernel_tests_pass_on_the_avx2_kernels():
    child = run_for_haswell(["-m", "pytest", "-q", "-p", "no:cacheprovider", "test_int_kernels.py",
                             "test_int_kernels_k.py", "test_batch.py::test_columns_equal_each_column_alone"])
    summary = child.stdout.strip().splitlines()[-1] if child.stdout.strip() else child.stderr
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
