import numpy as np
import pytest

from cifl_tf.checks import is_integer


@pytest.mark.parametrize("value, least, expected", [
    (3, None, True), (np.int64(3), None, True), (np.uint8(3), None, True), (-3, None, True),
    (True, None, False), (np.bool_(True), None, False),  # True would pass for 1
    (3.0, None, False), (np.float32(3), None, False), ("3", None, False), (None, None, False),
    (3, 3, True), (2, 3, False), (np.int64(0), 0, True), (-1, 0, False), (True, 1, False),
])
def test_is_integer(value, least, expected):
    assert is_integer(value, least) is expected
