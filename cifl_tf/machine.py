"""The speed of this machine, measured in the same run as a timing, so that timings compare across CPUs.

An early version of the demo took 9 minutes on one 2-core machine and 24 on another (AVX-512 against AVX2
only): a wall time means little without the machine's own float32 matmul rate and vector flags beside it.
"""
import os
import site
import sys
import sysconfig
import timeit

import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port


def matmul_gflops(n=2048, repeats=10):
    """GFLOP/s of a float32 n x n ``tf.matmul`` on this machine, now."""
    a = tf.random.normal((n, n))
    product = tf.function(lambda: tf.linalg.matmul(a, a)[0, 0])
    product().numpy()  # tracing
    return 2 * n ** 3 * repeats / timeit.timeit(lambda: product().numpy(), number=repeats) / 1e9


def cpu_flags():
    """The vector-instruction flags of this machine's CPU (AVX2, AVX-512, AMX...), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":")[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    return " ".join(sorted(flag for flag in flags if flag.startswith(("avx", "amx", "fma")))) or "none"


def onednn_enabled():
    """Whether TensorFlow runs its oneDNN kernels in this process. TF decides at import: on by itself only
    on CPUs with AVX-512 VNNI, BF16 or AMX, else when TF_ENABLE_ONEDNN_OPTS=1.

    Measured on an AVX2-only AMD EPYC: an encoder training step 1.9x faster with them (bench/train_step.py),
    but under load from another process a seeded run resumed after a kill no longer matched one that went
    through (features up to 0.056 apart; tests/test_cli_train_encoder.py), so training keeps TF's choice;
    only `cifl demo`, `cifl register` and experiments/downstream.py turn them on (relaunch_with_onednn)."""
    return bool(_pywrap_util_port.IsMklEnabled())


# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16, the first with bfloat16 arithmetic
_ISAS_WITHOUT_BFLOAT16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def onednn_cap():
    """(variable, value) of the instruction-set cap set for oneDNN (ONEDNN_MAX_CPU_ISA, or DNNL_MAX_CPU_ISA, its
    older name), or None."""
    return next(((name, os.environ[name]) for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
                 if os.environ.get(name)), None)


def native_bfloat16():
    """Whether TensorFlow's CPU kernels can compute bfloat16 in hardware here: with oneDNN on, on a CPU with
    AVX512_BF16 or AMX. Without oneDNN they emulate it: on an AVX-512 CPU with AMX, an encoder training step in
    mixed_bfloat16 took 15.4 s against 1.2 s in float32 with oneDNN off, and 0.14 s against 0.51 s with it on
    (README)."""
    cap = onednn_cap()
    capped = cap is not None and cap[1].upper() in _ISAS_WITHOUT_BFLOAT16
    return onednn_enabled() and not capped and bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags().split()))


def usable_cpus():
    """The CPUs this process may run on (taskset, cgroups' cpusets, SLURM), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # macOS has none


def describe():
    """One line for beside a timing: the CPUs this process may use, their vector flags and whether oneDNN is on
    (and capped at which instruction set, as ONEDNN_MAX_CPU_ISA=AVX2 stands in for an AVX2-only CPU)."""
    cap = onednn_cap()
    onednn = "on" + (f", capped at {cap[1]} ({cap[0]})" if cap else "") if onednn_enabled() else "off"
    return f"{usable_cpus()} CPUs; CPU flags: {cpu_flags()}; oneDNN {onednn}"


def relaunch_with_onednn(name, arguments):
    """Runs `python *arguments` again in this process's place with TensorFlow's oneDNN kernels on, unless they are
    on already or TF_ENABLE_ONEDNN_OPTS is set; `name` (the command) heads the one line it prints. TensorFlow
    decides at import, and without AVX-512 VNNI, BF16 or AMX it leaves them off, though on an AVX2-only CPU they
    made the 3D demo 1.7-1.9x, the 2D one 1.2-1.4x and a 3D registration 1.9x faster (README). For commands that
    resume nothing: the trainers keep TensorFlow's default (`onednn_enabled`)."""
    if "TF_ENABLE_ONEDNN_OPTS" in os.environ or onednn_enabled():
        return
    print(f"{name}: restarting with TensorFlow's oneDNN kernels on (TF_ENABLE_ONEDNN_OPTS=1; set it to 0 to keep "
          f"them off)", file=sys.stderr, flush=True)
    environment = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    installed = {os.path.realpath(folder) for folder in (*site.getsitepackages(), site.getusersitepackages(),
                                                         *map(sysconfig.get_paths().get, ("purelib", "platlib")))}
    if os.path.realpath(root) not in installed:  # a checkout (the working folder, a script's, an editable
        # install's): first on the path, so that the new process imports this cifl_tf, also under `python -P`;
        # not site-packages, which would then come before the standard library
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))
    os.execve(sys.executable, [sys.executable, *arguments], environment)
