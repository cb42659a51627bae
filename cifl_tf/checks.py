"""What the public functions take for an integer: Python's or NumPy's, never a bool (True would pass for 1)."""
import numbers


def is_integer(value, least=None):
    """Whether `value` is an integer, Python's or NumPy's but not a bool, and at least `least` where given."""
    return (isinstance(value, numbers.Integral) and not isinstance(value, bool)
            and (least is None or bool(value >= least)))
