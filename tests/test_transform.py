"""Batched dense transforms (cifl_tf.transform): NumPy reference, equality with voxelmorph's layers, VxmDense."""
import itertools

import numpy as np
import pytest

import cifl_tf
import tensorflow as tf
import voxelmorph as vxm
from cifl_tf import transform

SHAPES = [(9, 7), (5, 6, 4)]


def reference_interpolate(images, points, interp_method, fill_value):
    """Straight from the formula, one point at a time: images (B, *S, C), points (B, *P, ndim) -> (B, *P, C).

    linear:  p clamped to [0, S - 1];  f(p) = sum over the corners c in {floor(p), floor(p) + 1}^ndim
             (clamped) of  prod_d (1 - |p_d - floor(p_d) - (c_d - floor(p_d))|)  *  image[c]
    nearest: image[clamp(round_half_even(p))];  fill_value replaces points outside [0, S - 1];
    a point with a NaN coordinate (a diverged field) gives NaN.
    """
    shape = np.array(images.shape[1:-1])
    out = np.zeros((*points.shape[:-1], images.shape[-1]))
    for index in np.ndindex(*points.shape[:-1]):
        b, p = index[0], points[index].astype(np.float64)
        if np.isnan(p).any():
            out[index] = np.nan
            continue
        if fill_value is not None and (np.any(p < 0) or np.any(p > shape - 1)):
            out[index] = fill_value
            continue
        p = np.clip(p, 0, shape - 1)
        if interp_method == "nearest":
            out[index] = images[(b, *np.round(p).astype(int))]
            continue
        low, frac = np.floor(p).astype(int), p - np.floor(p)
        for corner in itertools.product((0, 1), repeat=len(shape)):
            weight = np.prod([f if c else 1 - f for f, c in zip(frac, corner)])
            voxel = np.minimum(low + corner, shape - 1)
            out[index] += weight * images[(b, *voxel)]
    return out


def random_case(shape, seed=0, spread=3.0):
    """Images (2, *shape, 2) and displacements (2, *shape, ndim) that send many points outside the image."""
    rng = np.random.default_rng(seed)
    images = rng.random((2, *shape, 2)).astype(np.float32)
    displacement = rng.normal(0, spread, (2, *shape, len(shape))).astype(np.float32)
    return images, displacement


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("interp_method, fill_value", [("linear", None), ("linear", -1.0), ("nearest", None),
                                                       ("nearest", 0.5)])
def test_interpolate_matches_the_formula(shape, interp_method, fill_value):
    images, displacement = random_case(shape)
    grid = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    points = grid + displacement
    points[0, 0, 0] = np.array(shape) - 1  # exactly on the last voxel: no weight beyond the border
    points[1, 0, 0] = 0.5  # a tie: nearest rounds half to even
    points[1, -1, -1, -1] = np.nan  # one coordinate of one point
    points[0, 1, 1] = (np.nan, -2.0, 1.0)[:len(shape)]  # NaN and outside: NaN, not the fill value
    assert np.any(points < 0) and np.any(points > np.array(shape) - 1)  # the border rules are exercised
    expected = reference_interpolate(images, points, interp_method, fill_value)
    got = transform.interpolate(tf.constant(images), tf.constant(points), interp_method, fill_value)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kwargs", [dict(), dict(interp_method="nearest"), dict(fill_value=0.3),
                                    dict(indexing="xy")])
def test_spatial_transformer_equals_voxelmorphs(shape, kwargs):
    images, displacement = random_case(shape)
    expected = vxm.layers.SpatialTransformer(**kwargs)([images, displacement])
    got = transform.SpatialTransformer(**kwargs)([images, displacement])
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_spatial_transformer_gradients_equal_voxelmorphs(shape):
    images, displacement = map(tf.constant, random_case(shape, spread=1.5))
    weights = np.random.default_rng(1).random(images.shape).astype(np.float32)  # moved has the images' shape

    def gradients(layer):
        with tf.GradientTape() as tape:
            tape.watch([images, displacement])
            loss = tf.reduce_sum(weights * layer([images, displacement]))
        return tape.gradient(loss, [images, displacement])

    for got, expected in zip(gradients(transform.SpatialTransformer()), gradients(vxm.layers.SpatialTransformer())):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("int_steps, indexing", [(0, "ij"), (5, "ij"), (5, "xy")])
def test_vecint_equals_voxelmorphs(shape, int_steps, indexing):
    velocity = random_case(shape)[1]
    expected = vxm.layers.VecInt(int_steps=int_steps, indexing=indexing)(velocity)
    got = transform.VecInt(int_steps=int_steps, indexing=indexing)(velocity)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("factor", [0.5, 2, 1])
def test_rescale_transform_equals_voxelmorphs(shape, factor):
    field = random_case(shape)[1]
    expected = vxm.layers.RescaleTransform(factor)(field)
    got = transform.RescaleTransform(factor)(field)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)


def _while_loops(model):
    """The while loops (tf.map_fn) in the graph of a model's forward pass."""
    specs = [tf.TensorSpec(x.shape, x.dtype) for x in model.inputs]
    graph = tf.function(model).get_concrete_function(specs).graph
    return [op.type for op in graph.get_operations() if "While" in op.type]


def test_vxm_dense_built_with_batched_layers_has_no_loops_and_the_same_outputs():
    kwargs = dict(inshape=(16, 16), nb_unet_features=[[4, 4], [4, 4, 4]], int_steps=3, int_resolution=2)
    stock = vxm.networks.VxmDense(**kwargs)
    with cifl_tf._compat.vxm_layers(transform.BATCHED_LAYERS):
        batched = vxm.networks.VxmDense(**kwargs)
    assert vxm.layers.SpatialTransformer is not transform.SpatialTransformer  # restored on exit
    assert _while_loops(stock) and not _while_loops(batched)
    batched.set_weights(stock.get_weights())
    rng = np.random.default_rng(0)
    pair = [rng.random((2, 16, 16, 1)).astype(np.float32) for _ in range(2)]
    stock.get_layer("vxm_dense_flow").bias.assign(tf.constant([1.5, -2.0]))  # a visible, non-zero field
    batched.get_layer("vxm_dense_flow").bias.assign(tf.constant([1.5, -2.0]))
    for got, expected in zip(batched(pair), stock(pair)):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)


def test_registration_model_uses_the_batched_layers():
    model = cifl_tf.registration_model((16, 16), nb_unet_features=[[4, 4], [4, 4, 4]], int_steps=2)
    assert isinstance(model, vxm.networks.VxmDense)
    assert not _while_loops(model)


def test_layers_round_trip_through_a_keras_file_in_safe_mode(tmp_path):
    images = tf.keras.Input((8, 8, 1))
    velocity = tf.keras.Input((8, 8, 2))
    field = transform.RescaleTransform(2)(transform.VecInt(int_steps=3)(transform.RescaleTransform(0.5)(velocity)))
    model = tf.keras.Model([images, velocity], transform.SpatialTransformer(fill_value=0.0)([images, field]))
    model.save(tmp_path / "warp.keras")
    loaded = tf.keras.models.load_model(tmp_path / "warp.keras", safe_mode=True)
    assert [type(layer) for layer in loaded.layers] == [type(layer) for layer in model.layers]
    inputs = [np.random.default_rng(0).random((1, 8, 8, c)).astype(np.float32) * c for c in (1, 2)]
    np.testing.assert_allclose(loaded(inputs).numpy(), model(inputs).numpy(), atol=1e-6)


@pytest.mark.parametrize("build, error, message", [
    (lambda: transform.SpatialTransformer(interp_method="cubic"), ValueError, "interp_method.*'cubic'"),
    (lambda: transform.VecInt(method="ode"), ValueError, "method.*'ode'"),
    (lambda: transform.VecInt(int_steps=-1), ValueError, "int_steps.*-1"),
    (lambda: transform.VecInt(indexing="ji"), ValueError, "indexing.*'ji'"),
    (lambda: transform.SpatialTransformer(indexing="ji"), ValueError, "indexing.*'ji'"),
    (lambda: transform.RescaleTransform(2, interp_method="cubic"), ValueError, "interp_method.*'cubic'"),
    (lambda: transform.RescaleTransform(0), ValueError, "zoom_factor.*0"),
    (lambda: transform.RescaleTransform(-0.5), ValueError, "zoom_factor.*-0.5"),
    (lambda: transform.RescaleTransform("2"), ValueError, "zoom_factor.*'2'"),
    (lambda: transform.RescaleTransform(float("inf")), ValueError, "zoom_factor.*inf"),
    (lambda: transform.interpolate(tf.zeros((1, 4, 4, 1)), tf.zeros((1, 4, 4, 3))), ValueError, "3 coordinates"),
    (lambda: transform.interpolate(tf.zeros((1, 4, 4, 1), tf.int32), tf.zeros((1, 4, 4, 2))), TypeError, "int32"),
    # broadcast before, where voxelmorph's layer refuses them
    (lambda: transform.SpatialTransformer()([np.zeros((1, 5, 4, 1), "f4"), np.zeros((2, 5, 4, 2), "f4")]), ValueError,
     r"images \(1, 5, 4, 1\) and points \(2, 5, 4, 2\) differ in batch size"),
    (lambda: transform.spatial_transform(np.zeros((3, 5, 4, 1), "f4"), np.zeros((2, 5, 4, 2), "f4")), ValueError,
     "differ in batch size"),
])
def test_bad_arguments_are_rejected_naming_the_value(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_numpy_arrays_are_taken_as_tensors():
    rng = np.random.default_rng(0)
    images, field = rng.random((1, 6, 7, 2), np.float32), rng.normal(0, 1, (1, 6, 7, 2)).astype(np.float32)
    np.testing.assert_array_equal(transform.spatial_transform(images, field),
                                  transform.spatial_transform(tf.constant(images), tf.constant(field)))
    for function, argument in ((transform.integrate_velocity, 3), (transform.rescale_field, 2)):
        np.testing.assert_array_equal(function(field, argument), function(tf.constant(field), argument))
