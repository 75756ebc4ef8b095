"""The engine end to end: training, metrics.json, submission, reproducibility, AMP, clipping, protection."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import advtrain
from conftest import ROOT, base_config


@pytest.fixture(scope="module")
def baseline_run(data_dir, model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "baseline"
    return out, advtrain.run(base_config(data_dir, model_dirs["deberta-v2"], out, epochs=3, save_model=True))


def test_training_learns_the_synthetic_task(baseline_run):
    _, metrics = baseline_run
    losses = [e["train_loss"] for e in metrics["epochs"]]
    assert losses[-1] < losses[0] < 0.75
    assert metrics["holdout"]["accuracy"] > 0.8 and metrics["holdout"]["f1"] > 0.75
    assert metrics["valid_best"]["epoch"] in (1, 2, 3)


def test_metrics_json_holds_the_contract(baseline_run):
    out, metrics = baseline_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["holdout"] == metrics["holdout"]
    for key in ("config", "epochs", "valid_best", "holdout", "train_samples_per_s", "device", "versions"):
        assert key in saved
    assert saved["config"]["method"] == "baseline" and saved["config"]["max_len"] > 0
    assert {"valid_accuracy", "valid_f1", "train_loss", "seconds"} <= set(saved["epochs"][0])
    assert {"torch", "transformers"} <= set(saved["versions"])
    assert (out / "train.log").read_text().count("valid acc") == 3
    assert (out / "model.pt").is_file()


def test_submission_has_the_test_ids_in_order_and_integer_targets(baseline_run, data_dir):
    out, _ = baseline_run
    sub = pd.read_csv(out / "submission.csv")
    sample = pd.read_csv(data_dir / "sample_submission.csv")
    assert list(sub.columns) == ["id", "target"]
    assert sub["id"].tolist() == sample["id"].tolist()
    assert set(sub["target"].unique()) <= {0, 1} and sub["target"].dtype.kind == "i"
    probs = pd.read_csv(out / "test_probs.csv")
    assert probs["id"].tolist() == sample["id"].tolist()
    assert ((probs["prob"] > 0.5).astype(int) == sub["target"]).all()
    oof = pd.read_csv(out / "oof.csv")
    assert (oof["split"] == "holdout").sum() == 100 and (oof["split"] == "valid").sum() == 100


def test_same_seed_same_predictions(data_dir, model_dirs, tmp_path):
    runs = [advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / f"r{i}", epochs=1)) for i in range(2)]
    probs = [pd.read_csv(tmp_path / f"r{i}" / "test_probs.csv")["prob"].to_numpy() for i in range(2)]
    np.testing.assert_array_equal(probs[0], probs[1])
    assert runs[0]["holdout"] == runs[1]["holdout"]


def test_bf16_autocast_path_runs(data_dir, model_dirs, tmp_path):
    metrics = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "bf16", epochs=1, amp="bf16",
                                       method="fgm"))
    assert metrics["amp"] == "bfloat16" and np.isfinite(metrics["epochs"][0]["train_loss"])


def test_kfold_writes_out_of_fold_predictions_for_every_row(data_dir, model_dirs, tmp_path):
    metrics = advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "kf", epochs=1, split="kfold",
                                       n_folds=3))
    oof = pd.read_csv(tmp_path / "kf" / "oof.csv")
    train = pd.read_csv(data_dir / "train.csv")
    assert sorted(oof["id"]) == sorted(train["id"]) and set(oof["fold"]) == {0, 1, 2}
    assert metrics["holdout"]["source"] == "out-of-fold predictions"
    assert len(metrics["epochs"]) == 3 and {e["fold"] for e in metrics["epochs"]} == {0, 1, 2}


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


def test_cli_contract_and_check_submission(data_dir, model_dirs, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "advtrain.py"), "train", "--method", "baseline", "--model",
           str(model_dirs["deberta-v2"]), "--data-dir", str(data_dir), "--output-dir", str(out), "--epochs", "1",
           "--batch-size", "32", "--lr", "1e-3", "--seed", "7", "--holdout-size", "100", "--valid-size", "100",
           "--device", "cpu", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "epoch 1/1 | loss" in done.stdout
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 7
    check = [sys.executable, str(ROOT / "advtrain.py"), "check-submission", "--data-dir", str(data_dir)]
    ok = subprocess.run(check + [str(out / "submission.csv")], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = out / "bad.csv"
    pd.read_csv(out / "submission.csv").iloc[::-1].to_csv(bad, index=False)
    failed = subprocess.run(check + [str(bad)], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "ids differ from the test set's order" in failed.stderr


def test_check_submission_refuses_bad_targets():
    sub = pd.DataFrame({"id": [1, 2], "target": [0, 0.5]})
    with pytest.raises(advtrain.UserError, match="integer 0 or 1"):
        advtrain.check_submission(sub, [1, 2])
    with pytest.raises(advtrain.UserError, match="2 rows, but the test set has 3"):
        advtrain.check_submission(sub.assign(target=0), [1, 2, 3])


def test_bench_quick_prints_the_table(tmp_path, data_dir):
    out = tmp_path / "bench"
    assert advtrain.main(["bench", "--quick", "--data-dir", str(data_dir), "--output-dir", str(out),
                          "--device", "cpu", "--methods", "fgm,awp"]) == 0
    result = json.loads((out / "bench.json").read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"seed-style (article setup)", "kit, batch 8", "kit baseline", "kit fgm", "kit awp"}
    assert rows["kit baseline"]["step_vs_kit_baseline"] == 1.0
    assert all(r["samples_per_s"] > 0 and r["step_ms"] > 0 for r in rows.values())
    assert rows["seed-style (article setup)"]["speedup_vs_seed_style"] == 1.0
    assert result["submission_seconds"] > 0 and result["test_rows"] == 120 and "torch" in result["versions"]
    text = (out / "bench.md").read_text()
    assert "| kit awp | 32 | fp32 |" in text and "competition files" in text


def test_readme_config_table_lists_every_field():
    readme = (ROOT / "README.md").read_text()
    for f in advtrain.dataclasses.fields(advtrain.Config):
        assert f"| `--{f.name.replace('_', '-')}` |" in readme, f.name
