"""The invariance benchmark: do features of one anatomy agree across contrasts? (`experiments/invariance.py`)

Every pair of images the repository can make of the same anatomy in two contrasts (`benchmark_pairs`):

* demo: T1 against inverted T1, T2-like and PD-like renders of the demo brains (``demo_data``);
* oasis: the real OASIS sample's T1 against its inversion (``data.invert``), when the sample is present;
* hard: demo T1 against renders of the demo label maps in which two neighbouring tissues get nearly equal
  intensities (`near_equal_render`), as grey and white matter in PD, one pair per pair of tissues.

Each describer (B, H, W, 1) -> (B, H, W, K) is scored on each pair (`score`): raw intensities
(`intensity_features`), MIND and MIND-SSC (``descriptors.MIND``), the shipped CIFL encoders and any other.

    pairs, notes = benchmark_pairs()
    results = {name: {pair: score(describe, *images) for pair, images in pairs.items()}
               for name, describe in describers().items()}
    print(markdown(results, notes))
"""
import itertools
import json
import math
import os

import numpy as np
import scipy.ndimage as ndi
import tensorflow as tf

from . import data, metrics, models
from .descriptors import MIND
from .encoder import PRETRAINED_TAU_GAMMAS, load_encoder, pretrained
from .experiments import method_name
from .training import NON_NEGATIVE_INTEGER, POSITIVE_INTEGER, train_encoder

METRICS = {
    "match": "match@2px: share of brain pixels whose nearest feature in the other contrast lies within 2 px",
    "agreement": "agreement: mean cosine of the two feature vectors at the same pixel (1: identical features)",
    "zero_input_cosine": "zero-input cosine: cosine between the channel images of a slice (either contrast) and "
                         "those of an all-zero input, 1 when features ignore the image (the shortcut of method "
                         "page 3b); an all-zero input gives MIND and intensities constant channels, so for them it "
                         "is only the share of each channel's energy in its mean, not a shortcut",
}


def oasis_sample():
    """Where the real OASIS sample is looked for: $CIFL_OASIS_SAMPLE, else ../shared/data/oasis-sample
    beside the repository (as the tests read it)."""
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("CIFL_OASIS_SAMPLE", os.path.join(os.path.dirname(repository), "shared", "data",
                                                            "oasis-sample"))


def oasis_slice_pair(folder):
    """The 2D slices of a neurite-oasis folder (``data.load_oasis``) for registering subject 1 and 2; DataError
    for a folder of fewer subjects."""
    slices = data.load_oasis(folder, dim=2)
    if len(slices.subjects) < 2:
        raise data.DataError(f"{folder}: holds {len(slices.subjects)} subject; registration needs two")
    return slices


def intensity_features(images):
    """Raw intensities as unit 2-vectors: (B, *spatial, 1) in [0, 1] -> (B, *spatial, 2).

    x -> (cos(pi x / 2), sin(pi x / 2)): the dot product of two pixels is cos(pi (x - y) / 2), so the
    nearest feature is the nearest intensity and agreement is 1 only for equal intensities.
    """
    angle = np.pi / 2 * np.asarray(images, np.float32)[..., 0]
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1)


def score(describe, images_a, images_b, masks):
    """How contrast invariant a describer is on the same anatomy in two contrasts (means over images).

    Args:
        describe: callable (B, H, W, 1) -> (B, H, W, K), e.g. a CIFLEncoder or a MIND layer.
        images_a, images_b: (N, H, W) images in [0, 1], image n of both of the same anatomy.
        masks: (N, H, W) booleans, e.g. the brain.

    Returns: {"match": `metrics.match_fraction` within 2 px, "agreement": `metrics.feature_agreement`,
    "zero_input_cosine": see ``METRICS``}.
    """
    images_a, images_b = (np.asarray(x, np.float32)[..., np.newaxis] for x in (images_a, images_b))
    features_a, features_b = np.asarray(describe(images_a)), np.asarray(describe(images_b))
    zero = np.asarray(describe(np.zeros_like(images_a[:1])))[0].reshape(-1, features_a.shape[-1])

    def zero_input_cosine(features):  # mean over channels and over the two contrasts
        channels = features.reshape(2, -1, features.shape[-1])
        return np.mean(np.sum(channels * zero, 1) / (np.linalg.norm(channels, axis=1) * np.linalg.norm(zero, axis=0)
                                                     + 1e-9))

    scores = [(metrics.match_fraction(fa, fb, mask), metrics.feature_agreement(fa, fb, mask),
               zero_input_cosine(np.stack([fa, fb]))) for fa, fb, mask in zip(features_a, features_b, masks)]
    return dict(zip(METRICS, np.mean(scores, axis=0).tolist()))


def near_equal_render(labels, near, gap=0.05, blur=1.0, noise_std=0.02, seed=0):
    """Renders label maps so that two chosen labels get nearly equal intensities, the others far from them.

    Per image: the labels `near` get means m and m + gap (m uniform in [0.4, 0.6], which of the two is
    brighter at random); every other foreground label a mean 0.2-0.35 above or below m, at random, and the
    background 0. Then partial-volume blur, Gaussian noise, background 0 and maximum 1, like the demo contrasts.

    Args:
        labels: (N, *spatial) integer label maps (2D or 3D), 0 background.
        near: the two labels made nearly equal, e.g. (2, 3) for grey and white matter.
        gap: their difference in mean intensity (relative to the image maximum before noise).
        blur: SD in pixels (voxels) of the Gaussian partial-volume blur.
        noise_std: SD of the Gaussian noise.

    Returns: (N, *spatial) float32 in [0, 1].
    """
    labels = np.asarray(labels)
    if len(set(near)) != 2 or not set(near) <= set(np.unique(labels)) - {0}:
        raise ValueError(f"near must be two different foreground labels of the maps, got {near!r}")
    rng = np.random.default_rng(seed)
    renders = []
    for label_map in labels:
        middle = rng.uniform(0.4, 0.6)
        means = middle + rng.choice([-1, 1], label_map.max() + 1) * rng.uniform(0.2, 0.35, label_map.max() + 1)
        means[list(near)] = middle + rng.permutation([0, gap])
        means[0] = 0
        image = ndi.gaussian_filter(means[label_map], blur) + rng.normal(0, noise_std, label_map.shape)
        renders.append(np.clip(image, 0, None) * (label_map > 0))
    renders = np.asarray(renders, np.float32)
    return renders / renders.max(axis=tuple(range(1, renders.ndim)), keepdims=True)


SEG4_GM_WM = (1, 3)  # seg4 cortical grey matter and white matter


def slice_contrasts(image, seg4):
    """A real T1 slice in the registration benches' contrasts (bench/similarity.py, bench/moved_features.py):
    {"T1": image, "inverted T1", "GM≈WM": its seg4 labels rendered with cortical grey and white matter nearly
    equal (`near_equal_render`), as in PD}, each (H, W)."""
    return {"T1": image, "inverted T1": data.invert(image), "GM≈WM": near_equal_render(seg4[None], SEG4_GM_WM)[0]}


def registered_dice(displacement, moving_labels, fixed_labels):
    """Mean Dice of the moving label map warped by a register_pair displacement (nearest neighbour) against the
    fixed one; label maps (*spatial), displacement (*spatial, ndim)."""
    return metrics.mean_dice(models.warp_labels(np.asarray(moving_labels)[None], displacement[None])[0], fixed_labels)


def benchmark_pairs(subjects=8, oasis=None, seed=0):
    """Every pair of contrasts of the same anatomy the benchmark scores (see the module doc).

    Args:
        subjects: demo subjects (the hard pairs use the same ones).
        oasis: a neurite-oasis folder; None: the real sample (`oasis_sample`), skipped with a note when it
            is absent.
        seed: of the demo subjects and the hard renders.

    Returns: ({pair name: (images_a, images_b, brain masks), each (N, H, W)}, [notes on skipped pairs]).
    """
    from . import demo_data  # needs nilearn

    demo = demo_data.demo_dataset(n_subjects=subjects, seed=seed)
    t1, brain = demo.images["t1"], demo.labels > 0
    pairs = {f"demo T1 / {demo_data.CONTRAST_NAMES[contrast]}": (t1, demo.images[contrast], brain)
             for contrast in demo_data.CONTRASTS[1:]}
    notes = []
    if oasis is None and not os.path.isdir(oasis_sample()):
        notes.append(f"OASIS T1 / inverted T1 skipped: no OASIS sample at {oasis_sample()} (set "
                     f"CIFL_OASIS_SAMPLE or --data)")
    else:
        sample = data.load_oasis(oasis or oasis_sample(), dim=2)
        empty = [subject for subject, labels in zip(sample.subjects, sample.labels) if not labels.any()]
        if empty:  # its brain mask, where the metrics are taken, would be empty
            raise data.DataError(f"{oasis or oasis_sample()}: the label map of {empty[0]} is background (0) only")
        pairs["OASIS T1 / inverted T1"] = (sample.images, np.stack([data.invert(x) for x in sample.images]),
                                           sample.labels > 0)
    for near in itertools.combinations(range(1, len(demo_data.LABEL_NAMES)), 2):
        name = "≈".join(demo_data.LABEL_NAMES[label] for label in near)
        pairs[f"hard T1 / {name}"] = (t1, near_equal_render(demo.labels, near, seed=seed), brain)
    return pairs, notes


def describers(encoders=()):
    """{name: describer}: intensities, MIND, MIND-SSC, the shipped encoders (the paper's sweep and the
    recommended one) and encoders read from `encoders` (run folders or weights files, named by their path)."""
    return {"intensity": intensity_features, "MIND": MIND(), "MIND-SSC": MIND(variant="ssc"),
            **{method_name(tau): pretrained(tau) for tau in PRETRAINED_TAU_GAMMAS}, "recommended": pretrained(),
            **{path: load_encoder(path) for path in encoders}}


def markdown(results, notes=()):
    """One Markdown table per metric: a row per pair and a mean row, a column per describer."""
    names = list(results)
    pairs = list(results[names[0]])
    lines = []
    for metric, meaning in METRICS.items():
        lines += [f"**{meaning}**", "", "| pair | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {pair} | " + " | ".join(f"{results[name][pair][metric]:.3f}" for name in names) + " |"
                  for pair in pairs]
        lines += ["| **mean** | " + " | ".join(f"{np.mean([s[metric] for s in results[name].values()]):.3f}"
                                              for name in names) + " |", ""]
    return "\n".join(lines + [f"*{note}*" for note in notes])


def main(argv=None):
    """Command line of experiments/invariance.py: scores every describer on every pair, writes the tables."""
    from .cli import _OneLineParser  # one-line errors, as the CLI gives

    parser = _OneLineParser(description="Contrast invariance of intensities, MIND and CIFL encoders on "
                                        "the same anatomy in two contrasts")
    parser.add_argument("--data", default=None,
                        help="neurite-oasis folder for the real T1 / inverted T1 pair (default: the OASIS sample, "
                             "$CIFL_OASIS_SAMPLE or ../shared/data/oasis-sample, skipped when absent)")
    parser.add_argument("--subjects", type=int, default=8, help="demo subjects (default: 8)")
    parser.add_argument("--encoder", action="append", default=[],
                        help="also an encoder of yours: a train-encoder run folder or weights file (repeatable)")
    parser.add_argument("--offset-ablation", type=int, default=0, metavar="STEPS",
                        help="also train two encoders for STEPS steps, with the random offset (16 px) "
                             "and without it (voxel-aligned views)")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    args = parser.parse_args(argv)
    try:
        from .cli import _check_options, _output_folder  # the CLI's checks, imported here as the demo does
        from .demo import _check_ndim  # downstream.py's: both score 2D slices

        _check_options(args, {"subjects": POSITIVE_INTEGER, "offset_ablation": NON_NEGATIVE_INTEGER})
        _output_folder(args.out)  # before the scoring, not after it
        compared = describers(args.encoder)
        for path in args.encoder:  # before any pair is made and scored: a 3D encoder fails on 2D slices
            _check_ndim(compared[path], 2, f"--encoder {path}: the invariance benchmark")
        pairs, notes = benchmark_pairs(args.subjects, args.data)
        for offset in (16, 0) if args.offset_ablation else ():
            compared[f"max_offset={offset}, {args.offset_ablation} steps"] = train_encoder(
                steps=args.offset_ablation, steps_per_epoch=math.gcd(args.offset_ablation, 100), max_offset=offset,
                seed=0, verbose=2)
    except (ValueError, OSError, ImportError) as error:  # bad data, arguments, no nilearn: one line
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    progress = tf.keras.utils.Progbar(len(compared) * len(pairs), unit_name="describer and pair")
    results = {name: {} for name in compared}
    for (name, describe), (pair, images) in itertools.product(compared.items(), pairs.items()):
        results[name][pair] = score(describe, *images)
        progress.add(1)
    text = markdown(results, notes)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "invariance.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "invariance.json"), "w") as f:
        json.dump({"pairs": list(pairs), "notes": notes, "metrics": METRICS, "results": results}, f, indent=2)
    print(f"results written to {args.out}/")
    return results
