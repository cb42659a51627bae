"""`cifl demo`: the whole job end to end at smoke size, its outputs, and its one-line errors."""
import json
import sys

import numpy as np

import cifl_tf
from cifl_tf import cli, demo, demo_data, figures
from cifl_tf.descriptors import MIND
from cifl_tf.encoder import pretrained_log

FIGURES = ["encoder_training.png", "figure2.png", "registrations.png", "segmentations.png"]
COLUMNS = ["baseline", "MIND", "CIFL (paper, tau_gamma=0.1)", "CIFL"]


def test_demo_compares_the_baseline_mind_the_papers_and_the_recommended_encoder():
    compared = demo.methods()
    assert list(compared) == COLUMNS
    assert compared["baseline"] is None and isinstance(compared["MIND"], MIND)
    for name, which in (("CIFL (paper, tau_gamma=0.1)", dict(tau_gamma=0.1)), ("CIFL", {})):
        shipped = cifl_tf.pretrained(**which)
        assert compared[name].get_config() == shipped.get_config() and not compared[name].trainable
        for a, b in zip(compared[name].get_weights(), shipped.get_weights()):
            np.testing.assert_array_equal(a, b)


def test_quick_demo_writes_tables_results_and_figures(tmp_path, monkeypatch, capsys, tiny_networks):
    compared = demo.methods()
    # The baseline and the recommended encoder (figure 2 shows its features) keep the smoke run short.
    monkeypatch.setattr(demo, "methods", lambda: {name: compared[name] for name in ("baseline", "CIFL")})
    drawn = {}  # the first argument of each figure function below

    def recorded(draw):
        def record(first, *args, **kwargs):
            drawn[draw.__name__] = first
            return draw(first, *args, **kwargs)
        return record

    for name in ("feature_channels", "training_curves"):
        monkeypatch.setattr(figures, name, recorded(getattr(figures, name)))
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    assert drawn["feature_channels"] is compared["CIFL"]
    assert drawn["training_curves"] == {"CIFL (paper, tau_gamma=0.1)": pretrained_log(0.1), "CIFL": pretrained_log()}
    out = capsys.readouterr().out
    assert "Segmentation Dice (trained on T1)" in out and "Registration Dice (trained on T1 pairs)" in out
    assert "8 demo subjects (4 train, 4 test)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FIGURES + ["results.json", "table.md"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["segmentation"]) == list(results["registration"]) == ["baseline", "CIFL"]
    assert list(results["segmentation"]["baseline"]) == ["t1", "t1_inverted", "t2", "pd"]
    assert list(results["registration"]["baseline"]) == ["t1->t1", "t1->t1_inverted", "t1->t2", "t1->pd"]


def test_demo_without_nilearn_is_one_line_saying_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # as if nilearn were not installed
    demo_data._template.cache_clear()  # an earlier test may have read the template already
    monkeypatch.setattr(demo, "methods", lambda: {"baseline": None})
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install nilearn" in err
