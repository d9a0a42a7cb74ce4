"""The GAIN experiment end to end on a tiny budget: files, table, resume, NaN stop, the CLI."""

import dataclasses
import json

import numpy as np
import pytest

from gradcam_ref.cli import main
from gradcam_ref.experiments import gain_experiment as g
from gradcam_ref.experiments import lesions

TINY = g.Config(train=48, test=24, epochs=1, batch=16, masks=(4,), labelled_per_batch=4, warmup=0.0)


@pytest.mark.slow
def test_tiny_run_writes_table_figures_and_resumes(tmp_path, capsys):
    out = tmp_path / "gain"
    first = g.run(TINY, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoints", "gain_benign.png", "gain_malignant.png", "results.json", "table.md"]
    results = json.loads((out / "results.json").read_text())["results"]
    assert list(results) == ["plain", "gain", "gain_ext-4"]
    for row in results.values():
        for key in ("acc_biased", "acc_unbiased", "acc_reversed", "energy_lesion", "energy_cue", "pointing"):
            assert 0.0 <= row[key] <= 1.0
    assert "synthetic" in (out / "table.md").read_text()
    # the accuracies are those of the saved parameters (recomputed here with plain NumPy-fed JAX)
    sets = lesions.lesion_splits(TINY.seed, {"train": 48, "biased": 24, "unbiased": 24, "reversed": 24})
    with np.load(next((out / "checkpoints").glob("plain-*.npz"))) as f:
        params = {k: f[k] for k in f.files}
    y = np.asarray(g.logit(params, g.features(params, sets["reversed"].images.astype(np.float32))))
    assert results["plain"]["acc_reversed"] == pytest.approx(np.mean((y > 0) == (sets["reversed"].labels == 1)))
    # a rerun loads every checkpoint instead of training, and gives the same table
    logged = []
    second = g.run(TINY, out, progress=False, log=logged.append)
    assert sum("loaded" in line for line in logged) == 3 and second["table"] == first["table"]


@pytest.mark.slow
def test_a_nan_loss_stops_training_with_the_step_number():
    data = lesions.make_lesions(32, seed=0)
    with pytest.raises(g.TrainingDiverged, match=r"plain: the loss is (nan|inf) at step \d+ of 4"):
        g.train("plain", data, dataclasses.replace(TINY, learning_rate=1e38, epochs=2), progress=False)


def test_cli_refuses_more_masks_than_images(tmp_path, capsys):
    assert main(["gain", "--out", str(tmp_path / "o"), "--train", "10", "--masks", "20"]) == 2
    assert "--masks 20: at most --train 10 images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gain", "--masks", "0"])
