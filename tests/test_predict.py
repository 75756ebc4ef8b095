"""Train once, predict offline: a run folder holds everything `predict` needs (weights, config, tokenizer,
settings, task, submission layout), loads with the network off from wherever it was copied, and gives the
run's own test predictions; folds and runs average; runs of another task are refused in one sentence."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

import advtrain
from conftest import base_config


@pytest.fixture(scope="module")
def runs(data_dir, model_dirs, tmp_path_factory):
    """A holdout run and a 3-fold run of a tiny model (trained from a copy of the model folder, which is then
    deleted: predicting must not need it), and a run scored by another metric."""
    root = tmp_path_factory.mktemp("runs")
    base = root / "base-model"
    shutil.copytree(model_dirs["deberta-v2"], base)
    made = {}
    for name, kw in {"holdout": {}, "kfold": dict(split="kfold", n_folds=3),
                     "auc": dict(metric="auc", seed=3)}.items():
        made[name] = root / name
        advtrain.run(base_config(data_dir, base, made[name], epochs=1, eval_every=1.0, save_model=True, **kw))
    shutil.rmtree(base)
    return made


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-cache"))


def probs(folder):
    return pd.read_csv(folder / "test_probs.csv", dtype={"id": str}).set_index("id")


@pytest.mark.parametrize("split", ["holdout", "kfold"])
def test_a_moved_run_folder_predicts_offline_what_the_run_wrote(split, runs, data_dir, tmp_path, offline, capsys):
    moved = tmp_path / "kaggle" / "input" / "training-notebook"
    shutil.copytree(runs[split], moved)
    assert advtrain.main(["predict", "--runs", str(moved), "--data-dir", str(data_dir), "--output-dir",
                          str(tmp_path / "out"), "--no-progress"]) == 0
    assert "texts/s" in capsys.readouterr().out
    mine, theirs = probs(tmp_path / "out"), probs(runs[split])
    assert list(mine.columns) == list(theirs.columns) and mine.index.tolist() == theirs.index.tolist()
    assert np.abs(mine.to_numpy() - theirs.to_numpy()).max() <= 1e-6
    assert (tmp_path / "out" / "submission.csv").read_text() == (runs[split] / "submission.csv").read_text()


def test_folds_average_to_the_mean_of_their_own_predictions(runs, data_dir, tmp_path, offline):
    folds = sorted(runs["kfold"].glob("model_fold*"))
    assert len(folds) == 3
    each = []
    for k, fold in enumerate(folds):
        alone = tmp_path / f"fold{k}"
        shutil.copytree(runs["kfold"], alone, ignore=shutil.ignore_patterns("model_fold*"))
        shutil.copytree(fold, alone / fold.name)
        advtrain.predict([alone], str(data_dir), str(tmp_path / f"out{k}"), progress=False)
        each.append(probs(tmp_path / f"out{k}")["prob"].to_numpy())
    advtrain.predict([runs["kfold"]], str(data_dir), str(tmp_path / "all"), progress=False)
    assert np.abs(probs(tmp_path / "all")["prob"].to_numpy() - np.mean(each, axis=0)).max() <= 1e-6


def test_runs_average_by_their_weights(runs, data_dir, tmp_path, offline):
    advtrain.predict([runs["holdout"], runs["kfold"]], str(data_dir), str(tmp_path / "w"), weights=[1, 0],
                     progress=False)
    assert np.abs(probs(tmp_path / "w").to_numpy() - probs(runs["holdout"]).to_numpy()).max() <= 1e-6
    advtrain.predict([runs["holdout"], runs["kfold"]], str(data_dir), str(tmp_path / "e"), progress=False)
    mean = (probs(runs["holdout"]).to_numpy() + probs(runs["kfold"]).to_numpy()) / 2
    assert np.abs(probs(tmp_path / "e").to_numpy() - mean).max() <= 1e-6


def test_runs_of_another_task_and_foreign_folders_are_refused_in_one_sentence(runs, data_dir, tmp_path, capsys):
    flags = ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "o"), "--no-progress"]
    assert advtrain.main(["predict", "--runs", f"{runs['holdout']},{runs['auc']}", *flags]) == 2
    err = capsys.readouterr().err
    assert "was trained for another metric (auc)" in err and len(err.strip().splitlines()) == 1
    old = tmp_path / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"config": {}, "score": {}}))
    (old / "model.pt").write_bytes(b"weights")
    assert advtrain.main(["predict", "--runs", str(old), *flags]) == 2
    assert "is not a run record of this advtrain (task is missing)" in capsys.readouterr().err
    future = tmp_path / "future"
    shutil.copytree(runs["holdout"], future)
    info = json.loads((future / "model" / "advtrain.json").read_text())
    (future / "model" / "advtrain.json").write_text(json.dumps({**info, "format": 99}))
    assert advtrain.main(["predict", "--runs", str(future), *flags]) == 2
    assert "in format 99, this advtrain" in capsys.readouterr().err
    other = tmp_path / "other-model"
    shutil.copytree(runs["holdout"], other)
    config = json.loads((other / "model" / "config.json").read_text())
    (other / "model" / "config.json").write_text(json.dumps({**config, "hidden_size": 64, "intermediate_size": 128}))
    assert advtrain.main(["predict", "--runs", str(other), *flags]) == 2
    assert "cannot be loaded" in capsys.readouterr().err
    assert advtrain.main(["predict", "--runs", str(runs["holdout"]), "--weights", "1,2", *flags]) == 2
    assert "one finite non-negative number per run (1)" in capsys.readouterr().err


def test_no_save_model_leaves_no_model_folder_and_a_full_disk_costs_only_the_folder(data_dir, model_dirs, tmp_path,
                                                                                     monkeypatch):
    out = tmp_path / "run"
    advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=1, eval_every=1.0, save_model=True))
    assert (out / "model" / "model.safetensors").is_file()
    advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=1, eval_every=1.0, overwrite=True))
    assert not (out / "model").exists()  # the new run saved none: the old one does not stay beside it

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_model", full)
    advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=1, eval_every=1.0, overwrite=True,
                             save_model=True))
    assert (out / "submission.csv").is_file() and not (out / "model").exists()
    assert "model/ not saved (" in (out / "train.log").read_text()
