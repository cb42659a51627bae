"""`cifl demo --3d`: 3D demo brains registered across contrasts without training, in minutes on a CPU.

Two subjects of ``demo_data.demo_volumes`` (the MNI template, coarsened, each deformed by its own random
diffeomorphism): the T1 of subject 0 is registered by ``register_pair`` (instance optimisation, coarse to
fine) to the T1, T2-like and PD-like renders of subject 1, with the shipped 3D CIFL encoder (or a given
one), the same with MIND beside it (``FeatureStack``), the MIND descriptor, intensity NCC and intensity MI.
Scores: Dice per label of the moved label map against the fixed one, the share of folded voxels, seconds per
registration; "unregistered" is the Dice before registration, and "NCC X -> X" the reference the cross-contrast
rows are measured against: subject 0 rendered in the fixed image's contrast, registered by intensity NCC, what
that contrast allows without a contrast change (its T1 row repeats the NCC row's registration, so that every row
has every target).
"""
import os
import time

import numpy as np

from . import demo_data, figures, metrics
from .demo import _check_ndim, write_results
from .descriptors import MIND
from .encoder import pretrained
from .instance import register_pair
from .machine import describe, matmul_gflops
from .models import warp, warp_labels
from .stack import FeatureStack

TARGETS = ("t1", "t2", "pd")
UNREGISTERED = "unregistered"
SAME_CONTRAST = "NCC X -> X"  # subject 0 in the fixed image's contrast: the gap to it is the contrast change's
SIZES = {"demo": dict(voxel_size=3, levels=(4, 2, 1), steps=20),
         "quick": dict(voxel_size=8, levels=(1,), steps=2)}


def methods(encoder=None):
    """{name: (encoder, similarity)} as register_pair takes them: CIFL (`encoder`, by default the shipped
    3D encoder), CIFL with MIND beside it, MIND, intensity NCC and MI."""
    cifl = pretrained(ndim=3) if encoder is None else encoder
    return {"CIFL": (cifl, None), "CIFL + MIND": (FeatureStack([cifl, MIND(ndim=3)]), None),
            "MIND": (MIND(ndim=3), None), "NCC": (None, "ncc"), "MI": (None, "mi")}


def _scores(moved_labels, fixed_labels, displacement, seconds):
    dice = metrics.dice(moved_labels, fixed_labels, labels=range(1, len(demo_data.LABEL_NAMES)))
    return {"dice": {demo_data.LABEL_NAMES[label]: score for label, score in dice.items()},
            "mean_dice": float(np.mean(list(dice.values()))),
            "folding": metrics.folding_fraction(displacement), "seconds": seconds}


def _table(results, title):
    tissues = demo_data.LABEL_NAMES[1:]
    lines = [title, f"{'method':<14}{'fixed':<7}" + "".join(f"{t:>7}" for t in tissues)
             + f"{'mean':>7}{'folded %':>10}{'seconds':>9}"]
    for name, targets in results.items():
        for target, s in targets.items():
            lines.append(f"{name:<14}{target:<7}" + "".join(f"{s['dice'][t]:>7.3f}" for t in tissues)
                         + f"{s['mean_dice']:>7.3f}{100 * s['folding']:>10.3f}{s['seconds']:>9.1f}")
    return "\n".join(lines)


def run_demo_3d(out_dir="cifl-demo-3d", quick=False, seed=0, encoder=None, verbose=1):
    """Runs the 3D demo; returns {method: {target contrast: scores}} (see ``_scores``).

    Args:
        out_dir: folder for results.json, table.md and one figure per target, registrations_3d_{target}.png.
        quick: a smoke run (8 mm voxels, one level of two steps).
        seed: of the demo subjects.
        encoder: None for the shipped 3D encoder (``pretrained(ndim=3)``), or a 3D CIFL encoder of your
            own (a layer (B, X, Y, Z, 1) -> (B, X, Y, Z, C) with ``ndim`` 3).
        verbose: 1 prints a line per registration.
    """
    _check_ndim(encoder, 3, "the 3D demo")
    from .cli import _output_folder  # the CLI's check, imported here as the 2D demo does
    _output_folder(out_dir)  # an unusable folder fails now, not after the registrations
    start = time.perf_counter()
    sizes = SIZES["quick" if quick else "demo"]
    data = demo_data.demo_volumes(n_subjects=2, seed=seed, voxel_size=sizes["voxel_size"])  # checks the seed
    gflops = matmul_gflops()
    moving, (moving_labels, fixed_labels) = data.images["t1"][0], data.labels
    identity = np.zeros((*moving.shape, moving.ndim), np.float32)
    results = {UNREGISTERED: {t: _scores(moving_labels, fixed_labels, identity, 0.0) for t in TARGETS}}
    moved = {target: {} for target in TARGETS}

    def register(name, image, target, features, similarity):  # image: subject 0's, in some contrast
        began = time.perf_counter()
        field = register_pair(image, data.images[target][1], encoder=features, similarity=similarity,
                              levels=sizes["levels"], steps=sizes["steps"], verbose=0)
        seconds = time.perf_counter() - began
        labels = warp_labels(moving_labels[None], field[None])[0]
        results.setdefault(name, {})[target] = _scores(labels, fixed_labels, field, seconds)
        moved[target][name] = (warp(image[None, ..., None], field[None])[0, ..., 0], labels)
        if verbose:
            print(f"{name}, fixed {target}: mean Dice {results[name][target]['mean_dice']:.3f}, {seconds:.0f} s")

    for name, (features, similarity) in methods(encoder).items():
        for target in TARGETS:
            register(name, moving, target, features, similarity)
    for target in TARGETS:
        register(SAME_CONTRAST, data.images[target][0], target, None, "ncc")

    grid = "x".join(map(str, moving.shape))
    title = (f"3D registration without training (instance optimisation, levels {sizes['levels']}, "
             f"{sizes['steps']} steps each): T1 of subject 0 -> subject 1, {grid} voxels of {sizes['voxel_size']} mm; "
             f"{SAME_CONTRAST}: subject 0 in the fixed contrast, the reference; a method's first registration "
             f"(T1) includes tracing its levels' models, which later registrations reuse"
             + ("; --quick: a smoke run, whose fields move the labels by less than half a voxel, so that every row "
                "keeps the unregistered Dice" if quick else ""))
    seconds = time.perf_counter() - start
    note = (f"wall time {seconds:.0f} s; tf.matmul 2048^2 float32 in this run: "
            f"{gflops:.1f} GFLOP/s; {describe()}")
    text = "\n".join([_table(results, title), note])
    print("\n" + text)
    write_results(out_dir, text, {"seconds": seconds, "matmul_gflops": gflops, "seed": seed, "quick": quick,
                                  "shipped_encoder": encoder is None, "shape": list(moving.shape), **sizes,
                                  "results": results})
    _figures(out_dir, data.images, fixed_labels, moved)
    print(f"results and figures written to {out_dir}/, {time.perf_counter() - start:.0f} s in all")
    return results


def _figures(out_dir, images, fixed_labels, moved):
    for target, by_method in moved.items():
        figures.orthogonal_registrations(
            images[target][1], fixed_labels, {name: image for name, (image, _) in by_method.items()},
            {name: labels for name, (_, labels) in by_method.items()},
            os.path.join(out_dir, f"registrations_3d_{target}.png"),
            title=f"T1 (last row: {target}) onto {target} fixed")
