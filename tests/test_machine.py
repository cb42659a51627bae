"""The machine-speed reference printed beside timings."""
import builtins

import pytest

from cifl_tf import machine


def test_matmul_gflops_is_a_positive_finite_rate():
    rate = machine.matmul_gflops(n=64, repeats=2)
    assert 0 < rate < 1e6


@pytest.mark.parametrize("cpuinfo, expected", [
    ("processor : 0\nflags : fpu sse2 avx2 fma avx512f amx_tile lm\n", "amx_tile avx2 avx512f fma"),
    ("processor : 0\nflags : fpu sse2 lm\n", "none"),
    ("processor : 0\n", "none"),
])
def test_cpu_flags_lists_the_vector_flags(tmp_path, monkeypatch, cpuinfo, expected):
    fake = tmp_path / "cpuinfo"
    fake.write_text(cpuinfo)
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(fake if path == "/proc/cpuinfo" else path, *a, **k))
    assert machine.cpu_flags() == expected
