"""The knobs a Kaggler tunes before adding an attack (issue 37): layer-wise learning-rate decay (llrd) and an
exponential moving average of the weights (ema), checked exactly on a tiny model, and with every attack,
--resume and the fork."""
import json

import pandas as pd
import pytest
import torch

import advtrain
from conftest import base_config, fail_in_training


def tiny_classifier(model_dirs):
    torch.manual_seed(0)
    return advtrain.Classifier.from_pretrained(str(model_dirs["bert"]))


def test_llrd_gives_each_layer_its_rate_from_the_head_down(model_dirs):
    model = tiny_classifier(model_dirs)
    depths = advtrain.layer_depths(model)
    assert depths["head.weight"] == 0 and depths["backbone.encoder.layer.1.output.dense.weight"] == 1
    assert depths["backbone.encoder.layer.0.attention.self.query.weight"] == 2
    assert depths["backbone.embeddings.word_embeddings.weight"] == 3
    cfg = advtrain.Config(lr=1e-3, llrd=0.5, weight_decay=0.01, output_dir="x")
    optimizer = advtrain.build_optimizer(model, cfg, torch.device("cpu"))
    rate = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        decay = 0.01 if p.ndim >= 2 else 0.0
        assert rate[id(p)] == (pytest.approx(1e-3 * 0.5 ** depths[name]), decay), name
    assert len(rate) == sum(1 for p in model.parameters() if p.requires_grad)  # every parameter once
    scheduler = advtrain.build_scheduler(optimizer, "linear", 0, 10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    lrs = sorted({round(g["lr"] / g["initial_lr"], 12) for g in optimizer.param_groups})
    assert lrs == [0.5]  # the schedule scales every layer's rate alike
    plain = advtrain.build_optimizer(model, advtrain.Config(lr=1e-3, output_dir="x"), torch.device("cpu"))
    assert [g["lr"] for g in plain.param_groups] == [1e-3, 1e-3]  # llrd 1: the two groups as before


def test_the_weight_average_updates_exactly_and_is_applied_only_for_the_duration(model_dirs):
    model = tiny_classifier(model_dirs)
    average = advtrain.WeightAverage(model, 0.9)
    w0 = model.head.weight.detach().clone()
    with torch.no_grad():
        model.head.weight.add_(1.0)
    average.update(model)  # t = 1: d = min(0.9, 2 / 11)
    d1 = 2 / 11
    torch.testing.assert_close(average.average["head.weight"], d1 * w0 + (1 - d1) * (w0 + 1))
    with torch.no_grad():
        model.head.weight.add_(1.0)
    average.update(model)  # t = 2: d = min(0.9, 3 / 12)
    d2 = 3 / 12
    torch.testing.assert_close(average.average["head.weight"], d2 * (d1 * w0 + (1 - d1) * (w0 + 1))
                               + (1 - d2) * (w0 + 2))
    for _ in range(200):
        average.update(model)
    assert min(0.9, (1 + average.updates) / (10 + average.updates)) == 0.9  # the warm-up is over
    with average.applied(model):
        torch.testing.assert_close(model.head.weight, average.average["head.weight"])
    torch.testing.assert_close(model.head.weight, w0 + 2)  # the trained weights are back
    with pytest.raises(advtrain.UserError, match="ema is a decay in"):
        advtrain.Config(ema=1.0, output_dir="x")
    with pytest.raises(advtrain.UserError, match="llrd is a factor per layer"):
        advtrain.Config(llrd=0.0, output_dir="x")


def test_evaluation_selection_and_the_saved_model_use_the_averaged_weights(data_dir, model_dirs, tmp_path):
    cfg = base_config(data_dir, model_dirs["bert"], tmp_path / "x", epochs=1, eval_every=1.0, ema=0.9, max_len=32)
    data = advtrain.prepare_data(cfg)
    task, ids, y = data["task"], data["train_ids"], data["targets"]
    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]))
    fold = advtrain.FoldTraining(cfg, task, model, (ids[:200], y[:200]), (ids[200:300], y[200:300]),
                                 torch.device("cpu"), None, data["pad_id"])
    fold.run_epoch(0)
    kept = fold.selection.state
    assert all(torch.equal(kept[k], v) for k, v in fold.average.average.items())  # the average was kept
    assert not torch.equal(kept["head.weight"], model.head.weight.detach())  # not the trained weights
    model.load_state_dict(kept)
    again = advtrain.predict_proba(model, ids[200:300], 64, data["pad_id"], torch.device("cpu"), None, task.activate)
    assert fold.selection.probs == pytest.approx(again, abs=1e-6)  # evaluated with the weights it keeps


@pytest.mark.slow
@pytest.mark.parametrize("method", advtrain.METHODS)
def test_llrd_and_ema_train_with_every_method(method, data_dir, model_dirs, tmp_path):
    metrics = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / method, epochs=1, eval_every=1.0,
                                       method=method, llrd=0.8, ema=0.9, awp_lr=0.01))
    assert metrics["config"]["llrd"] == 0.8 and metrics["config"]["ema"] == 0.9
    assert metrics["attack_seen"] == (method != "baseline") and 0 <= metrics["score"]["value"] <= 1


@pytest.mark.slow
def test_a_resumed_run_with_ema_and_llrd_equals_an_uninterrupted_one(data_dir, model_dirs, tmp_path, monkeypatch):
    settings = dict(epochs=2, method="fgm", adv_start="0.5", eval_every=0.5, llrd=0.7, ema=0.95)
    whole = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "whole", **settings))
    per_epoch = whole["evaluations"][1]["step"]
    fail_in_training(monkeypatch, KeyboardInterrupt(), after=per_epoch + 3)
    with pytest.raises(KeyboardInterrupt):
        advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "cut", **settings))
    monkeypatch.undo()
    resumed = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "cut", resume=True, **settings))
    drop = ("eval_seconds",)
    assert [{k: v for k, v in e.items() if k not in drop} for e in resumed["evaluations"]] == \
        [{k: v for k, v in e.items() if k not in drop} for e in whole["evaluations"]]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "cut" / "test_probs.csv"),
                                  pd.read_csv(tmp_path / "whole" / "test_probs.csv"))


@pytest.mark.slow
def test_a_forked_run_with_ema_and_llrd_equals_one_from_scratch(data_dir, model_dirs, tmp_path):
    base = dict(model=str(model_dirs["bert"]), data_dir=str(data_dir), epochs=2, batch_size=16, lr=2e-3,
                holdout_size=100, valid_size=100, device="cpu", progress=False, save_model=False, eval_every=0.5,
                adv_start="1", llrd=0.7, ema=0.95)
    advtrain.compare(advtrain.Config(output_dir=str(tmp_path / "cmp"), **base), ["baseline", "fgm"], [1])
    forked = json.loads((tmp_path / "cmp" / "fgm-seed1" / "metrics.json").read_text())
    scratch = advtrain.run(advtrain.Config(output_dir=str(tmp_path / "scratch"), method="fgm", seed=1, **base))
    assert forked["fork"][0]["epoch"] == 1 and scratch["fork"] == [None]
    for a, b in zip(forked["evaluations"], scratch["evaluations"], strict=True):
        assert a["valid_f1"] == pytest.approx(b["valid_f1"], abs=1e-6)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
    assert forked["score"]["value"] == pytest.approx(scratch["score"]["value"], abs=1e-6)
