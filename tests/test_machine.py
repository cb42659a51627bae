"""The machine-speed reference printed beside timings."""
import builtins
import os
import site
import subprocess
import sys

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


@pytest.mark.parametrize("onednn_on, flags, native", [
    (True, "avx avx2 avx512_bf16 avx512f fma", True), (True, "amx_bf16 amx_tile avx2", True),
    (True, "avx avx2 avx512_vnni avx512f fma", False), (False, "amx_bf16 avx512_bf16", False),
    (True, "unknown (no /proc/cpuinfo)", False)])
def test_native_bfloat16_needs_onednn_and_bfloat16_units(monkeypatch, onednn_on, flags, native):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(machine, "onednn_enabled", lambda: onednn_on)
    monkeypatch.setattr(machine, "cpu_flags", lambda: flags)
    assert machine.native_bfloat16() is native


@pytest.mark.parametrize("cap, native", [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True),
                                         ("AVX10_1_512_AMX", True), ("ALL", True)])
def test_a_onednn_cap_below_bfloat16_is_reported_and_not_native(monkeypatch, cap, native):
    """ONEDNN_MAX_CPU_ISA=AVX2 stands in for an AVX2-only CPU: the machine line said AVX-512 and oneDNN on."""
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(machine, "onednn_enabled", lambda: True)
    monkeypatch.setattr(machine, "cpu_flags", lambda: "avx2 avx512_bf16 avx512f")
    assert machine.native_bfloat16() is native
    assert machine.describe().endswith(f"oneDNN on, capped at {cap} (ONEDNN_MAX_CPU_ISA)")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", cap)  # its older name
    assert machine.native_bfloat16() is native
    assert machine.describe().endswith(f"oneDNN on, capped at {cap} (DNNL_MAX_CPU_ISA)")


@pytest.mark.integration
def test_onednn_follows_tf_enable_onednn_opts():
    """What describe() says is what TF does. TF reads the variable once, at import: this process shows one
    state, a fresh interpreter with the variable set to the other shows the other."""
    here = machine.onednn_enabled()
    assert machine.describe().endswith(f"oneDNN {'on' if here else 'off'}")
    code = "import cifl_tf; from cifl_tf import machine; print(machine.onednn_enabled(), machine.describe())"
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0" if here else "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    there = result.stdout.strip().splitlines()[-1]
    assert there.startswith(f"{not here} ") and there.endswith(f"oneDNN {'off' if here else 'on'}")


@pytest.mark.parametrize("variable, onednn_on, restarts", [
    (None, False, True),    # TensorFlow left oneDNN off (an AVX2-only CPU): the command turns it on
    (None, True, False),    # on already (AVX-512 VNNI, BF16 or AMX)
    ("0", False, False),    # the user's choice stands
    ("1", False, False),
])
def test_relaunch_with_onednn_restarts_unless_it_is_on_or_chosen(monkeypatch, capsys, tmp_path, variable, onednn_on,
                                                                  restarts):
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    if variable is not None:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", variable)
    monkeypatch.setattr(machine, "onednn_enabled", lambda: onednn_on)
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    machine.relaunch_with_onednn("cifl demo", ["-m", "cifl_tf.cli", "demo", "--quick"])
    if not restarts:
        assert calls == [] and capsys.readouterr().err == ""
        return
    [(program, arguments, environment)] = calls
    assert program == sys.executable and arguments == [sys.executable, "-m", "cifl_tf.cli", "demo", "--quick"]
    assert environment["TF_ENABLE_ONEDNN_OPTS"] == "1"
    # the folder of the cifl_tf this process imported (a checkout, not site-packages) first on the path
    assert environment["PYTHONPATH"] == os.path.dirname(os.path.dirname(os.path.abspath(machine.__file__)))
    assert capsys.readouterr().err.startswith("cifl demo: restarting with TensorFlow's oneDNN kernels on")


@pytest.mark.parametrize("installed", [False, True])
def test_relaunch_puts_a_checkouts_cifl_tf_first_on_the_path_but_not_site_packages(monkeypatch, tmp_path, installed):
    """`python -P -m cifl_tf.cli` leaves the working folder off the path: a cifl_tf imported from a checkout is put
    on PYTHONPATH, so that the restarted process imports it, not another; site-packages is left where it is."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(machine.__file__)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", "elsewhere")
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.setattr(machine, "onednn_enabled", lambda: False)
    monkeypatch.setattr(site, "getsitepackages", lambda: [root] if installed else [str(tmp_path / "site")])
    calls = []
    monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
    machine.relaunch_with_onednn("cifl demo", ["-P", "-m", "cifl_tf.cli", "demo"])
    assert calls[0][2]["PYTHONPATH"] == ("elsewhere" if installed else os.pathsep.join([root, "elsewhere"]))


def test_usable_cpus_are_those_the_process_may_run_on(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)  # as under `taskset -c 3`
    assert machine.usable_cpus() == 1 and machine.describe().startswith("1 CPUs; CPU flags: ")
