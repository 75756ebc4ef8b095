"""The fourth fuzz's causes, one test each (the numbers are the issue's): run records that know their data,
comparisons that score alike and say what they pair, and a Python API that checks its arguments."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import advtrain
from conftest import TEXTS, base_config, without_dropout

transformers = pytest.importorskip("transformers")


def tiny(data_dir, model_dir, out, **kw):
    return base_config(data_dir, model_dir, out, epochs=1, eval_every=1.0, **kw)


def copy_data(data_dir, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(data_dir, folder)
    return folder


def compare_args(data_dir, model_dir, out, methods="baseline,fgm", *extra):
    return ["compare", "--methods", methods, "--seeds", "1", "--model", str(model_dir), "--data-dir", str(data_dir),
            "--output-dir", str(out), "--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--holdout-size", "100",
            "--valid-size", "100", "--adv-start", "0", "--eval-every", "1", "--device", "cpu", "--no-progress",
            "--no-save-model", *extra]


# 1. a run knows the data it saw: compare and --resume refuse a record of other data, naming the file
def test_compare_refuses_to_reuse_a_run_after_train_csv_changed(data_dir, model_dirs, tmp_path, monkeypatch, capsys):
    data, out = copy_data(data_dir, tmp_path), tmp_path / "cmp"
    assert advtrain.main(compare_args(data, model_dirs["bert"], out)) == 0
    recorded = json.loads((out / "baseline-seed1" / "metrics.json").read_text())["inputs"]
    assert set(recorded) == {"train", "test", "sample_submission", "model"} and all(recorded.values())
    train = pd.read_csv(data / "train.csv")
    train.assign(target=1 - train["target"]).to_csv(data / "train.csv", index=False)  # every label flipped
    monkeypatch.setattr(advtrain, "run", lambda *a, **k: pytest.fail("trained on the changed file"))
    capsys.readouterr()
    assert advtrain.main(compare_args(data, model_dirs["bert"], out, "baseline,fgm", "--grid", "fgm_eps=0.1")) == 2
    err = capsys.readouterr().err
    assert f"baseline-seed1 was run on other data ({data / 'train.csv'} changed)" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    shutil.copy(data_dir / "train.csv", data / "train.csv")  # the same contents again: reused, whatever the path
    moved = tmp_path / "elsewhere"
    shutil.move(data, moved)
    monkeypatch.setattr(advtrain, "run", lambda *a, **k: pytest.fail("a run of the same data trained again"))
    assert advtrain.main(compare_args(moved, model_dirs["bert"], out)) == 0


def test_resume_refuses_a_checkpoint_of_other_data(data_dir, model_dirs, tmp_path, monkeypatch):
    data, out = copy_data(data_dir, tmp_path), tmp_path / "run"
    real, calls = advtrain.micro_step, []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) > 60:  # past the first epoch's checkpoint
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(advtrain, "micro_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        advtrain.run(base_config(data, model_dirs["bert"], out, epochs=2, eval_every=1.0))
    monkeypatch.undo()
    assert (out / advtrain.STAGE / advtrain.CHECKPOINT).is_file()
    train = pd.read_csv(data / "train.csv")
    train.assign(target=1 - train["target"]).to_csv(data / "train.csv", index=False)
    with pytest.raises(advtrain.UserError, match=r"--resume: the interrupted run was made on other data \(.*train.csv "
                                                 r"changed\): resume with the same settings and files"):
        advtrain.run(base_config(data, model_dirs["bert"], out, epochs=2, eval_every=1.0, resume=True))


# 2. a grid cannot vary what is scored
@pytest.mark.parametrize("item", ["metric=f1,logloss", "task=binary,regression", "select_metric=f1,accuracy",
                                  "target_cols=target,other"])
def test_a_grid_of_what_is_scored_is_refused_before_training(item):
    with pytest.raises(advtrain.UserError, match="runs of one comparison are scored alike"):
        advtrain.parse_grid([item])
    key = item.split("=")[0]
    with pytest.raises(advtrain.UserError, match=f"--grid {key}: runs of one comparison are scored alike"):
        advtrain.compare(advtrain.Config(output_dir="unused"), ["baseline"], [1], grid={key: ["f1"]})


# 3. without a baseline, the reference is named and so is the reason nothing pairs
@pytest.mark.slow
def test_a_comparison_without_a_baseline_names_its_reference_and_why_nothing_pairs(data_dir, model_dirs, tmp_path):
    out = tmp_path / "cmp"
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out, "fgm,awp", "--grid",
                                      "fgm_eps=0.1,0.3")) == 0
    text = (out / "results.md").read_text()
    assert "No baseline in --methods: fgm, the first method, is the reference of the paired differences." in text
    assert ("No paired differences: fgm runs under several settings of the grid, and no run of another method "
            "shares a setting with one of them; add baseline to --methods") in text


# 4. a later compare into the same folder leaves none of the earlier report files beside its own
@pytest.mark.slow
def test_report_files_of_an_earlier_compare_do_not_stay(data_dir, model_dirs, tmp_path):
    out = tmp_path / "cmp"
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out, "baseline,fgm", "--grid", "fgm_eps=0.1,0.3",
                                      "--ensemble", "baseline,fgm")) == 0
    assert (out / "grid.png").is_file() and (out / "ensemble_submission.csv").is_file()
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out)) == 0
    assert not (out / "grid.png").exists() and not (out / "ensemble_submission.csv").exists()
    assert (out / "results.md").is_file() and (out / "score.png").is_file()


# 5. a value with "/" names a flat folder, one per value
def test_grid_values_that_are_paths_make_flat_distinct_run_folders(data_dir, model_dirs, tmp_path):
    a, b = tmp_path / "x" / "model", tmp_path / "y" / "model"
    shutil.copytree(model_dirs["bert"], a)
    shutil.copytree(model_dirs["bert"], b)
    names = {advtrain.run_dir_name("baseline", 1, {"model": str(p)}) for p in (a, b)}
    assert len(names) == 2 and all("/" not in n for n in names)
    assert advtrain.run_dir_name("awp", 1, {"awp_lr": 0.5}) == "awp-awp_lr=0.5-seed1"  # plain values as written
    out = tmp_path / "cmp"
    assert advtrain.main(compare_args(data_dir, model_dirs["bert"], out, "baseline", "--grid",
                                      f"model={a},{b}")) == 0
    assert sorted(p.parent.name for p in out.glob("*/metrics.json")) == sorted(names)


# 6. baselines of two values of another setting are two distinguishable lines
def test_grid_plot_draws_each_untouched_variant_in_its_own_style(tmp_path, monkeypatch):
    figures = []
    real = advtrain._figure
    monkeypatch.setattr(advtrain, "_figure", lambda: figures.append(real()) or figures[-1])
    rows = []
    for lr in (1e-4, 3e-5):
        rows.append(dict(method="baseline", lr=lr, fgm_eps=np.nan, score=0.5 + lr * 100))
        rows += [dict(method="fgm", lr=lr, fgm_eps=e, score=0.5 + e) for e in (0.1, 0.2)]
    results = pd.DataFrame(rows).assign(metric="f1", seed=1)
    advtrain.plot_grid(tmp_path / "grid.png", results, ["fgm_eps", "lr"], promoted=[("fgm", ("lr", 1e-4),
                                                                                     ("fgm_eps", 0.2))])
    ax = figures[-1].axes[0]
    flat = [line for line in ax.get_lines() if line.get_label().startswith("baseline")]
    assert len(flat) == 2 and {line.get_label() for line in flat} == {"baseline (lr=0.0001)", "baseline (lr=3e-05)"}
    assert flat[0].get_color() != flat[1].get_color()
    assert any(c.get_label() == "promoted" for c in ax.collections)


# 7.-9. AdversarialTrainer: the task's loss in the outputs' shape, on any head; task and adv_start checked
def trainer_args(tmp_path):
    return transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                                          report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                          logging_strategy="no")


def test_regression_targets_one_per_row_are_not_broadcast(model_dirs, tmp_path):
    task = advtrain.Task("regression", ["score"], "rmse")
    logits, labels = torch.randn(8, 1), torch.randn(8)
    expected = torch.nn.functional.mse_loss(logits.squeeze(-1), labels)
    torch.testing.assert_close(task.loss(logits, labels), expected)
    assert not torch.allclose(torch.nn.functional.mse_loss(logits, labels), expected)  # what broadcasting gave
    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]), num_labels=1)
    trainer = advtrain.AdversarialTrainer(model=model, args=trainer_args(tmp_path), task=task)
    torch.testing.assert_close(trainer._classifier_loss(logits, labels), expected)
    multi = advtrain.Task("multilabel", ["a", "b"], "auc")
    ints = torch.tensor([[0, 1], [1, 1]])  # int64 0/1 labels, as a DataFrame gives them
    torch.testing.assert_close(multi.loss(torch.zeros(2, 2), ints),
                               torch.nn.functional.binary_cross_entropy_with_logits(torch.zeros(2, 2), ints.float()))
    with pytest.raises(ValueError, match="targets of shape"):
        task.loss(logits, torch.randn(3))


def test_a_task_given_with_a_hugging_face_head_is_trained(model_dirs, tmp_path):
    config = transformers.AutoConfig.from_pretrained(model_dirs["bert"], num_labels=1)
    model = without_dropout(transformers.AutoModelForSequenceClassification.from_pretrained(model_dirs["bert"],
                                                                                            config=config))
    tok = advtrain.load_tokenizer(str(model_dirs["bert"]))
    batch, _ = advtrain.Collator(tok.pad_token_id)([(x, 0) for x in advtrain.tokenize(tok, TEXTS, 32)])
    labels = torch.tensor([0.5, 1.5, 2.0, 0.0])
    trainer = advtrain.AdversarialTrainer(model=model, args=trainer_args(tmp_path), task="regression")
    assert trainer.task.kind == "regression" and trainer.model_accepts_loss_kwargs is False
    loss = trainer.compute_loss(model, {**batch, "labels": labels})
    logits = model(**batch).logits
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(logits.squeeze(-1), labels))


@pytest.mark.parametrize("start,error", [("warmup", None), ("1", None), (0.5, None), ("auto", "watches"),
                                         (float("nan"), "an epoch >= 0"), (-1, "an epoch >= 0"),
                                         ("soon", "an epoch >= 0"), (True, "an epoch >= 0")])
def test_trainer_checks_adv_start_and_task_when_built(model_dirs, tmp_path, start, error):
    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]))
    make = lambda: advtrain.AdversarialTrainer(model=model, args=trainer_args(tmp_path),  # noqa: E731
                                               attack=advtrain.FGM(model), adv_start=start, task="binary")
    if error:
        with pytest.raises(ValueError, match=error):
            make()
    else:
        trainer = make()
        assert trainer.adv_start == (start if start == "warmup" else float(start)) and trainer.task.kind == "binary"
    with pytest.raises(ValueError, match="task must be an advtrain.Task or one of"):
        advtrain.AdversarialTrainer(model=model, args=trainer_args(tmp_path), task="binary-ish")


# 10. each attack refuses sizes Config refuses, naming the argument
@pytest.mark.parametrize("method,argument", [("fgm", "eps"), ("pgd", "eps"), ("pgd", "alpha"), ("pgd", "steps"),
                                             ("freelb", "steps"), ("freelb", "lr"), ("freelb", "init_mag"),
                                             ("freelb", "max_norm"), ("awp", "adv_lr"), ("awp", "adv_eps"),
                                             ("sift", "alpha"), ("sift", "init"), ("sift", "lr")])
def test_attack_constructors_refuse_sizes_that_are_not_finite_non_negative(model_dirs, method, argument):
    from conftest import ATTACKS

    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]))
    bad = [0, 2.5, -1] if argument == "steps" else [float("nan"), float("inf"), -0.1]
    for value in bad:
        with pytest.raises(ValueError, match=f"{argument} must be"):
            ATTACKS[method](model, **{argument: value})
    ATTACKS[method](model, **{argument: 2 if argument == "steps" else 0.0})  # the edge that is allowed


# 11. SiFT's mask is bool or 0/1
def test_sift_refuses_a_mask_of_labels_or_nan(model_dirs):
    model = without_dropout(advtrain.Classifier.from_pretrained(str(model_dirs["bert"]), num_labels=3))
    tok = advtrain.load_tokenizer(str(model_dirs["bert"]))
    batch, labels = advtrain.Collator(tok.pad_token_id)([(x, i % 3) for i, x in
                                                         enumerate(advtrain.tokenize(tok, TEXTS, 32))])
    attack = advtrain.SiFT(model)

    def step(mask):
        return attack.backward(lambda: model(**batch).unsqueeze(1), lambda out: torch.nn.functional.cross_entropy(
            out[:, 0], labels), mask=mask)

    for mask in (torch.tensor([[-100], [1], [1], [-100]]), torch.tensor([[1.0], [float("nan")], [1.0], [0.0]])):
        with pytest.raises(ValueError, match="SiFT mask must be bool or 0/1"):
            step(mask)
    assert torch.isfinite(step(torch.tensor([[1], [0], [1], [1]]))) and attack.last_kl >= 0
    assert torch.isfinite(step(torch.tensor([[True], [False], [True], [True]])))


# 12.-14. run files read through one checked reader; the message names the file, not a flag predict lacks
@pytest.fixture(scope="module")
def saved(data_dir, model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    advtrain.run(tiny(data_dir, model_dirs["bert"], out, save_model=True))
    return out


def damaged(saved, tmp_path, change, file="metrics.json"):
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    path = run / file if file == "metrics.json" else run / "model" / file
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    return run


@pytest.mark.parametrize("change,says", [
    (lambda m: m.__setitem__("config", None), "config is missing"),
    (lambda m: m.pop("score"), "score is missing"),
    (lambda m: m["score"].__setitem__("threshold", "high"), "score.threshold is 'high', not a probability"),
    (lambda m: m["config"].__setitem__("eval_batch_size", "many"), "config.eval_batch_size is 'many', not a int"),
    (lambda m: m["config"].__setitem__("eval_batch_size", 0), "eval_batch_size must be at least 1"),
    (lambda m: m["task"].__setitem__("kind", "ranking"), "its task is not one advtrain trains"),
])
def test_a_damaged_metrics_json_is_one_sentence_naming_it(saved, data_dir, tmp_path, capsys, change, says):
    run = damaged(saved, tmp_path, change)
    assert advtrain.main(["predict", "--runs", str(run), "--data-dir", str(data_dir), "--output-dir",
                          str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert says in err and str(run / "metrics.json") in err and len(err.strip().splitlines()) == 1


def test_settings_a_record_lacks_count_as_their_defaults(saved, data_dir, tmp_path):
    run = damaged(saved, tmp_path, lambda m: [m["config"].pop(k) for k in ("competition", "eval_batch_size")])
    sub = advtrain.predict([run], str(data_dir), str(tmp_path / "out"), progress=False)
    assert len(sub) == len(pd.read_csv(data_dir / "test.csv"))


@pytest.mark.parametrize("change,says", [(lambda i: i.pop("max_len"), "max_len is 'missing', not a token limit"),
                                         (lambda i: i.__setitem__("max_len", 0), "max_len is 0, not a token limit"),
                                         (lambda i: i.__setitem__("num_labels", "2"), "num_labels is '2'")])
def test_a_damaged_advtrain_json_names_the_file_not_a_flag(saved, data_dir, tmp_path, capsys, change, says):
    run = damaged(saved, tmp_path, change, "advtrain.json")
    assert advtrain.main(["predict", "--runs", str(run), "--data-dir", str(data_dir), "--output-dir",
                          str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert says in err and "advtrain.json" in err and "--max-len" not in err and len(err.strip().splitlines()) == 1


def test_spaces_around_run_folders_are_dropped(saved, data_dir, tmp_path):
    assert advtrain.main(["predict", "--runs", f"{saved}, {saved} ", "--weights", "1, 2", "--data-dir", str(data_dir),
                          "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0


# 15. the id column taken from the sample is said, and the sample's own column order is kept
def test_an_id_column_that_is_not_first_in_the_sample(data_dir, model_dirs, tmp_path, capsys):
    data = copy_data(data_dir, tmp_path)
    sample = pd.read_csv(data / "sample_submission.csv")[["target", "id"]]
    sample.to_csv(data / "sample_submission.csv", index=False)
    with pytest.raises(advtrain.UserError, match=r"has no column target, the first column of .*sample_submission.csv"
                                                 r", which was taken as the id: name the id column with --id-col "
                                                 r"\(--id-col id\?\)"):
        advtrain.load_competition(advtrain.Config(data_dir=str(data), output_dir="unused"))
    out = tmp_path / "run"
    advtrain.run(tiny(data, model_dirs["bert"], out, id_col="id"))
    written = pd.read_csv(out / "submission.csv", dtype=str)
    assert list(written.columns) == ["target", "id"]
    assert advtrain.main(["check-submission", str(out / "submission.csv"), "--data-dir", str(data), "--id-col",
                          "id"]) == 0
    assert "OK" in capsys.readouterr().out


# 16. ids written as floats in one file are named as a number format
def test_float_ids_against_integer_ids_name_the_number_format(data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path)
    sample = pd.read_csv(data / "sample_submission.csv")
    sample.assign(id=sample["id"].astype(float)).to_csv(data / "sample_submission.csv", index=False)
    with pytest.raises(advtrain.UserError, match=r"write the same ids in two number formats \('\d+\.0' and '\d+'\)"):
        advtrain.load_competition(advtrain.Config(data_dir=str(data), output_dir="unused"))


# 17. the competition a run records is the one its data came from, or none
def test_a_run_records_no_competition_it_cannot_tell(saved, tmp_path):
    assert json.loads((saved / "metrics.json").read_text())["config"]["competition"] == ""
    assert advtrain.Config(output_dir="x").competition == ""
    cfg = advtrain.Config(output_dir="x")
    mount = advtrain.KAGGLE_INPUT / "competitions" / "spooky-author-identification"
    assert advtrain.competition_of(cfg, mount) == "spooky-author-identification"
    assert advtrain.competition_of(cfg, tmp_path / "spooky-author-identification") == ""
    assert advtrain.competition_of(advtrain.Config(output_dir="x", competition="nlp-getting-started"), tmp_path) == \
        "nlp-getting-started"


def test_a_task_that_does_not_fit_the_models_outputs_is_refused_when_built(model_dirs, tmp_path):
    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]), num_labels=2)
    with pytest.raises(ValueError, match="task regression with 1 output.s. does not fit the model's 2: build the "
                                         "model with num_labels=1"):
        advtrain.AdversarialTrainer(model=model, args=trainer_args(tmp_path), task=advtrain.Task(
            "regression", ["score"], "rmse"))
