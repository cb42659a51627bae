"""The one place where cifl_tf patches its environment.

neurite 0.2 and voxelmorph 0.2 are the last TensorFlow releases of both and target the
Keras 2 API (``tf_keras``). Two things stand between them and TF 2.21 on Python 3.11:

* ``inspect.getargspec`` was removed in Python 3.11 (neurite's ``modelio`` still calls it);
* ``tensorflow.keras`` resolves to Keras 3 unless ``TF_USE_LEGACY_KERAS=1`` is set before
  ``tensorflow`` is imported.

A third patch is scoped: ``vxm_layers`` lets voxelmorph's networks build other layers (they look theirs up
on ``vxm.layers`` and take no option to use others).
"""
import collections
import contextlib
import importlib
import inspect
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"

if not hasattr(inspect, "getargspec"):
    ArgSpec = collections.namedtuple("ArgSpec", "args varargs keywords defaults")

    def _getargspec(func):
        spec = inspect.getfullargspec(func)
        return ArgSpec(spec.args, spec.varargs, spec.varkw, spec.defaults)

    inspect.getargspec = _getargspec


_HOW_TO_FIX = (
    "cifl_tf needs the Keras 2 API (tf_keras), but tensorflow.keras was already used as Keras 3 "
    "in this process. Import cifl_tf before using tf.keras, or set TF_USE_LEGACY_KERAS=1 in the "
    "environment before starting Python."
)


def _point_tensorflow_keras_at_tf_keras():
    """Make ``tensorflow.keras`` mean tf_keras when TF was imported before us.

    TF decides at import time which Keras its ``keras`` attribute and package path lead to.
    While nothing has resolved ``tf.keras`` yet, redoing that decision is safe.
    """
    tf = sys.modules["tensorflow"]
    loader = tf.__dict__.get("keras")
    if getattr(loader, "_tfll_initialized", True):  # resolved: the loader, or already the module
        version = getattr(loader, "_tfll_keras_version", None) or getattr(loader, "__name__", "")
        if not version.startswith("tf_keras"):
            raise ImportError(_HOW_TO_FIX)
        return
    tf_keras_api = os.path.dirname(importlib.import_module("tf_keras.api._v2.keras").__file__)
    tf_keras_api = os.path.dirname(tf_keras_api)  # the folder holding the `keras` package
    for name in [m for m in sys.modules if m == "tensorflow.keras" or m.startswith("tensorflow.keras.")]:
        del sys.modules[name]
    tf.__path__ = [tf_keras_api] + [p for p in tf.__path__ if p != tf_keras_api]
    tf.keras = importlib.import_module("tensorflow.keras")


if "tensorflow" in sys.modules:
    _point_tensorflow_keras_at_tf_keras()


@contextlib.contextmanager
def vxm_layers(replacements):
    """Within, ``vxm.layers.NAME`` is ``replacements[NAME]``, so voxelmorph's networks build those layers.

    The attributes are restored on exit; models built inside stay voxelmorph's own classes.
    """
    import voxelmorph as vxm

    stock = {name: getattr(vxm.layers, name) for name in replacements}
    for name, layer in replacements.items():
        setattr(vxm.layers, name, layer)
    try:
        yield
    finally:
        for name, layer in stock.items():
            setattr(vxm.layers, name, layer)
