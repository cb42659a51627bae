"""cifl_tf._compat: importing cifl_tf gives neurite/voxelmorph a Keras 2 tf.keras, whatever came first.

Each case runs in a fresh interpreter, since the Keras choice is made once per process.
"""
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # fresh interpreters

REPO = pathlib.Path(__file__).resolve().parents[1]

# What neurite and voxelmorph need once cifl_tf is imported.
KERAS2_WORKS = """
import inspect, neurite, voxelmorph, tensorflow as tf
from tensorflow.keras.losses import mean_absolute_error
assert tf.keras.layers.Dense.__module__.startswith("tf_keras"), tf.keras.layers.Dense.__module__
assert mean_absolute_error.__module__.startswith("tf_keras"), mean_absolute_error.__module__
assert inspect.getargspec(lambda a, b=1, *c: a) == (["a", "b"], "c", None, (1,))
"""


def run_python(code, **env):
    """Runs `code` in a fresh interpreter on the checkout, without TF_USE_LEGACY_KERAS unless given."""
    environ = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    environ.update(PYTHONPATH=os.pathsep.join([str(REPO), environ.get("PYTHONPATH", "")]),
                   TF_CPP_MIN_LOG_LEVEL="3", **env)
    return subprocess.run([sys.executable, "-c", code], env=environ, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("before, env", [
    ("", {}),                                                     # a fresh interpreter
    ("import tensorflow", {}),                                    # TF imported first, tf.keras unused
    ("import tensorflow as tf; tf.keras.layers.Dense(1)",         # tf.keras already used, as tf_keras
     {"TF_USE_LEGACY_KERAS": "1"}),
], ids=["fresh", "tensorflow-first", "tf_keras-already-used"])
def test_import_gives_keras2(before, env):
    result = run_python(f"{before}\nimport cifl_tf\n{KERAS2_WORKS}", **env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_import_after_keras3_use_says_what_to_do():
    result = run_python("import tensorflow as tf; tf.keras.layers.Dense(1)\nimport cifl_tf")
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: ")
    assert "Import cifl_tf before using tf.keras" in last_line and "TF_USE_LEGACY_KERAS=1" in last_line
