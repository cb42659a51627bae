"""cifl_tf.data.write_json: JSON written atomically."""
import json

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
