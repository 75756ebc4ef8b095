"""The engine end to end: training, metrics.json, submission, reproducibility, AMP, clipping, protection."""
import json
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch

import advtrain
from conftest import ROOT, base_config
from sklearn.metrics import f1_score


@pytest.fixture(scope="module")
def baseline_run(data_dir, model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "baseline"
    return out, advtrain.run(base_config(data_dir, model_dirs["deberta-v2"], out, epochs=3, save_model=True))


def test_training_learns_the_synthetic_task(baseline_run):
    _, metrics = baseline_run
    losses = [e["train_loss"] for e in metrics["evaluations"]]
    assert losses[-1] < losses[0] < 0.75
    assert metrics["score"]["argmax"]["accuracy"] > 0.8 and metrics["score"]["tuned"]["f1"] > 0.75
    assert metrics["selected"][0]["epoch"] in [e["epoch"] for e in metrics["evaluations"]]


def test_metrics_json_holds_the_contract(baseline_run):
    out, metrics = baseline_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["score"] == metrics["score"] and saved["score"]["on"] == "holdout"
    for key in ("config", "evaluations", "selected", "valid_best", "score", "attack_seen", "train_samples_per_s",
                "eval_seconds", "device", "versions"):
        assert key in saved
    assert saved["config"]["method"] == "baseline" and saved["config"]["max_len"] == 0  # as given; used:
    assert saved["data"]["max_len"] > 0
    assert saved["score"]["metric"] == "f1" and saved["score"]["value"] == saved["score"]["tuned"]["f1"]
    assert {"epoch", "step", "valid_accuracy", "valid_f1", "train_loss", "attack_seen", "eval_seconds",
            "fold"} <= set(saved["evaluations"][0])
    assert {"torch", "transformers"} <= set(saved["versions"])
    assert (out / "train.log").read_text().count("| valid f1 ") == len(saved["evaluations"]) == 12
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "advtrain.json").is_file()


def test_submission_has_the_test_ids_in_order_and_integer_targets(baseline_run, data_dir):
    out, _ = baseline_run
    sub = pd.read_csv(out / "submission.csv")
    sample = pd.read_csv(data_dir / "sample_submission.csv")
    assert list(sub.columns) == ["id", "target"]
    assert sub["id"].tolist() == sample["id"].tolist()
    assert set(sub["target"].unique()) <= {0, 1} and sub["target"].dtype.kind == "i"
    probs = pd.read_csv(out / "test_probs.csv")
    assert probs["id"].tolist() == sample["id"].tolist()
    threshold = advtrain.json.loads((out / "metrics.json").read_text())["score"]["threshold"]
    assert ((probs["prob"] > threshold).astype(int) == sub["target"]).all()
    oof = pd.read_csv(out / "oof.csv")
    assert (oof["split"] == "holdout").sum() == 100 and (oof["split"] == "valid").sum() == 100


def test_same_seed_same_predictions(data_dir, model_dirs, tmp_path):
    runs = [advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / f"r{i}", epochs=1)) for i in range(2)]
    probs = [pd.read_csv(tmp_path / f"r{i}" / "test_probs.csv")["prob"].to_numpy() for i in range(2)]
    np.testing.assert_array_equal(probs[0], probs[1])
    assert runs[0]["score"] == runs[1]["score"]


def test_bf16_autocast_path_runs(data_dir, model_dirs, tmp_path):
    metrics = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "bf16", epochs=1, amp="bf16",
                                       method="fgm"))
    assert metrics["amp"] == "bfloat16" and np.isfinite(metrics["evaluations"][0]["train_loss"])


def test_kfold_writes_out_of_fold_predictions_for_every_row(data_dir, model_dirs, tmp_path):
    metrics = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "kf", epochs=1, split="kfold",
                                       n_folds=3))
    oof = pd.read_csv(tmp_path / "kf" / "oof.csv")
    train = pd.read_csv(data_dir / "train.csv")
    assert sorted(oof["id"]) == sorted(train["id"]) and set(oof["fold"]) == {0, 1, 2}
    assert metrics["score"]["on"] == "out-of-fold" and metrics["score"]["rows"] == len(train)
    assert {e["fold"] for e in metrics["evaluations"]} == {0, 1, 2} and len(metrics["selected"]) == 3
    # one shape whatever the number of folds
    single = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "one", epochs=1))
    assert set(single) == set(metrics) and set(single["score"]) == set(metrics["score"])


def test_existing_output_dir_is_protected(baseline_run, data_dir, model_dirs, capsys):
    out, _ = baseline_run
    before = (out / "submission.csv").read_bytes()
    code = advtrain.main(["train", "--data-dir", str(data_dir), "--model", str(model_dirs["bert"]),
                          "--output-dir", str(out), "--no-progress"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "submission.csv").read_bytes() == before


def test_clipping_bounds_the_gradient_norm_seen_by_the_optimizer():
    model = torch.nn.Linear(10, 10)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = advtrain.build_scheduler(optimizer, "constant", 0, 1)
    seen = []
    optimizer.register_step_pre_hook(
        lambda opt, *_: seen.append(torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
    (model(torch.randn(4, 10)) * 1000).sum().backward()
    assert torch.norm(torch.stack([p.grad.norm() for p in model.parameters()])) > 10
    advtrain.optimizer_step(model, optimizer, scheduler, None, max_grad_norm=0.5)
    assert seen[0] == pytest.approx(0.5, rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_fp16_scaler_unscales_before_clipping():
    model = torch.nn.Linear(10, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = advtrain.build_scheduler(optimizer, "constant", 0, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    seen = []
    optimizer.register_step_pre_hook(
        lambda opt, *_: seen.append(torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))))
    scaler.scale(model(torch.randn(4, 10)).sum() * 100).backward()
    advtrain.optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm=1.0)
    assert seen[0] == pytest.approx(1.0, rel=1e-4)


def test_every_config_field_is_a_flag_and_presets_yield_to_flags():
    parser = advtrain.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = {a.dest for a in train._actions}
    assert {f.name for f in advtrain.dataclasses.fields(advtrain.Config)} <= flags
    args = parser.parse_args(["train", "--preset", "article", "--epochs", "2", "--no-group-by-length"])
    cfg = advtrain.config_from_args(args)
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.fgm_eps, cfg.group_by_length) == (2, 2e-6, 8, 0.1, False)


def test_bad_setting_is_one_line(capsys):
    assert advtrain.main(["train", "--batch-size", "0"]) == 2
    assert "batch_size must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_contract_and_check_submission(data_dir, model_dirs, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "advtrain.py"), "train", "--method", "baseline", "--model",
           str(model_dirs["deberta-v2"]), "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "1",
           "--batch-size", "32", "--lr", "1e-3", "--seed", "7", "--holdout-size", "100", "--valid-size", "100",
           "--device", "cpu", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "epoch 1.00 | loss" in done.stdout
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 7
    check = [sys.executable, str(ROOT / "advtrain.py"), "check-submission", "--data-dir", str(data_dir)]
    ok = subprocess.run(check + [str(out / "submission.csv")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = out / "bad.csv"
    pd.read_csv(out / "submission.csv").assign(target=0.5).to_csv(bad, index=False)
    failed = subprocess.run(check + [str(bad)], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "target must be written 0 or 1" in failed.stderr


@pytest.mark.parametrize("target", ["0.5", "True", "1.0", "", "2"])
def test_check_submission_refuses_targets_not_written_0_or_1(target):
    sub = pd.DataFrame({"id": ["1", "2"], "target": ["0", target]})
    with pytest.raises(advtrain.UserError, match="target must be written 0 or 1"):
        advtrain.check_submission(sub, ["1", "2"])


def test_check_submission_matches_ids_as_a_set_of_exact_texts():
    ok = pd.DataFrame({"id": ["00677", "5"], "target": ["1", "0"]})
    advtrain.check_submission(ok, ["5", "00677"])  # Kaggle matches by id: any order
    with pytest.raises(advtrain.UserError, match="not in the test set, e.g. '677'"):
        advtrain.check_submission(ok.assign(id=["677", "5"]), ["00677", "5"])
    with pytest.raises(advtrain.UserError, match="appears more than once"):
        advtrain.check_submission(ok.assign(id=["5", "5"]), ["00677", "5"])
    with pytest.raises(advtrain.UserError, match="2 rows, but the test set has 3"):
        advtrain.check_submission(ok, ["1", "2", "3"])


def test_check_submission_needs_only_the_test_files(tmp_path, capsys):
    (tmp_path / "test.csv").write_text("id,text\n00677,a\n5,b\n")
    sub = tmp_path / "sub.csv"
    sub.write_text("id,target\n5,0\n00677,1\n")
    assert advtrain.main(["check-submission", "--data-dir", str(tmp_path), str(sub)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_quick_prints_the_table(tmp_path, data_dir):
    sys.path.insert(0, str(ROOT / "tools"))
    import bench

    out = tmp_path / "bench"
    assert bench.main(["--quick", "--data-dir", str(data_dir), "--output-dir", str(out), "--device", "cpu",
                       "--methods", "fgm,awp"]) == 0
    result = json.loads((out / "bench.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"article setup", "kit, batch 8", "kit baseline", "kit fgm", "kit awp"}
    assert all(r["samples_per_s"] > 0 and r["step_ms"] > 0 for r in rows.values())
    # ratios are against the rows they name: each row's step time over the kit baseline's
    for r in rows.values():
        assert r["step_vs_kit_baseline"] == pytest.approx(r["step_ms"] / rows["kit baseline"]["step_ms"], rel=0.02)
    assert result["submission_seconds"] > 0 and result["test_rows"] == 120 and "torch" in result["versions"]
    text = (out / "bench.md").read_text()
    assert "| kit awp | 32 | fp32 |" in text and "competition files" in text and str(tmp_path) not in text
    assert bench.main(["--methods", "magic"]) == 2
    assert bench.main(["--steps", "0"]) == 2 and bench.main(["--warmup", "0"]) == 2


def test_readme_config_table_lists_every_field():
    readme = (ROOT / "README.md").read_text()
    for f in advtrain.dataclasses.fields(advtrain.Config):
        assert f"| `--{f.name.replace('_', '-')}` |" in readme, f.name


# --- evaluation within epochs, checkpoint selection, threshold ------------------------------------

def test_evaluation_steps_fractions_and_step_counts():
    assert advtrain.evaluation_steps(0.25, 10, 2) == [2, 5, 8, 10, 12, 15, 18, 20]
    assert advtrain.evaluation_steps(1.0, 10, 2) == [10, 20]
    assert advtrain.evaluation_steps(4, 10, 2) == [4, 8, 10, 12, 16, 20]
    assert advtrain.evaluation_steps(0.25, 2, 1) == [1, 2]  # never twice at one step, never at step 0


def test_the_checkpoint_is_chosen_among_mid_epoch_evaluations(data_dir, model_dirs, tmp_path, monkeypatch):
    scripted = iter([0.50, 0.90, 0.60, 0.70, 0.80, 0.85, 0.89, 0.88])  # best: the 2nd evaluation, mid epoch 1
    real_metrics, real_predict, states = advtrain.Task.evaluate, advtrain.predict_proba, []

    def metrics(task, y_true, pred, threshold=0.5):
        score = next(scripted, None)
        return real_metrics(task, y_true, pred, threshold) if score is None else {"f1": score, "accuracy": score}

    def predict(model, ids, *args, **kwargs):
        if len(ids) == 90 and len(states) < 8:  # the validation set, during training
            states.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_predict(model, ids, *args, **kwargs)

    monkeypatch.setattr(advtrain.Task, "evaluate", metrics)
    monkeypatch.setattr(advtrain, "predict_proba", predict)
    out = tmp_path / "mid"
    result = advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=2, valid_size=90, eval_every=0.25,
                                      save_model=True, method="fgm", adv_start="0.25"))
    assert len(result["evaluations"]) == len(states) == 8
    assert result["selected"][0]["step"] == result["evaluations"][1]["step"] < result["evaluations"][3]["step"]
    assert 0.4 < result["selected"][0]["epoch"] == result["evaluations"][1]["epoch"] < 0.6
    assert result["attack_seen"] is True
    assert [e["attack_seen"] for e in result["evaluations"]] == [False] + [True] * 7
    from safetensors.torch import load_file

    saved = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(saved[k], states[1][k]) for k in saved)
    assert "(valid f1 0.9000), after the attack started" in (out / "train.log").read_text()


def brute_force_best_f1(y, p):
    cuts = np.concatenate([np.linspace(-0.01, 1.01, 2001), np.unique(p), np.unique(p) - 1e-9])
    predicted = p[None, :] > cuts[:, None]  # every cut at once
    tp = (predicted & (y[None, :] == 1)).sum(1)
    return float(np.max(2 * tp / np.maximum(predicted.sum(1) + (y == 1).sum(), 1)))


@pytest.mark.parametrize("seed", range(5))
def test_threshold_search_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 40), 0, 1).round(2)  # ties included
    t = advtrain.best_threshold(y, p)
    assert f1_score(y, (p > t).astype(int), zero_division=0.0) == pytest.approx(brute_force_best_f1(y, p))
    assert 0 <= t <= 1


def test_threshold_setting_reaches_the_submission(data_dir, model_dirs, tmp_path):
    fixed = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "fixed", epochs=1, threshold="0.9"))
    assert fixed["score"]["threshold"] == 0.9
    probs = pd.read_csv(tmp_path / "fixed" / "test_probs.csv")["prob"]
    sub = pd.read_csv(tmp_path / "fixed" / "submission.csv")["target"]
    assert ((probs > 0.9).astype(int) == sub).all()
    argmax = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "argmax", epochs=1,
                                      threshold="argmax"))
    assert argmax["score"]["threshold"] == 0.5 and argmax["score"]["argmax"] == argmax["score"]["tuned"]
    auto = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "auto", epochs=1, threshold="auto"))
    valid = pd.read_csv(tmp_path / "auto" / "oof.csv").query("split == 'valid'")
    expected = advtrain.best_threshold(valid["target"], valid["prob"])
    assert auto["score"]["threshold"] == pytest.approx(expected, abs=1e-6)


def test_last_partial_accumulation_group_has_full_weight(data_dir, model_dirs, tmp_path, monkeypatch):
    seen, real = [], advtrain.micro_step
    monkeypatch.setattr(advtrain, "micro_step", lambda *a: (seen.append(a[7]), real(*a))[1])
    advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "acc", epochs=1, batch_size=120, grad_accum=2,
                             eval_every=1.0))
    assert seen == [2, 2, 2, 2, 2, 2, 1]  # 800 rows / 120 = 7 micro-batches: the 7th is a group of its own


# --- settings ------------------------------------------------------------------------------------

def test_presets_apply_through_the_python_api_and_explicit_settings_win(data_dir, model_dirs, tmp_path):
    cfg = advtrain.Config(preset="article")
    assert (cfg.lr, cfg.batch_size, cfg.epochs, cfg.fgm_scope, cfg.threshold) == (2e-6, 8, 5, "vocab", "argmax")
    assert advtrain.Config(preset="article", lr=1e-5, epochs=1).lr == 1e-5
    metrics = advtrain.demo(str(tmp_path / "demo"), preset="article", epochs=1, progress=False)
    assert metrics["config"]["batch_size"] == 8 and metrics["config"]["lr"] == 2e-6


@pytest.mark.parametrize("setting,message", [
    (dict(lr=float("nan")), "lr must be a finite number"), (dict(lr=-1e-3), "lr must be positive"),
    (dict(dropout=1.5), "dropout is a probability"), (dict(seed=-1), "seed must not be negative"),
    (dict(num_workers=-1), "num_workers must not be negative"), (dict(max_len=-5), "max_len must not be negative"),
    (dict(device="foo"), "device must be auto, cpu, cuda"), (dict(device="mps"), "device must be"),
    (dict(holdout_size=0), "holdout_size is a number of rows"), (dict(valid_size=2.5), "valid_size is a number"),
    (dict(holdout_size=-5), "holdout_size is a number of rows"), (dict(seed=2**32), "seed must be below 2"),
    (dict(eval_every=1e-9), "eval_every is a fraction of an epoch in \\[0.01, 1\\]"),
    (dict(max_len=1), "max_len 1 leaves no room for text"), (dict(fgm_eps=float("nan")), "fgm_eps must be a finite"),
    (dict(eval_every=0), "eval_every"), (dict(eval_every=2.5), "eval_every"), (dict(threshold="1.5"), "threshold"),
])
def test_every_setting_is_checked_when_the_config_is_built(setting, message):
    with pytest.raises(advtrain.UserError, match=message):
        advtrain.Config(**setting)


def test_env_overrides_are_checked_too():
    with pytest.raises(advtrain.UserError, match="lr must be a finite"):
        advtrain.env_overrides(advtrain.Config(), {"ADVTRAIN_LR": "nan"})
    with pytest.raises(advtrain.UserError, match="device must be"):
        advtrain.env_overrides(advtrain.Config(), {"ADVTRAIN_DEVICE": "gpu"})


def test_kfold_with_more_folds_than_rows_of_a_class_is_refused_before_training(tmp_path, model_dirs):
    data = advtrain.make_demo_data(tmp_path / "small", n_train=40, n_test=10)
    with pytest.raises(advtrain.UserError, match="n_folds=30 is more than"):
        advtrain.run(base_config(data, model_dirs["bert"], tmp_path / "kf", split="kfold", n_folds=30,
                                 holdout_size=1, valid_size=1))


# --- nothing silently wrong ----------------------------------------------------------------------

def test_a_diverging_loss_stops_the_run_with_one_sentence(data_dir, model_dirs, tmp_path, monkeypatch, capsys):
    real = advtrain.micro_step
    monkeypatch.setattr(advtrain, "micro_step", lambda *a: real(*a) * float("nan"))
    out = tmp_path / "nan"
    code = advtrain.main(["train", "--model", str(model_dirs["bert"]), "--data-dir", str(data_dir), "--output-dir",
                          str(out), "--epochs", "1", "--holdout-size", "100", "--valid-size", "100", "--device", "cpu",
                          "--no-progress"])
    assert code == 2 and "training diverged" in capsys.readouterr().err
    assert not (out / "submission.csv").exists() and not (out / "metrics.json").exists()


def test_metrics_json_is_strict_json(tmp_path):
    advtrain.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})

    def refuse(name):
        raise ValueError(name)

    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {"a": None, "b": [1.0, None],
                                                                                     "c": {"d": 2}}


def test_a_model_folder_without_its_tokenizer_is_refused(data_dir, model_dirs, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in model_dirs["bert"].iterdir():
        if f.name in ("config.json", "model.safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())
    code = advtrain.main(["train", "--model", str(folder), "--data-dir", str(data_dir), "--output-dir",
                          str(tmp_path / "out"), "--epochs", "1", "--device", "cpu", "--no-progress",
                          "--holdout-size", "100", "--valid-size", "100"])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer" in err.lower() and len(err.strip().splitlines()) == 1, err


def test_a_tokenizer_larger_than_the_model_is_refused(model_dirs):
    tok = advtrain.load_tokenizer(str(model_dirs["bert"]))
    small = types.SimpleNamespace(vocab_size=5)
    with pytest.raises(advtrain.UserError, match="has only 5 embeddings"):
        advtrain.check_tokenizer(tok, small, [[1, 2, 9]], "m")


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_scheduler_warms_up_linearly_then_decays_as_named(kind):
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    scheduler = advtrain.build_scheduler(optimizer, kind, warmup_steps=4, total_steps=14)
    lrs = []
    for _ in range(14):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    after = np.array(lrs[4:])
    progress = np.arange(10) / 10
    expected = {"cosine": 0.5 * (1 + np.cos(np.pi * progress)), "linear": 1 - progress,
                "constant": np.ones(10)}[kind]
    np.testing.assert_allclose(after, expected, atol=1e-12)


def test_binary_metrics_equal_the_hand_formulas_of_earlier_versions():
    """F1 of the positive class, 2tp / (2tp + fp + fn) (0 without any positive), and accuracy: what the kit
    computed by hand before it used scikit-learn, so Disaster Tweets scores do not move."""
    rng = np.random.default_rng(0)
    task = advtrain.DISASTER_TWEETS
    for _ in range(20):
        y, p1 = rng.integers(0, 2, 50), rng.random(50)
        label = (p1 > 0.5).astype(int)
        tp, fp, fn = [int(((label == a) & (y == b)).sum()) for a, b in ((1, 1), (1, 0), (0, 1))]
        got = task.evaluate(y, np.stack([1 - p1, p1], 1))
        assert got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        assert got["accuracy"] == pytest.approx((label == y).mean())
    assert task.evaluate(np.array([0, 0]), np.array([[0.9, 0.1], [0.8, 0.2]]))["f1"] == 0.0


def test_mean_pooling_averages_real_tokens_only(model_dirs):
    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]), pooling="mean", dropout=0.0).eval()
    ids = torch.tensor([[2, 7, 8, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    hidden = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = model.head(hidden[:, :4].mean(1))
    torch.testing.assert_close(model(ids, mask), expected)
    longer = torch.cat([ids, torch.tensor([[9, 9]])], 1), torch.cat([mask, torch.zeros(1, 2, dtype=torch.long)], 1)
    torch.testing.assert_close(model(*longer), expected, rtol=1e-5, atol=1e-6)  # padding changes nothing
