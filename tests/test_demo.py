"""`cifl demo`: the whole job end to end at smoke size, its outputs, and its one-line errors."""
import json
import sys

from cifl_tf import cli, demo_data, experiments

FIGURES = ["encoder_training.png", "figure2.png", "registrations.png", "segmentations.png"]


def test_quick_demo_writes_tables_results_and_figures(tmp_path, monkeypatch, capsys, tiny_networks):
    compared = experiments.methods
    # The baseline, MIND and one shipped encoder, with tiny networks, keep the smoke run short; the demo
    # compares all five at full width.
    monkeypatch.setattr(experiments, "methods", lambda: compared(tau_gammas=(0.1,)))
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Segmentation Dice (trained on T1)" in out and "Registration Dice (trained on T1 pairs)" in out
    assert "8 demo subjects (4 train, 4 test)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FIGURES + ["results.json", "table.md"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["segmentation"]) == list(results["registration"]) == ["baseline", "MIND", "tau_gamma=0.1"]
    assert list(results["segmentation"]["baseline"]) == ["t1", "t1_inverted", "t2", "pd"]
    assert list(results["registration"]["baseline"]) == ["t1->t1", "t1->t1_inverted", "t1->t2", "t1->pd"]


def test_demo_without_nilearn_is_one_line_saying_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nilearn", None)  # as if nilearn were not installed
    demo_data._template.cache_clear()  # an earlier test may have read the template already
    monkeypatch.setattr(experiments, "methods", lambda: {"baseline": None})
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install nilearn" in err
