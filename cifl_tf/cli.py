"""The `cifl` console command.

Each sub-command is a function `_name(args)` registered in `_parser()`. Errors that a user can fix
(bad files, bad arguments) surface as one line on stderr and exit status 2, with no traceback.
"""
import argparse
import inspect
import json
import math
import os
import signal
import sys
import tempfile

import numpy as np
import tensorflow as tf
import voxelmorph as vxm

from . import checkpoint, data, machine, models, tiling
from .callbacks import StopOnNonFinite
from .descriptors import MIND, VARIANTS
from .encoder import ARCHITECTURES, PRETRAINED_NAMES, PRETRAINED_TAU_GAMMAS, load_encoder, pretrained
from .evaluate import evaluate_registration, evaluate_segmentation, segment
from .instance import MOVED_FEATURES, register_pair
from .metrics import folding_fraction
from .stack import FeatureStack
from .training import (LEARNING_RATE_DECAYS, POSITIVE_INTEGER, POSITIVE_NUMBER, PRECISIONS, SETTINGS, read_settings,
                       train_encoder)


def _defaults(function):
    """{argument: default} of a function, so that the command line defaults are the Python API's."""
    return {name: p.default for name, p in inspect.signature(function).parameters.items()}


DEFAULTS = _defaults(train_encoder)
REGISTER_DEFAULTS = _defaults(register_pair)


def _shape(text):
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 96x96 or 64x64x64, got {text!r}")
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape must be 2 or 3 positive sizes, got {text!r}")
    return shape


def _positive_int(text):
    """An argparse type: one positive integer (the bench/ scripts' counts use it too)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _positive_integers(name, example):
    """An argparse type: comma-separated positive integers such as `example`, as a list."""
    def parse(text):
        try:
            values = [int(s) for s in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must look like {example}, got {text!r}") from None
        if min(values) < 1:
            raise argparse.ArgumentTypeError(f"{name} must be positive integers, got {text!r}")
        return values
    return parse


def _json_object(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"tie_prob\": 0.5}}', got {text!r}")
    return value


# settings.json keys whose train-encoder option is not named after them
_OPTION_OF_SETTING = {"use_bias": "--no-bias", "synth_kwargs": "--synth"}


def _given_settings(args):
    """The training settings given as train-encoder options, as settings.json holds them. Options left out
    are None (their defaults are train_encoder's), so that --resume tells a repeated setting from a default."""
    given = {key: getattr(args, key) for key in SETTINGS if key not in _OPTION_OF_SETTING}
    given.update(use_bias=False if args.no_bias else None, synth_kwargs=args.synth)
    init = given.get("init")
    if init is not None and init not in PRETRAINED_NAMES:  # absolute, as train-seg's paths (also once deleted)
        given["init"] = os.path.abspath(init)
    return json.loads(json.dumps({key: value for key, value in given.items() if value is not None}))


def _train_encoder(args):
    _output_folder(args.out)
    given = _given_settings(args)
    dim = args.dim or len(given.get("shape", [96] * 2))
    if len(given.get("shape", [96] * dim)) != dim:
        raise ValueError(f"--shape {'x'.join(map(str, given['shape']))} does not have --dim {dim} sizes")
    if not args.resume:
        settings = {key: DEFAULTS[key] for key in SETTINGS} | {"shape": [96] * dim} | given
    else:  # the run goes on with the settings it was started with; options may only repeat them
        settings = read_settings(args.out)
        stored = dict(given)
        if "steps_per_epoch" in given:  # train_encoder stores it at most steps
            stored["steps_per_epoch"] = min(given["steps_per_epoch"], given.get("steps", settings["steps"]))
        conflicts = [f"{_OPTION_OF_SETTING.get(key, '--' + key.replace('_', '-'))}"
                     f"{'' if isinstance(value, bool) else ' ' + str(value)} differs from its {key} {settings[key]}"
                     for key, value in given.items() if stored[key] != settings[key]]
        if args.dim is not None and "shape" not in given and args.dim != len(settings["shape"]):
            conflicts.append(f"--dim {args.dim} differs from its shape {settings['shape']}")
        if conflicts:  # ignoring them would leave e.g. a longer --steps believed but not trained
            raise ValueError(f"--resume continues the run in {args.out} with its settings.json: "
                             f"{'; '.join(conflicts)}; leave those options out, or start a new run")
    train_encoder(out_dir=args.out, resume=args.resume, strategy=args.strategy, **settings)


# ---- downstream: NIfTI files in, NIfTI files out (intensities normalised as in training) ----

def encoder_from_args(args, ndim, images):
    """What --encoder, --pretrained or --descriptor (`_add_encoder_args`) chose for ndim-D images; `images` names
    them (a file, or a data folder) in the error for an --encoder of another ndim.

    Returns a frozen CIFLEncoder or Triplanar (--pretrained on 3D images, or a saved one), a saved FeatureStack,
    a descriptors.MIND of that ndim, or None for the intensity baseline.
    """
    if args.descriptor is not None:
        return MIND(ndim, variant=args.descriptor)
    if args.pretrained is not None:
        return pretrained(args.pretrained, ndim=ndim)
    if args.encoder is None:
        return None
    encoder = load_encoder(args.encoder)
    if encoder.ndim != ndim:
        raise ValueError(f"{images}: has {ndim} dimensions, --encoder {args.encoder} is {encoder.ndim}D")
    return encoder


def _images_of(args):
    return f"{args.data} (its images)"


def _stacked(args, encoder, ndim):
    """`encoder` (None: the recommended shipped one) with --stack-descriptor's descriptor beside it, a
    FeatureStack; without --stack-descriptor, `encoder` as it is."""
    if args.stack_descriptor is None:
        return encoder
    for option, given in (("--descriptor", args.descriptor),
                          ("a saved FeatureStack", isinstance(encoder, FeatureStack))):
        if given:
            raise ValueError(f"--stack-descriptor stacks a descriptor beside a CIFL encoder, not beside {option}")
    encoder = encoder or pretrained(ndim=ndim)
    # the encoder's ndim, so that a 2D encoder on a volume is refused as it is without --stack-descriptor
    return FeatureStack([encoder, MIND(encoder.ndim, variant=args.stack_descriptor)])


def _add_stack_arg(p):
    p.add_argument("--stack-descriptor", choices=VARIANTS, default=None,
                   help="a hand-made descriptor (mind or ssc) beside the encoder, their features concatenated and "
                        "l2-normalised together (cifl_tf.FeatureStack); for registration the recommended encoder "
                        "with mind did better than the encoder alone in all cases measured but one, and than MIND "
                        "in most (docs/registration.md)")


_RECOMMENDED = "the recommended shipped encoder of the images' dimension, cifl_tf.pretrained(ndim=...)"


def _add_encoder_args(p, default="none, the raw-intensity baseline"):
    """Adds --encoder, --pretrained and --descriptor as a mutually exclusive group, and returns the group."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--encoder", default=None,
                       help=f"CIFL encoder: weights file or train-encoder run folder (default: {default})")
    group.add_argument("--pretrained", type=float, choices=PRETRAINED_TAU_GAMMAS, default=None, metavar="TAU",
                       help=f"the shipped 2D encoder of the paper's sweep trained with tau_gamma TAU, one of "
                            f"{PRETRAINED_TAU_GAMMAS} (for 3D images in features and register, its tri-planar features)")
    group.add_argument("--descriptor", choices=VARIANTS, default=None,
                       help="a hand-made descriptor instead of an encoder: mind (MIND, Heinrich et al. 2012) or "
                            "ssc (MIND-SSC, Heinrich et al. 2013)")
    return group


def _try_writing_in(folder, path):
    """OSError naming `path` unless a file can be created in `folder` (permissions alone do not
    show it: root may write anywhere, but not under /proc or on a read-only mount)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OSError(f"{path}: cannot write in {folder} ({error.strerror})") from None


def _output_file(path):
    """Checks an output file path before any work, so that a bad one leaves nothing half written."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder, not a file to write")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: no such folder to write to")
    data.check_file_name(path)
    _try_writing_in(folder, path)


def _output_folder(folder):
    """Checks an output folder before any work: it, or the nearest parent that exists, takes files."""
    if not folder:
        raise ValueError("the output folder is an empty name (an unset shell variable?)")
    existing = folder
    while not os.path.lexists(existing):  # the missing part is made when the results are written
        existing = os.path.dirname(os.path.abspath(existing))
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{folder}: {existing} is not a folder")
    _try_writing_in(existing, folder)


def _levels(text):
    """--levels: pooling factors, coarse to fine, such as 4,2,1."""
    try:
        return tuple(int(factor) for factor in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected pooling factors such as 4,2,1, got {text!r}")


def _bytes(text):
    """--max-memory: a number of bytes, optionally with a K, M or G suffix (powers of 1024)."""
    scale = 1024 ** ("KMG".index(text[-1].upper()) + 1) if text[-1:].upper() in ("K", "M", "G") else 1
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes such as 1073741824 or 1G, got {text!r}")
    if not 1 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of bytes, at least one, got {text!r}")
    return int(value)


def _max_memory(args):
    """--max-memory, or its default where it was not given (None: so that a model without an encoder refuses it)."""
    return tiling.DEFAULT_MAX_MEMORY if args.max_memory is None else args.max_memory


def _add_memory_arg(p):
    p.add_argument("--max-memory", type=_bytes, metavar="BYTES",
                   help="memory for encoder activations: the image is encoded tile by tile within it; "
                        "registration with warped features (3D) also holds about this much of an image's "
                        "features at a time (with encoded ones, the 2D default, it encodes whole images) "
                        "(e.g. 512M; default 1G)")


def _nifti_output(path, inputs):
    """Checks an output NIfTI path before any work; `inputs` ({option: path}) are the files it must not replace."""
    if not path.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: output must end in .nii or .nii.gz")
    for option, given in inputs.items():
        if os.path.realpath(path) == os.path.realpath(given):
            raise ValueError(f"{path} is the {option} image: the output would overwrite it")
    _output_file(path)


def _model_input(path, model):
    """(image as read, affine, header) of a NIfTI file checked against the model's input shape."""
    image, affine, header = data.load_nifti(path, ndim=len(model.inshape))
    if image.shape != model.inshape:
        raise data.DataError(f"{path}: shape {image.shape} differs from the model's input shape {model.inshape}")
    return image, affine, header


def _normalized_batch(image):
    """(1, *shape, 1): the image normalised to [0, 1] as the data loaders do for training."""
    return data.normalize(image)[np.newaxis, ..., np.newaxis]


def _features(args):
    _nifti_output(args.output, {"input": args.input})
    image, affine, header = data.load_nifti(args.input)
    if image.ndim not in (2, 3):
        raise data.DataError(f"{args.input}: has {image.ndim} dimensions {header.get_data_shape()}, features need 2 or 3")
    encoder = _stacked(args, encoder_from_args(args, image.ndim, args.input), image.ndim) \
        or pretrained(ndim=image.ndim)
    image = data.normalize(image)
    # Written straight into the file: features of a large volume need not fit in memory. On the input's own
    # axes, singletons included (a 1 x H x W slice), so that its affine places them.
    spatial = data.file_axes(header)
    max_memory = _max_memory(args)
    data.save_nifti_channels(
        args.output, spatial + (encoder.channels,), lambda out: tiling.tiled_features(
            encoder, image, max_memory, out[tuple(0 if n == 1 else slice(None) for n in spatial)]),
        affine, header)
    print(f"{encoder.channels}-channel features written to {args.output}")


def _segment(args):
    _nifti_output(args.output, {"input": args.input})
    model = models.load_model(args.model, "segmentation")
    image, affine, header = _model_input(args.input, model)
    if model.encoder is None and args.max_memory is not None:
        raise ValueError(f"--max-memory bounds the features of a model's encoder, and {args.model} has none (an "
                         f"intensity baseline, run on the whole image)")
    max_memory = None if model.encoder is None else _max_memory(args)
    labels = segment(model, _normalized_batch(image), max_memory=max_memory)[0]
    labels = labels.astype(np.uint8 if model.nb_labels <= 256 else np.int32)
    data.save_nifti(args.output, labels.reshape(header.get_data_shape()), affine, header)
    print(f"label map written to {args.output}")


def _on_fixed_grid(moving_path, fixed_path, inshape=None):
    """(moving, fixed, affine, header): the moving image resampled (linear) onto the fixed image's voxel grid
    (``data.resample_onto``), with the fixed image's affine and header. `inshape`: the shape a registration model
    takes, checked first."""
    fixed = data.load_nifti(fixed_path, ndim=None if inshape is None else len(inshape))
    if fixed[0].ndim not in (2, 3):
        raise data.DataError(f"{fixed_path}: registration needs a 2D or 3D image, got shape {fixed[0].shape}")
    if inshape is not None and fixed[0].shape != inshape:
        raise data.DataError(f"{fixed_path}: shape {fixed[0].shape} differs from the model's input shape {inshape}")
    *on_grid, share = data.resample_onto(moving_path, fixed_path, grid=fixed)  # the fixed image read once
    if round(100 * share, 1) < 100:  # the rest takes the moving image's background; a small share: a wrong affine?
        print(f"{'warning: ' if share < 0.5 else ''}{moving_path} covers {100 * share:.1f}% of the field of view of "
              f"{fixed_path} where their affines place it", file=sys.stderr if share < 0.5 else sys.stdout)
    return tuple(on_grid)


def _register(args):
    for path in filter(None, (args.moved, args.warp)):
        _nifti_output(path, {"--moving": args.moving, "--fixed": args.fixed})
    if args.warp and os.path.realpath(args.warp) == os.path.realpath(args.moved):
        raise ValueError(f"--moved and --warp are the same file {args.warp}: the displacement would overwrite the "
                         f"moved image")
    if args.model:
        for option, given in (("--levels", args.levels is not None), ("--steps", args.steps is not None),
                              ("--max-memory", args.max_memory is not None),
                              ("--equalize", args.equalize),
                              ("--affine", args.affine), ("--feature-scale", args.feature_scale is not None),
                              ("--moved-features", args.moved_features is not None),
                              ("--stack-descriptor", args.stack_descriptor is not None)):
            if given:
                raise ValueError(f"{option} is an option of instance optimisation, not of a --model")
        model = models.load_model(args.model, "registration")
        moving, fixed, affine, header = _on_fixed_grid(args.moving, args.fixed, tuple(model.inshape))
        _check_not_constant(args, moving, fixed)
        displacement = model.register(_normalized_batch(moving), _normalized_batch(fixed))[0]
    else:
        moving, fixed, affine, header = _on_fixed_grid(args.moving, args.fixed)
        encoder = _registration_encoder(args, fixed.ndim)
        _check_not_constant(args, moving, fixed)
        displacement = register_pair(data.normalize(moving), data.normalize(fixed), encoder, similarity=args.intensity,
                                     levels=args.levels, affine=args.affine,
                                     steps=REGISTER_DEFAULTS["steps"] if args.steps is None else args.steps,
                                     moved_features=args.moved_features, feature_scale=args.feature_scale or 1,
                                     max_memory=_max_memory(args), equalize=args.equalize)
    moved = models.warp(moving[np.newaxis, ..., np.newaxis], displacement[np.newaxis])[0, ..., 0]
    outputs = [(args.moved, data.nifti_writer(args.moved, moved.reshape(header.get_data_shape()), affine, header))]
    if args.warp:
        outputs.append((args.warp, data.nifti_writer(
            args.warp, displacement.reshape(data.file_axes(header) + displacement.shape[-1:]), affine, header,
            channels=True)))
    data.write_all_atomically(outputs)  # both or neither
    voxels = math.prod(displacement.shape[:-1])
    folded = round(folding_fraction(displacement) * voxels)  # a count: one voxel of millions rounds to 0.000%
    print(f"moved image written to {args.moved}" + (f", displacement to {args.warp}" if args.warp else "")
          + f"; folded voxels: {folded} of {voxels} ({100 * folded / voxels:.3f}%)")


def _check_not_constant(args, moving, fixed):
    """DataError for an image with one value on the fixed grid (a blank file or mask): registering to it, NCC's zero
    padding at the border would still move the image."""
    for path, image in ((args.moving, moving), (args.fixed, fixed)):
        if image.min() == image.max():
            raise data.DataError(f"{path}: every voxel on the fixed grid holds {image.min():g}: nothing to register")


def _registration_encoder(args, ndim):
    """register_pair's encoder: the chosen encoder or descriptor (with --stack-descriptor's beside it), None for
    --intensity, else "pretrained"."""
    if args.intensity and args.stack_descriptor:
        raise ValueError("--stack-descriptor stacks a descriptor beside a CIFL encoder, not beside --intensity")
    if args.intensity:
        return None
    return _stacked(args, encoder_from_args(args, ndim, args.fixed), ndim) or "pretrained"


# ---- downstream: training and evaluation on a data folder ----

def _split_sizes(text):
    """--split: three subject counts (232,58,100) or fractions (0.6,0.15,0.25)."""
    try:
        return data.parse_split(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--{error}")


def _dataset(args, contrast, dim):
    """The images of --data in `contrast` ("inverted": T1 with inverted contrast)."""
    source = "t1" if contrast == "inverted" else contrast
    if not os.path.exists(args.data):  # a list file or a folder: either may be meant
        raise data.DataError(f"{args.data}: no such file or folder")
    if os.path.isfile(args.data):
        if source != "t1":
            raise ValueError(f"{args.data}: a list of image,labels pairs has no contrast {contrast!r}")
        dataset = data.load_pairs(args.data, dim=dim)
    else:
        dataset = data.load_folder(args.data, contrast=source, dim=dim)
    if contrast == "inverted":
        dataset = dataset.map_images(data.invert)
    return dataset


def _parts(dataset, args):
    """{"train", "val", "test", "all"} -> Dataset: the subject split of --split and --seed."""
    data.check_split_counts(args.split, dataset, args.data)
    return dict(zip(("train", "val", "test"), dataset.split(args.split, args.seed)), all=dataset)


def _part(dataset, args, part):
    chosen = dataset if part == "all" else _parts(dataset, args)[part]  # every subject, whatever the split
    if not len(chosen):
        raise data.DataError(f"{args.data}: the {part} part of the subject split holds no images")
    return chosen


def _consecutive_labels(dataset, folder):
    """L, when the label maps hold the values 0..L-1; else DataError: a UNet of max + 1 classes would learn
    classes that never occur (FreeSurfer's aseg values reach 255, aparc+aseg's 2035)."""
    values = np.unique(dataset.labels)
    if len(values) == 1:
        raise data.DataError(f"{folder}: every label map holds the one value {values[0]}: nothing to segment")
    if len(values) != values[-1] + 1:
        shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
        raise data.DataError(f"{folder}: the label maps hold {len(values)} values up to {values[-1]} ({shown}), "
                             f"not 0..{len(values) - 1}: renumber them 0..{len(values) - 1} (numpy.unique(labels, "
                             f"return_inverse=True)), or give --nb-labels if some labels are absent from these data")
    return len(values)


def _check_labels(dataset, nb_labels, folder):
    """DataError naming the first subject whose label map has a label >= nb_labels."""
    largest = dataset.labels.reshape(len(dataset), -1).max(axis=1)
    if largest.max() >= nb_labels:
        index = int(np.argmax(largest >= nb_labels))
        raise data.DataError(f"{folder}: subject {dataset.subjects[index]} has label {largest[index]}, "
                             f"outside the labels 0..{nb_labels - 1}")


def _run_settings(args):
    """The arguments of a training command as its settings.json holds them (--resume must repeat them), with
    absolute paths, so that a job resumed from another folder or with `data/` for `data` is the same run;
    --out is the run itself."""
    settings = {key: value for key, value in vars(args).items() if key not in ("run", "resume", "out")}
    settings.update({key: os.path.abspath(settings[key]) for key in ("data", "encoder") if settings.get(key)})
    return json.loads(json.dumps(settings))


def _check_options(args, checks):
    """ValueError naming the first option of `checks` ({dest: (check(value) -> bool, what it must be)}, such as
    training.POSITIVE_INTEGER) whose value fails its check; options the command lacks or left out (None) pass."""
    given = {f"--{name.replace('_', '-')}": (getattr(args, name), check) for name, check in checks.items()
             if getattr(args, name, None) is not None}
    checkpoint.check_settings({option: value for option, (value, _) in given.items()},
                              {option: check for option, (_, check) in given.items()})


# The numbers of train-seg and train-reg (those of the command given).
TRAIN_CHECKS = {**dict.fromkeys(("epochs", "batch_size", "steps_per_epoch", "nb_features", "nb_levels",
                                  "svf_resolution"), POSITIVE_INTEGER),
                "learning_rate": POSITIVE_NUMBER, "seed": SETTINGS["seed"],
                "nb_labels": (lambda value: value >= 2, "an integer >= 2 (background and a label)")}


def _start_run(args, checks=TRAIN_CHECKS):
    """Checks that --out can take files and the numbers of `checks` (`_check_options`), before any work (a run
    folder written for a refused run would stand in the way of the corrected command); seeds the run."""
    _output_folder(args.out)
    out, folder = os.path.realpath(args.out), os.path.realpath(args.data)
    if os.path.isdir(folder) and os.path.commonpath([out, folder]) == folder:
        made = "checkpoints" if out == folder else os.path.relpath(out, folder).split(os.sep)[0]
        within_a_folder = out not in (folder, os.path.join(folder, made)) and os.path.isdir(os.path.join(folder, made))
        if data.read_as_subject(folder, made) and not within_a_folder:  # inside a subject's folder: not read
            raise ValueError(f"--out {args.out} is inside --data {args.data}, which would read its folder {made} as "
                             f"a subject: choose a folder outside it")
    _check_options(args, checks)
    tf.keras.utils.set_random_seed(args.seed)


SUBJECTS_FILE = "subjects.json"  # a run's split, by subject: evaluate checks that what it scores was held out


def _read_split(path):
    """A run's subjects.json: {part: [subject, ...]}; ValueError naming the file if it holds anything else."""
    split = data.read_json(path)
    if not isinstance(split, dict) or not all(isinstance(subjects, list) and all(isinstance(s, str) for s in subjects)
                                              for subjects in split.values()):
        raise ValueError(f"{path}: expected an object of the subjects (lists of paths) of each part, got "
                         f"{json.dumps(split)[:80]}")
    return split


def _subject_matcher(stored):
    """subject -> whether it is one of `stored`, subjects of a subjects.json; built once for the hundreds that
    evaluate checks. Folder subjects are names, matched as they are. A list file's are absolute paths, but earlier
    versions stored them as given: through links, or relative to a working folder now unknown, which the subject's
    path (as listed or resolved) must then end in."""
    exact = set(stored)
    real = {os.path.realpath(s) for s in stored if os.path.isabs(s)}
    tails = set()
    for s in stored:
        parts = [part for part in s.split(os.sep) if part not in ("", os.curdir)]
        # after the last "..": what came before may be a link, which normpath would have cut wrongly
        tail = parts[max((i for i, part in enumerate(parts) if part == os.pardir), default=-1) + 1:]
        if not os.path.isabs(s) and tail:
            tails.add(tuple(tail))
    lengths = {len(tail) for tail in tails}

    def matches(subject):
        if subject in exact:
            return True
        if not os.path.isabs(subject):
            return False
        paths = {os.path.normpath(subject), os.path.realpath(subject)}
        return bool(paths & real) or any(tuple(path.split(os.sep)[-n:]) in tails for path in paths for n in lengths)

    return matches


def _same_split(stored, split):
    """Whether subjects.json's split is `split`, part by part and subject by subject (`_subject_matcher`)."""
    return stored.keys() == split.keys() and all(
        len(stored[part]) == len(split[part])
        and all(_subject_matcher([old])(new) for old, new in zip(stored[part], split[part])) for part in split)


def _train_run(args, model, parts, batches, steps_per_epoch, setting_defaults=None, **fit_kwargs):
    """Fits `model` in --out, resumable, then writes --out/model.keras.

    --out holds settings.json, subjects.json (the subjects of each part of `parts`, the split), checkpoints/
    (weights, optimizer and epoch, saved at each epoch end), and log.csv; --resume continues from the last
    checkpoint. `batches(first_epoch)` is the training dataset from that epoch on, a pure function of --seed and
    the step, so that a resumed run trains on the same batches as one that ran through. `setting_defaults`:
    {setting: value} for settings that runs of earlier versions did not write, with the value those runs used.
    """
    checkpoint.prepare_run(args.out, _run_settings(args), args.resume, models.MODEL_FILE, "checkpoints",
                           defaults=setting_defaults, outputs=("log.csv", SUBJECTS_FILE))
    split = {name: list(parts[name].subjects) for name in ("train", "val", "test")}
    split_file = os.path.join(args.out, SUBJECTS_FILE)
    if not args.resume:
        data.write_json(split_file, split)
    elif os.path.isfile(split_file) and not _same_split(_read_split(split_file), split):
        raise data.DataError(f"{args.data}: its subjects have changed since {args.out} split them ({split_file}): "
                             f"the resumed run would train on another split; resume with the data it started with")
    saver = checkpoint.EpochCheckpoint(os.path.join(args.out, "checkpoints"), model)
    first_epoch = saver.restore()
    log = checkpoint.epoch_log(os.path.join(args.out, "log.csv"), first_epoch, args.resume)
    model.fit(batches(first_epoch), initial_epoch=first_epoch, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
              callbacks=[StopOnNonFinite(), log, saver], verbose=1, **fit_kwargs)
    print(f"model written to {models.save_model(model, args.out)}")


def _train_seg(args):
    _start_run(args)
    dataset = _dataset(args, args.contrast, args.dim)
    nb_labels = _consecutive_labels(dataset, args.data) if args.nb_labels is None else args.nb_labels
    _check_labels(dataset, nb_labels, args.data)
    parts = _parts(dataset, args)
    train, val = _part(dataset, args, "train"), parts["val"]
    encoder = encoder_from_args(args, args.dim, _images_of(args))
    model = models.segmentation_model(train.images.shape[1:], nb_labels, encoder, loss=args.loss,
                                      learning_rate=args.learning_rate, nb_features=args.nb_features,
                                      nb_levels=args.nb_levels)

    def arrays(part):  # (images (N, *shape, 1), one-hot labels (N, *shape, L))
        return part.images[..., np.newaxis], tf.keras.utils.to_categorical(part.labels, nb_labels)

    images_labels = arrays(train)
    _train_run(args, model, parts, lambda first: checkpoint.epoch_batches(images_labels, args.batch_size, args.seed,
                                                                          first),
               math.ceil(len(train) / args.batch_size), validation_data=arrays(val) if len(val) else None)


# train-reg settings that runs of earlier versions did not write, with the value those runs used: they built
# VxmDense's own full-resolution velocity field.
REG_SETTING_DEFAULTS = {"svf_resolution": 1}
REG_NB_LEVELS = 5  # UNet levels of --nb-features


def _train_reg(args):
    if args.nb_features is None and args.nb_levels is not None:
        raise ValueError("--nb-levels sets the levels of the UNet of --nb-features; give both, or neither for "
                         "VxmDense's own UNet")
    _start_run(args)
    dataset = _dataset(args, args.contrast, args.dim)
    parts, train = _parts(dataset, args), _part(dataset, args, "train")
    if len(train) < 2:  # checked before the run folder is written, which would block the corrected command
        raise data.DataError(f"{args.data}: registration training pairs two or more images of the train part, "
                             f"which holds {len(train)}: choose --split (e.g. 2,0,0 for two subjects)")
    if args.nb_levels is None:  # recorded as 5, the value runs wrote before --nb-levels defaulted to None
        args.nb_levels = REG_NB_LEVELS
    unet = {} if args.nb_features is None else dict(nb_unet_features=args.nb_features, nb_unet_levels=args.nb_levels)
    if args.svf_resolution is None:  # settings.json records the field as built, for --resume to build it again
        args.svf_resolution = models.default_svf_resolution(int_steps=args.int_steps)
    model = models.registration_model(train.images.shape[1:], encoder_from_args(args, args.dim, _images_of(args)),
                                      similarity=args.similarity, reg_weight=args.reg_weight,
                                      learning_rate=args.learning_rate, int_steps=args.int_steps,
                                      svf_resolution=args.svf_resolution, **unet)
    images = train.images[..., np.newaxis]
    _train_run(args, model, parts, lambda first: models.pair_batches(images, args.batch_size, args.seed,
                                                              first * args.steps_per_epoch),
               args.steps_per_epoch, setting_defaults=REG_SETTING_DEFAULTS)


def _run_folder(args):
    """The run folder of evaluate's --model: the folder given, or the one of the model file given."""
    return args.model if os.path.isdir(args.model) else os.path.dirname(args.model) or "."


# The settings of a train-seg or train-reg run that evaluate reads, where present.
RUN_DATA_SETTINGS = {
    "data": (lambda v: isinstance(v, str), "a path"),
    "split": (lambda v: v is None or isinstance(v, list) and len(v) == 3 and all(
        isinstance(size, (int, float)) and not isinstance(size, bool) and size >= 0 for size in v),
              "null or three subject counts or fractions"),
    "seed": SETTINGS["seed"],
}


def _run_of(args):
    """The run folder of evaluate's --model and its settings ({} if it has none), those evaluate reads checked."""
    run = _run_folder(args)
    if not os.path.isfile(os.path.join(run, checkpoint.SETTINGS_FILE)):
        return run, {}
    trained = checkpoint.read_settings(run)
    checkpoint.check_settings(trained, {key: check for key, check in RUN_DATA_SETTINGS.items() if key in trained},
                              f"{os.path.join(run, checkpoint.SETTINGS_FILE)}: ")
    return run, trained


def _trained_on_the_data(args, trained):
    """Whether the run of settings `trained` trained on evaluate's --data (by real path)."""
    return bool(trained.get("data")) and os.path.realpath(trained["data"]) == os.path.realpath(args.data)


def _split_of_the_run(args):
    """Sets evaluate's --split and --seed to those the model's run trained with where it trained on --data, so
    that the test part is the one its training held out; ValueError for options that differ from them.
    Returns the run folder and its settings ({} if none), as _run_of reads them."""
    run, trained = _run_of(args)
    if _trained_on_the_data(args, trained):
        missing = [key for key in ("split", "seed") if key not in trained]
        if missing:
            raise ValueError(f"{os.path.join(run, checkpoint.SETTINGS_FILE)}: holds no {' or '.join(missing)}: not "
                             f"the settings of a cifl training run")
        for key in ("split", "seed"):
            given = json.loads(json.dumps(getattr(args, key)))  # as settings.json holds it
            if given is None:
                setattr(args, key, trained[key])
            elif given != trained[key] and args.part != "all":
                shown = ",".join(map(str, given)) if isinstance(given, list) else given
                kept = trained[key] if trained[key] is not None else \
                    "of the paper's proportions (none given)" if key == "split" else "none"
                raise ValueError(f"--{key} {shown} differs from the {key} {kept} that {run} trained with on "
                                 f"{args.data}: its {args.part} part would mix in other subjects, some trained on; "
                                 f"leave --{key} out")
    elif trained.get("data") and args.part != "all" and os.path.exists(args.data):  # split otherwise: said
        print(f"cifl evaluate: {run} trained on {trained['data']}, not on {args.data}: its {args.part} part is "
              f"split by --split and --seed as given (default: the paper's proportions, seed 0)", file=sys.stderr)
    if args.seed is None:  # a model trained elsewhere, or without its run folder
        args.seed = 0
    return run, trained


def _check_held_out(args, scored, run, trained):
    """DataError when the scored --part holds subjects that the model's run trained (or, for test, validated) on:
    the run's split of --data, by subject (subjects.json), and the folder's now differ, as when subjects were added.
    `run`, `trained`: the run folder and its settings, as _split_of_the_run returns them."""
    split_file = os.path.join(run, SUBJECTS_FILE)
    if args.part in ("val", "test") and _trained_on_the_data(args, trained) and os.path.isfile(split_file):
        split = _read_split(split_file)
        seen = split.get("train", []) + (split.get("val", []) if args.part == "test" else [])
        leaked = sorted(filter(_subject_matcher(seen), set(scored.subjects)))
        if leaked:
            raise data.DataError(f"{args.data}: its {args.part} part now holds subjects that {run} "
                                 f"{'trained or validated' if args.part == 'test' else 'trained'} on "
                                 f"({', '.join(map(str, leaked[:3]))}{', ...' if len(leaked) > 3 else ''}): its "
                                 f"subjects have changed since that run split them ({split_file})")


def _evaluate(args):
    _check_options(args, {"seed": SETTINGS["seed"]})
    if args.json:
        _output_file(args.json)
        read = [args.data, args.model, *(os.path.join(_run_folder(args), name) for name in
                                         (models.MODEL_FILE, checkpoint.SETTINGS_FILE, SUBJECTS_FILE))]
        if os.path.realpath(args.json) in map(os.path.realpath, read):
            raise ValueError(f"--json {args.json}: is a file this evaluation reads (--data, the model, or its run's "
                             f"{checkpoint.SETTINGS_FILE} or {SUBJECTS_FILE}): choose another file")
    run, trained = _split_of_the_run(args)
    model = models.load_model(args.model)
    fixed = _part(_dataset(args, args.contrast, len(model.inshape)), args, args.part)
    _check_held_out(args, fixed, run, trained)
    if fixed.images.shape[1:] != tuple(model.inshape):
        raise data.DataError(f"{args.data}: its images are {fixed.images.shape[1:]}, the model {args.model} "
                             f"takes {tuple(model.inshape)}")
    if isinstance(model, models.SegmentationModel):
        if args.moving_contrast != "t1":
            raise ValueError(f"--moving-contrast {args.moving_contrast} is for registration models; {args.model} "
                             f"segments")
        _check_labels(fixed, model.nb_labels, args.data)
        scores = evaluate_segmentation(model, fixed.images, fixed.labels, verbose=1)
        task = f"segmentation of {args.contrast}"
    else:
        moving = _part(_dataset(args, args.moving_contrast, len(model.inshape)), args, args.part)
        if len(moving) < 2:
            raise data.DataError(f"{args.data}: registration needs at least 2 images to pair, "
                                 f"the {args.part} part has {len(moving)}")
        # Pair n: moving image n onto fixed image n + 1 (another subject), each in its own contrast.
        scores = evaluate_registration(model, moving.images, np.roll(fixed.images, -1, axis=0), moving.labels,
                                       np.roll(fixed.labels, -1, axis=0), verbose=1)
        task = f"registration {args.moving_contrast} -> {args.contrast}"
    print(f"{task}, {args.part} part of {args.data}:\n{scores}")
    if args.json:
        data.write_json(args.json, dict(task=task, model=args.model, data=args.data, part=args.part,
                                    **scores.summary()))


def _add_data_args(p, part=True):
    p.add_argument("--data", required=True,
                   help="data folder (neurite-oasis or IXI-style layout) or a file of image,labels lines")
    p.add_argument("--split", type=_split_sizes, default=None,
                   help="train,val,test subject counts or fractions (default: the paper's 232:58:100 proportions)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject split (and of training)" if not part else
                   "seed of the subject split (default: the one the model's run trained with on --data, else 0)")
    if part:
        p.add_argument("--part", choices=("train", "val", "test", "all"), default="test",
                       help="the part of the split to score (default: test)")


def _add_train_args(p, epochs, batch_size, learning_rate):
    _add_data_args(p, part=False)
    p.add_argument("--out", required=True,
                   help="output folder: model.keras, log.csv, settings.json, subjects.json (the split) and "
                        "checkpoints/ (for --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last finished epoch (same arguments)")
    _add_encoder_args(p)
    p.add_argument("--dim", type=int, choices=(2, 3), default=2)
    p.add_argument("--contrast", default="t1", help="training images: t1, inverted, or an IXI contrast name")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--learning-rate", type=float, default=learning_rate)


def _demo(args):
    out = args.out if args.out is not None else "cifl-demo-3d" if args.three_d else "cifl-demo"
    _output_folder(out)  # before minutes of work, not when the tables are written
    encoder = None if args.encoder is None else load_encoder(args.encoder)
    # the demo data needs nilearn, an optional dependency: imported only here
    from .demo import _check_ndim, run_demo
    from .demo3d import run_demo_3d

    ndim = 3 if args.three_d else 2
    _check_ndim(encoder, ndim, f"--encoder {args.encoder}: the {ndim}D demo")
    if args.three_d:
        run_demo_3d(out, quick=args.quick, seed=args.seed, encoder=encoder)
        return
    log = os.path.join(args.encoder or "", "log.csv")  # a run folder's training log
    run_demo(out, quick=args.quick, seed=args.seed, encoder=encoder,
             encoder_log=log if args.encoder and os.path.isfile(log) else None)


class _OneLineParser(argparse.ArgumentParser):
    """argparse's parser with its errors on one line, as the commands' own are (argparse prints its usage block
    first); its sub-command parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser():
    parser = _OneLineParser(prog="cifl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("demo", help="the main job: baseline vs CIFL on demo brains in unseen contrasts, "
                                         "offline, in minutes (tables and figures)")
    p.add_argument("--out", default=None, help="output folder (default: cifl-demo, or cifl-demo-3d with --3d)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 subjects, single epochs (3D: tiny volumes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--3d", dest="three_d", action="store_true",
                   help="3D volumes registered without training across T1, T2-like and PD-like, in minutes")
    p.add_argument("--encoder", default=None,
                   help="an encoder of your own (weights file or train-encoder run folder) in the CIFL column "
                   "instead of the recommended shipped one: 2D, or 3D with --3d")
    p.set_defaults(run=_demo)

    p = commands.add_parser("train-encoder", help="train a CIFL encoder on synthetic shapes")
    p.add_argument("--dim", type=int, choices=(2, 3), help="2 or 3 (default: --shape's number of sizes, else 2)")
    p.add_argument("--shape", type=_shape, help="crop size, e.g. 96x96 (default 96^dim)")
    p.add_argument("--steps", type=int)
    p.add_argument("--steps-per-epoch", type=int,
                   help="steps between checkpoints")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--channels", type=int, help="output channels C")
    p.add_argument("--features", type=int, help="hidden width")
    p.add_argument("--architecture", choices=ARCHITECTURES,
                   help="paper: the paper's eight convolutions; context: plus dilated context (sees 77 pixels)")
    p.add_argument("--dilations", type=_positive_integers("dilations", "2,4,8"),
                   help="with --architecture context: its dilation rates, e.g. 2,4 (default 2,4,8,16)")
    p.add_argument("--inversion-invariant", action="store_true", default=None,
                   help="features of an image and of its inversion 1 - x equal by construction (CIFLEncoder)")
    p.add_argument("--local-normalization", type=float, metavar="SIGMA",
                   help="show the encoder local contrast, in a Gaussian window of SD SIGMA pixels (LocalNormalize)")
    p.add_argument("--no-bias", action="store_true", default=None,
                   help="convolutions without bias: features unchanged when the image is scaled about 0 "
                        "(about 1/2 with --inversion-invariant; CIFLEncoder use_bias)")
    p.add_argument("--init", metavar="ENCODER",
                   help=f"start from this encoder's weights instead of random ones: a shipped encoder "
                        f"({', '.join(PRETRAINED_NAMES)}) or a weights file or run folder, of the same architecture; "
                        f"a 2D encoder for 3D crops is inflated (cifl_tf.encoder.inflate)")
    p.add_argument("--tau-alpha", type=float)
    p.add_argument("--tau-beta", type=float)
    p.add_argument("--tau-gamma", type=float)
    p.add_argument("--loss-scales", type=_positive_integers("loss scales", "1,2,4"),
                   help="Eq. 1 averaged over the overlaps average-pooled by these factors (default 1: the paper's)")
    p.add_argument("--pixel-contrast", type=float, metavar="WEIGHT",
                   help="add WEIGHT times InfoNCE over a grid of pixels to Eq. 1 (default 0: Eq. 1 alone)")
    p.add_argument("--max-offset", type=int,
                   help="random offset between the two views (0: voxel-aligned, the paper's ablation)")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--learning-rate-decay", choices=LEARNING_RATE_DECAYS,
                   help="cosine: from --learning-rate down to 0 at the last step")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="the convolutions' Keras dtype policy: mixed_bfloat16 for CPUs with AVX512_BF16 or AMX, "
                   "mixed_float16 for GPUs (the saved encoder computes in float32)")
    p.add_argument("--synth", type=_json_object, metavar="JSON",
                   help='synthesis arguments of cifl_tf.synth.ShapesSynth, e.g. \'{"tie_prob": 0.5}\'')
    p.add_argument("--seed", type=int)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--strategy", choices=("default", "mirrored", "multiworker"), default="default",
                   help="multiworker: tf.distribute.MultiWorkerMirroredStrategy over the cluster in TF_CONFIG or "
                   "of the SLURM job step; --out must be a folder all workers share")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished run in --out with the settings it was started with")
    p.set_defaults(run=_train_encoder)

    p = commands.add_parser("features", help="CIFL feature image of a 2D slice or 3D volume (NIfTI), by default "
                                             "with the recommended shipped encoder")
    p.add_argument("input", help="input image, .nii or .nii.gz")
    p.add_argument("output", help="output C-channel feature image, .nii or .nii.gz")
    _add_encoder_args(p, default=_RECOMMENDED)
    _add_stack_arg(p)
    _add_memory_arg(p)
    p.set_defaults(run=_features)

    p = commands.add_parser("segment", help="label map of an image with a trained segmentation model")
    p.add_argument("--model", required=True, help="model.keras from train-seg (or its run folder)")
    p.add_argument("input", help="input image, .nii or .nii.gz")
    p.add_argument("output", help="output label map, .nii or .nii.gz")
    _add_memory_arg(p)
    p.set_defaults(run=_segment)

    p = commands.add_parser("register", help="register a moving image to a fixed image: instance optimisation "
                                             "(no training; by default on the features of the recommended shipped "
                                             "encoder), or a trained model with --model")
    p.add_argument("--moving", required=True, help="moving image, .nii or .nii.gz (resampled onto the fixed grid)")
    p.add_argument("--fixed", required=True, help="fixed image, .nii or .nii.gz")
    p.add_argument("--moved", required=True, help="output: the moving image warped onto the fixed one")
    p.add_argument("--warp", default=None,
                   help="output: the displacement u in voxels of the fixed grid, moved(x) = m(x + u(x)) with m the "
                        "moving image resampled onto the fixed grid, as a NIfTI vector field (X, Y, Z, 1, 3), or "
                        "(X, Y, 1, 1, 2) for a slice")
    method = _add_encoder_args(p, default=f"without --model, {_RECOMMENDED}")
    method.add_argument("--model", default=None, help="model.keras from train-reg (or its run folder) instead of "
                                                      "instance optimisation")
    method.add_argument("--intensity", choices=("ncc", "mi"), default=None,
                        help="no features: the intensities, compared by local NCC or mutual information")
    p.add_argument("--levels", type=_levels, default=None,
                   help="without --model: resolution levels, as pooling factors from coarse to fine (default: "
                        "4,2,1, coarser for large images: register_pair's default_levels)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help=f"without --model: optimisation steps per resolution level (default "
                        f"{REGISTER_DEFAULTS['steps']})")
    p.add_argument("--affine", action="store_true", help="without --model: fit an affine transform first")
    p.add_argument("--equalize", action="store_true",
                   help="without --model: describe both images histogram-equalised (tissues of nearly equal "
                        "intensity, as grey and white matter in PD, spread apart; docs/registration.md)")
    p.add_argument("--moved-features", choices=MOVED_FEATURES, default=None,
                   help="without --model: warp the moving image's features, described once, or encode the moved "
                        "image in every step (default: encoded for 2D images, warped for 3D and --feature-scale)")
    p.add_argument("--feature-scale", type=_positive_int,
                   help="without --model: encode the images upsampled by this factor and average the features "
                        "back (for images coarser than 1 mm; default 1; warped features)")
    _add_stack_arg(p)
    _add_memory_arg(p)
    p.set_defaults(run=_register)

    p = commands.add_parser("train-seg", help="train a UNet on (encoder features of) T1 images and label maps")
    seg_defaults = _defaults(models.segmentation_model)
    _add_train_args(p, epochs=50, batch_size=8, learning_rate=seg_defaults["learning_rate"])
    p.add_argument("--loss", choices=sorted(models.SEG_LOSSES), default=seg_defaults["loss"])
    p.add_argument("--nb-labels", type=int, default=None,
                   help="default: L, for label maps holding the values 0..L-1 (others are refused)")
    p.add_argument("--nb-features", type=int, default=models.UNET_DEFAULTS["nb_features"])
    p.add_argument("--nb-levels", type=int, default=models.UNET_DEFAULTS["nb_levels"])
    p.set_defaults(run=_train_seg)

    p = commands.add_parser("train-reg", help="train VxmDense unsupervised on pairs of (encoder features of) images")
    reg_defaults = {**_defaults(vxm.networks.VxmDense), **_defaults(models.registration_model)}
    _add_train_args(p, epochs=20, batch_size=4, learning_rate=reg_defaults["learning_rate"])
    p.add_argument("--steps-per-epoch", type=int, default=100)
    p.add_argument("--similarity", choices=models.SIMILARITIES, default=reg_defaults["similarity"])
    p.add_argument("--reg-weight", type=float, default=reg_defaults["reg_weight"],
                   help="weight of the smoothness term (default: "
                        + ", ".join(f"{w:g} for {s}" for s, w in models.REG_WEIGHTS.items()) + ")")
    p.add_argument("--int-steps", type=int, default=reg_defaults["int_steps"],
                   help="integration steps (0: no diffeomorphic integration)")
    p.add_argument("--svf-resolution", type=int, default=None,
                   help="relative voxel size of the predicted velocity field (default: the integration's, 2; "
                        "1 with --int-steps 0; 1 is VxmDense's own default)")
    p.add_argument("--nb-features", type=int, default=None, help="UNet features per level (default: VxmDense's)")
    p.add_argument("--nb-levels", type=int, default=None,
                   help=f"UNet levels, with --nb-features (default {REG_NB_LEVELS})")
    p.set_defaults(run=_train_reg)

    p = commands.add_parser("evaluate", help="Dice (and folding, for registration) of a model on a data folder")
    p.add_argument("--model", required=True, help="model.keras from train-seg or train-reg (or its run folder); "
                                                  "trained on --data, its run's --split and --seed are taken")
    _add_data_args(p)
    p.add_argument("--contrast", default="t1",
                   help="contrast of the images to segment, or of the fixed images: t1, inverted, t2, ...")
    p.add_argument("--moving-contrast", default="t1", help="registration: contrast of the moving images")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    # the run's own split and seed where the model's run folder trained on --data: see _split_of_the_run
    p.set_defaults(run=_evaluate, seed=None)
    return parser


# Commands that resume nothing, so that oneDNN's kernels cost them nothing but a restart.
ONEDNN_COMMANDS = ("demo", "register")


def _terminated(signum, frame):
    """Ends the process at once with status 128 + signum, as the default action would, but without leaving
    the temporary file of an unfinished write. It does not raise SystemExit: raised in a signal handler, the
    exception may surface inside TensorFlow's C code, which reports it as SystemError and goes on."""
    data.remove_unfinished_files()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def _refuse_empty_values(args):
    """ValueError naming an option (or file argument) given as "": an unset shell variable, such as --model "$RUN",
    would otherwise choose a default (no model: instance optimisation; no --warp or --json: no file written)."""
    for name, value in vars(args).items():
        if value == "":
            shown = name if name in ("input", "output") else "--" + name.replace("_", "-")
            raise ValueError(f"{shown} is an empty name (an unset shell variable?)")


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        _refuse_empty_values(args)  # before a restart, which would only refuse it later
        if argv is None:  # the console command, not a call from Python
            if args.command in ONEDNN_COMMANDS:
                # -P: the cifl_tf this console command imported, not one in the working folder
                machine.relaunch_with_onednn(f"cifl {args.command}", ["-P", "-m", "cifl_tf.cli", *sys.argv[1:]])
            # SIGTERM (kill, timeout, SLURM, docker stop) would end the process where it stands, leaving the
            # temporary file of an unfinished write.
            signal.signal(signal.SIGTERM, _terminated)
        args.run(args)
    except (ValueError, OSError, ImportError) as error:
        print(f"cifl {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
