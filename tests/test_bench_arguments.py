"""bench/*.py refuse bad arguments with one argparse error line, exit status 2, before any heavy work."""
import os
import runpy
import sys

import pytest

from conftest import make_oasis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")

# (script, arguments, what the error line must name). MISSING, FILE and ONE become a missing folder, a file and a
# neurite-oasis folder of one subject.
# The data scripts' other cases also pass MISSING as --data: a check made after loading would name the data.
CASES = [
    ("ncc.py", ["--repeats", "0"], "'0'"),
    ("ncc.py", ["--repeats", "-1"], "'-1'"),
    ("ncc.py", ["--shape", "abc"], "'abc'"),
    ("ncc.py", ["--shape", "0,0,0"], "'0,0,0'"),
    ("ncc.py", ["--shape", "8"], "2 or 3 sizes, got 8"),
    ("train_step.py", ["--steps", "0"], "'0'"),
    ("train_step.py", ["--rounds", "0"], "'0'"),
    ("train_step.py", ["--rounds", "-1"], "'-1'"),
    ("train_step.py", ["--max-offset", "-1"], "got -1"),
    ("train_step.py", ["--shape", "0", "0"], "'0'"),
    ("train_step.py", ["--batch-size", "0"], "'0'"),
    ("train_step.py", ["--features", "0"], "'0'"),
    ("train_step.py", ["--max-offset", "40", "--shape", "32", "32"], "max_offset 40 must be smaller than the crop "
                                                                      "shape (32, 32)"),
    ("registration_step.py", ["--steps", "0"], "'0'"),
    ("registration_step.py", ["--batch-size", "0"], "'0'"),
    ("registration_step.py", ["--shape", "100", "100"], "(100, 100) must be divisible by 16"),
    ("registration_step.py", ["--shape", "0", "0"], "(0, 0)"),
    ("register_3d.py", ["--data", "MISSING"], "missing: no such folder"),
    ("register_3d.py", ["--data", "FILE"], "file: no such folder"),
    ("register_3d.py", ["--data", "MISSING", "--levels", "abc"], "'abc'"),
    ("register_3d.py", ["--data", "MISSING", "--levels", "1,2"], "(1, 2)"),
    ("register_3d.py", ["--data", "MISSING", "--max-memory", "0"], "'0'"),
    ("register_3d.py", ["--data", "MISSING", "--warp-std", "nan"], "got nan"),
    ("register_3d.py", ["--data", "MISSING", "--warp-std", "-1"], "got -1"),
    ("register_3d.py", ["--data", "MISSING", "--steps", "0"], "'0'"),
    ("register_3d.py", ["--data", "MISSING", "--method", "ncc", "--invert"], "--invert with --method ncc"),
    ("register_3d.py", ["--data", "ONE", "--subject", "OASIS_OAS1_0009_MR1"], "one/OASIS_OAS1_0009_MR1"),
    # against the volume, before it is warped and described
    ("register_3d.py", ["--data", "ONE", "--levels", "16"], "level 16 pools the (16, 20, 8) images to a (1, 2, 1) grid"),
    ("register_3d.py", ["--data", "MISSING", "--method", "mi", "--similarity", "mse"],
     "--similarity compares features: --method mi compares the intensities by itself"),
    ("similarity.py", ["--data", "MISSING"], "missing: no such folder"),
    ("similarity.py", ["--data", "FILE"], "file: no such folder"),
    ("similarity.py", ["--data", "ONE"], "one: holds 1 subject; registration needs two"),
    ("moved_features.py", ["--data", "MISSING"], "missing: no such folder"),
    ("moved_features.py", ["--data", "FILE"], "file: no such folder"),
    ("moved_features.py", ["--data", "ONE"], "one: holds 1 subject; registration needs two"),
    ("moved_features.py", ["--data", "MISSING", "--steps", "0"], "'0'"),
]


@pytest.mark.parametrize("script, argv, named", CASES, ids=[f"{s}{' '.join(['', *a])}" for s, a, _ in CASES])
def test_bench_script_refuses_a_bad_argument_in_one_line(tmp_path, monkeypatch, capsys, script, argv, named):
    (tmp_path / "file").write_text("not a folder")
    if "ONE" in argv:
        make_oasis(tmp_path / "one", subjects=1)
    paths = {"MISSING": str(tmp_path / "missing"), "FILE": str(tmp_path / "file"), "ONE": str(tmp_path / "one")}
    path = os.path.join(BENCH, script)
    monkeypatch.syspath_prepend(BENCH)  # registration_step imports train_step, as when run as a script
    # In this process, not a subprocess: each would spend seconds importing TensorFlow.
    monkeypatch.setattr(sys, "argv", [path, *[paths.get(arg, arg) for arg in argv]])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(path, run_name="__main__")
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith(f"{script}: error: ") and named in err, err
