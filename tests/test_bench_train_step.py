"""bench/train_step.py's FLOP count, which its step/matmul ratios divide by."""
import os
import runpy

import pytest

import cifl_tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
conv_flops = runpy.run_path(os.path.join(ROOT, "bench", "train_step.py"))["conv_flops"]


@pytest.mark.parametrize("shape, architecture, dilations, widths", [
    # 2 x pixels x kernel taps x sum of (in x out) over the convolutions, written out from the layers' widths
    ((96, 96), "paper", None, [(1, 32)] + [(32, 32)] * 6 + [(32, 16)]),
    ((96, 96), "context", (2, 4, 8, 16), [(1, 32)] + [(32, 32)] * 10 + [(32, 16)]),
    ((20, 24), "context", (2,), [(1, 32)] + [(32, 32)] * 7 + [(32, 16)]),
    ((8, 10, 12), "paper", None, [(1, 32)] + [(32, 32)] * 6 + [(32, 16)]),
])
def test_conv_flops_counts_every_kernel_weight_at_every_pixel(shape, architecture, dilations, widths):
    encoder = cifl_tf.CIFLEncoder(ndim=len(shape), architecture=architecture, dilations=dilations)
    encoder.build((1, *shape, 1))
    pixels, taps = 1, 3 ** len(shape)
    for size in shape:
        pixels *= size
    assert conv_flops(encoder, shape) == 2 * pixels * taps * sum(a * b for a, b in widths)
