"""cifl_tf.data.write_json: JSON written atomically."""
import json

import numpy as np
import pytest

from cifl_tf.data import write_json


def test_write_json_replaces_the_file_or_leaves_it(tmp_path):
    path = tmp_path / "result.json"
    assert write_json(str(path), {"loss": 0.5, "shape": (32, 32)}) == str(path)
    assert json.loads(path.read_text()) == {"loss": 0.5, "shape": [32, 32]}
    with pytest.raises(TypeError):
        write_json(str(path), {"loss": object()})
    assert json.loads(path.read_text()) == {"loss": 0.5, "shape": [32, 32]}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left


def test_write_json_writes_nan_and_infinity_as_null_which_json_has(tmp_path):
    path = tmp_path / "scores.json"
    write_json(str(path), {"dice": [0.5, float("nan")], "nested": {"inf": np.float32("inf")}, "shape": (2, 3)})
    assert json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON")) == {
        "dice": [0.5, None], "nested": {"inf": None}, "shape": [2, 3]}
