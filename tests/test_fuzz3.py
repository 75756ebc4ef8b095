"""The third fuzz's causes (predict, task inference, DataFrames), one test each: a hostile input and
the exact behaviour chosen for it. Numbers in comments are the issue's items."""
import numpy as np
import pandas as pd
import pytest

import advtrain
from conftest import base_config


def competition(folder, train: pd.DataFrame, test: pd.DataFrame | None = None, sample: pd.DataFrame | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    train.to_csv(folder / "train.csv", index=False)
    test = test if test is not None else pd.DataFrame({"id": ["t1", "t2"], "text": ["a b", "c d"]})
    test.to_csv(folder / "test.csv", index=False)
    if sample is not None:
        sample.to_csv(folder / "sample_submission.csv", index=False)
    return folder


def texts(n):
    return [f"word{i % 7} thing{i % 3} and more" for i in range(n)]


def loaded(folder, **kw):
    return advtrain.load_competition(advtrain.Config(data_dir=str(folder), output_dir="unused", **kw))


# 8. a 0/1 target written 0.0/1.0 is binary
def test_a_target_written_as_decimals_of_whole_numbers_is_binary(tmp_path):
    train = pd.DataFrame({"id": range(6), "text": texts(6), "target": [0, 1, np.nan, 1, 0, 1]}).dropna()
    assert train["target"].astype(str).iloc[0] == "0.0"  # what pandas writes
    data = loaded(competition(tmp_path, train))
    assert data["task"].kind == "binary" and data["task"].metric == "f1"
    assert data["task"].encode(data["train"]).tolist() == [0, 1, 1, 0, 1]


# 9. an integer target with stray strings is refused, not read as classes
@pytest.mark.parametrize("stray", ["nan", "NA", "n/a"])
def test_an_integer_target_with_stray_strings_is_refused(tmp_path, stray):
    values = ["0", "1"] * 10 + [stray]
    train = pd.DataFrame({"id": range(21), "text": texts(21), "target": values})
    with pytest.raises(advtrain.UserError, match=f"target holds numbers but 1 value\\(s\\) that are not \\(line 22, "
                                                 f"'{stray}'\\): fill or drop those rows"):
        loaded(competition(tmp_path, train))


# 10. --select-metric must score the task
@pytest.mark.parametrize("target,metric", [(["a", "b", "c"] * 4, "pearson"), ([0, 1] * 6, "rmse"),
                                           ([0.5, 1.5, 2.5] * 4, "f1")])
def test_a_select_metric_that_cannot_score_the_task_is_refused_before_training(tmp_path, model_dirs, target,
                                                                                metric):
    train = pd.DataFrame({"id": range(12), "text": texts(12), "target": target})
    cfg = base_config(competition(tmp_path, train), model_dirs["bert"], tmp_path / "out", select_metric=metric,
                      holdout_size=0.25, valid_size=0.25)
    with pytest.raises(advtrain.UserError, match=f"--select-metric {metric} does not score a"):
        advtrain.prepare_data(cfg)


# 11. rows without a group are groups of their own
def test_rows_without_a_group_are_each_a_group_of_their_own(tmp_path, model_dirs, caplog):
    train = pd.DataFrame({"id": range(40), "text": texts(40), "target": [0, 1] * 20,
                          "g": [""] * 30 + ["x"] * 5 + ["y"] * 5})
    cfg = base_config(competition(tmp_path, train), model_dirs["bert"], tmp_path / "out", group_col="g",
                      holdout_size=0.25, valid_size=0.25)
    with caplog.at_level("INFO", logger="advtrain"):
        data = advtrain.prepare_data(cfg)
    assert "30 row(s) have no group; each is a group of its own" in caplog.text
    assert len(set(data["groups"])) == 32
    train_rows, valid, holdout = advtrain.holdout_split(40, 42, 0.25, 0.25, data["groups"])
    assert 8 <= len(holdout) <= 12  # not 30 rows dealt out as one group


# 12. a .tsv quoted by pandas reads as written by pandas; Kaggle's bare quotes stay
def test_a_tsv_written_by_pandas_is_read_with_its_quoting(tmp_path):
    df = pd.DataFrame({"id": ["1", "2"], "text": ['he said "hi" there', "plain"], "target": ["0", "1"]})
    df.to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    assert advtrain.read_table(tmp_path / "train.tsv")["text"].tolist() == df["text"].tolist()
    df.to_csv(tmp_path / "quoted.tsv", sep="\t", index=False, quoting=1)  # quoted throughout
    assert advtrain.read_table(tmp_path / "quoted.tsv").columns.tolist() == ["id", "text", "target"]
    (tmp_path / "kaggle.tsv").write_text('PhraseId\tPhrase\n1\t" A bare quote\n2\tends "\n3\t"\n')
    assert advtrain.read_table(tmp_path / "kaggle.tsv")["Phrase"].tolist() == ['" A bare quote', 'ends "', '"']


# 13. word labels where the sample submission holds numbers
def test_word_labels_with_a_numeric_sample_column_stop_before_training(tmp_path):
    train = pd.DataFrame({"id": range(12), "text": texts(12), "target": ["no", "yes"] * 6})
    sample = pd.DataFrame({"id": ["t1", "t2"], "target": [0, 0]})
    with pytest.raises(advtrain.UserError, match="sample_submission.csv's target holds numbers, but train's targets "
                                                 "are the words no, yes: write train's target as the numbers"):
        loaded(competition(tmp_path, train, sample=sample))


# 15. DataFrames from Python: missing cells, <NA> targets, two columns of one name, integer column names
def test_dataframe_cells_are_read_as_a_file_reads_them(tmp_path):
    folder = competition(tmp_path, pd.DataFrame({"id": [0], "text": ["x"], "target": [0]}))
    cfg = advtrain.Config(data_dir=str(folder), output_dir="unused")
    train = pd.DataFrame({"id": range(6), "text": ["a", None, np.nan, "b", "c", "d"],
                          "target": pd.array([0, 1, 0, 1, 0, 1], dtype="Int64")})
    data = advtrain.load_competition(cfg, train=train)
    assert data["train"]["text"].tolist() == ["a", "", "", "b", "c", "d"] and data["task"].kind == "binary"
    holes = train.assign(target=pd.array([0, 1, None, 1, 0, 1], dtype="Int64"))
    with pytest.raises(advtrain.UserError, match=r"the train DataFrame: 1 row\(s\) have no target \(row 2\)"):
        advtrain.load_competition(cfg, train=holes)
    twice = pd.concat([train, train[["text"]]], axis=1)
    with pytest.raises(advtrain.UserError, match="the train DataFrame has the column 'text' more than once"):
        advtrain.load_competition(cfg, train=twice)
    numbered = pd.DataFrame({0: range(6), 1: ["a b"] * 6, 2: [0, 1] * 3})
    cfg = advtrain.Config(data_dir=str(folder), output_dir="unused", text_cols="1", target_cols="2", id_col="0")
    test = pd.DataFrame({0: ["t1", "t2"], 1: ["x", "y"]})
    assert advtrain.load_competition(cfg, train=numbered, test=test)["task"].kind == "binary"


# 17. no test file
def test_a_competition_folder_without_test_csv_is_one_sentence(tmp_path):
    folder = competition(tmp_path, pd.DataFrame({"id": range(4), "text": texts(4), "target": [0, 1] * 2}))
    (folder / "test.csv").unlink()
    with pytest.raises(advtrain.UserError, match="No test file: the competition folder needs test.csv"):
        loaded(folder)


# 20. --id-col names the sample's id column; ids kept as a DataFrame index
def test_the_id_column_is_found_in_the_sample_and_in_a_dataframe_index(tmp_path):
    train = pd.DataFrame({"key": [f"k{i}" for i in range(6)], "text": texts(6), "target": [0, 1] * 3})
    test = pd.DataFrame({"key": ["t2", "t1"], "text": ["a", "b"]})
    sample = pd.DataFrame({"target": [0, 0], "key": ["t1", "t2"]})  # id not first
    data = loaded(competition(tmp_path, train, test, sample), id_col="key")
    assert data["order"].tolist() == ["t1", "t2"] and data["id_header"] == "key"
    cfg = advtrain.Config(data_dir=str(tmp_path), output_dir="unused", id_col="key")
    data = advtrain.load_competition(cfg, train=train.set_index("key"), test=test.set_index("key"))
    assert sorted(data["test"]["key"]) == ["t1", "t2"]


# 22. a train DataFrame with a folder holding only test and sample
def test_a_train_dataframe_needs_no_train_file(tmp_path):
    folder = competition(tmp_path, pd.DataFrame({"id": [0], "text": ["x"], "target": [0]}),
                         sample=pd.DataFrame({"id": ["t1", "t2"], "target": [0, 0]}))
    (folder / "train.csv").unlink()
    train = pd.DataFrame({"id": range(6), "text": texts(6), "target": [0, 1] * 3})
    data = advtrain.load_competition(advtrain.Config(data_dir=str(folder), output_dir="unused"), train=train)
    assert data["sample"] is not None and data["order"].tolist() == ["t1", "t2"]


# 23. one-word training texts with the automatic max_len
def test_one_word_texts_leave_room_under_the_automatic_max_len(tmp_path, model_dirs):
    train = pd.DataFrame({"id": range(20), "text": ["fire", "pizza"] * 10, "target": [1, 0] * 10})
    test = pd.DataFrame({"id": ["t1"], "text": ["a much longer test text than any training one"]})
    cfg = base_config(competition(tmp_path, train, test), model_dirs["bert"], tmp_path / "out", holdout_size=0.25,
                      valid_size=0.25)
    data = advtrain.prepare_data(cfg)
    assert data["longest"] == 3 and data["max_len"] == 8 and len(data["test_ids"][0]) == 8


# --- predict ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(data_dir, model_dirs, tmp_path_factory):
    """Tiny saved runs: plain, with the keyword, 2-fold, and a regression run of the same texts."""
    root = tmp_path_factory.mktemp("saved")
    made = {}
    regression = root / "regression-data"
    regression.mkdir()
    train = pd.read_csv(data_dir / "train.csv", dtype=str, keep_default_na=False)
    train.assign(target=train["target"].astype(float) + 0.25).to_csv(regression / "train.csv", index=False)
    for name in ("test.csv", "sample_submission.csv"):
        (regression / name).write_bytes((data_dir / name).read_bytes())
    for name, folder, kw in [("plain", data_dir, {}), ("keyword", data_dir, dict(use_keyword=True)),
                             ("kfold", data_dir, dict(split="kfold", n_folds=2)), ("regression", regression, {})]:
        made[name] = root / name
        advtrain.run(base_config(folder, model_dirs["bert"], made[name], epochs=1, eval_every=1.0, save_model=True,
                                 **kw))
    return made


def probs(folder):
    return pd.read_csv(folder / "test_probs.csv", dtype={"id": str}).set_index("id")


def predict_args(runs, data_dir, out, *extra):
    return ["predict", "--runs", ",".join(map(str, runs)), "--data-dir", str(data_dir), "--output-dir", str(out),
            "--no-progress", *extra]


# 1. each run is fed its texts as it was trained
def test_each_run_is_fed_its_own_text_settings(saved, data_dir, tmp_path):
    advtrain.predict([saved["plain"], saved["keyword"]], str(data_dir), str(tmp_path / "o"), weights=[0, 1],
                     progress=False)
    assert np.abs(probs(tmp_path / "o").to_numpy() - probs(saved["keyword"]).to_numpy()).max() <= 1e-6


def broken_copy(run, tmp_path, name="broken"):
    import shutil
    copy = tmp_path / name
    shutil.copytree(run, copy)
    return copy


# 2. the tokenizer checked against the weights; 3. the outputs against the task; 4. a missing fold is said
def test_a_model_folder_that_does_not_belong_to_its_run_is_refused(saved, data_dir, model_dirs, tmp_path, capsys):
    no_tok = broken_copy(saved["plain"], tmp_path, "no-tokenizer")
    for f in (no_tok / "model").iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            f.unlink()
    assert advtrain.main(predict_args([no_tok], data_dir, tmp_path / "o1")) == 2
    assert "model lacks its tokenizer files" in capsys.readouterr().err
    other_tok = broken_copy(saved["plain"], tmp_path, "other-tokenizer")
    for f in (other_tok / "model").iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            f.unlink()
    smaller = advtrain.make_tiny_model(tmp_path / "smaller", "bert", texts=["zebra quantum lattice", "yonder"])
    advtrain.load_tokenizer(str(smaller)).save_pretrained(other_tok / "model")
    assert advtrain.main(predict_args([other_tok], data_dir, tmp_path / "o2")) == 2
    assert "the tokenizer files belong to another model" in capsys.readouterr().err
    swapped = broken_copy(saved["plain"], tmp_path, "swapped")
    import shutil
    shutil.rmtree(swapped / "model")
    shutil.copytree(saved["regression"] / "model", swapped / "model")
    assert advtrain.main(predict_args([swapped], data_dir, tmp_path / "o3")) == 2
    assert "has 1 output(s), but its run's binary task needs 2" in capsys.readouterr().err
    folds = broken_copy(saved["kfold"], tmp_path, "one-fold-lost")
    shutil.rmtree(folds / "model_fold1")
    assert advtrain.main(predict_args([folds], data_dir, tmp_path / "o4")) == 0
    assert "lacks model_fold1: averaging the 1 of its 2 folds that are there" in capsys.readouterr().out


# 5. weights from Python; 16. a negative batch size
@pytest.mark.parametrize("kw,says", [(dict(weights=[float("nan"), 1]), "one finite non-negative number per run"),
                                     (dict(weights=["x", 1]), "weights must be numbers"),
                                     (dict(batch_size=-1), "--batch-size must be positive")])
def test_bad_weights_and_batch_sizes_are_refused(saved, data_dir, tmp_path, kw, says):
    with pytest.raises(advtrain.UserError, match=says):
        advtrain.predict([saved["plain"], saved["keyword"]], str(data_dir), str(tmp_path / "o"), progress=False, **kw)


# 6. stopped between its writes: no earlier submission beside the new probabilities
def test_predict_stopped_between_its_writes_leaves_no_stale_submission(saved, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    advtrain.predict([saved["plain"]], str(data_dir), str(out), progress=False)
    real = advtrain.os.replace

    def killed(src, dst):
        if str(dst) == str(out / "submission.csv"):  # stopped once test_probs.csv is in place
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(advtrain.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        advtrain.predict([saved["keyword"]], str(data_dir), str(out), overwrite=True, progress=False)
    assert not (out / "submission.csv").exists()
    assert np.abs(probs(out).to_numpy() - probs(saved["keyword"]).to_numpy()).max() <= 1e-6
    monkeypatch.undo()
    advtrain.predict([saved["keyword"]], str(data_dir), str(out), overwrite=True, progress=False)
    assert (out / "submission.csv").is_file() and not (out / ".advtrain-predict").exists()


# 7. never into a training run's folder; 19. the interruption names no --resume
def test_predict_refuses_a_training_runs_folder_and_says_what_an_interruption_leaves(saved, data_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    target = broken_copy(saved["plain"], tmp_path, "training-run")
    assert advtrain.main(predict_args([saved["plain"]], data_dir, target, "--overwrite")) == 2
    assert "holds a training run" in capsys.readouterr().err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(advtrain, "predict", interrupted)
    assert advtrain.main(predict_args([saved["plain"]], data_dir, tmp_path / "o")) == 130
    err = capsys.readouterr().err
    assert "nothing was written; run predict again" in err and "--resume" not in err


# 14. a full disk inside safetensors
def test_a_safetensors_error_while_saving_costs_the_model_folder_only(data_dir, model_dirs, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr("safetensors.torch.save_model", full)
    out = tmp_path / "run"
    advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=1, eval_every=1.0, save_model=True))
    assert (out / "submission.csv").is_file() and not (out / "model").exists()
    assert "model/ not saved (Error while serializing" in (out / "train.log").read_text()


# 18. a model folder left in the stage by a killed run does not wedge the next run
def test_a_model_folder_left_by_a_killed_run_does_not_block_the_next(data_dir, model_dirs, tmp_path):
    out = tmp_path / "run"
    (out / advtrain.STAGE / "model_fold0").mkdir(parents=True)
    (out / advtrain.STAGE / "model_fold0" / "model.safetensors").write_bytes(b"half")
    advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=1, eval_every=1.0))
    assert (out / "submission.csv").is_file() and not (out / advtrain.STAGE).exists()


# 21. column names with a comma or surrounding spaces, on the command line
def test_quoted_column_names_keep_their_commas_and_spaces(tmp_path):
    cfg = advtrain.config_from_args(advtrain.build_parser().parse_args(
        ["train", "--text-cols", '"Review, full", title', "--target-cols", '" score "']))
    assert cfg.text_cols == ["Review, full", "title"] and cfg.target_cols == [" score "]
    argv = advtrain.config_to_argv(cfg)
    assert advtrain.config_from_args(advtrain.build_parser().parse_args(["train", *argv])).text_cols == cfg.text_cols
    assert advtrain.Config(text_cols="text, keyword").text_cols == ["text", "keyword"]  # as before


# 24. a folder as FILE, a dangling link as output_dir
def test_a_folder_as_the_submission_file_and_a_dangling_output_link_are_named(tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location("kaggle_kit", advtrain.Path(advtrain.__file__).parent / "tools" /
                                                  "kaggle_kit.py")
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "submission.csv").write_text("id,target\n")
    with pytest.raises(kit.KitError, match="is a folder, not a file: name the submission file itself .it holds "
                                           "submission.csv"):
        kit.submission_file("", str(tmp_path / "run"))
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(advtrain.UserError, match="is a link to .*gone, which does not exist"):
        advtrain.prepare_output_dir(str(tmp_path / "link"), overwrite=False)


# also: --no-progress silences transformers' own bars
def test_no_progress_silences_the_bars_of_transformers(data_dir, model_dirs, tmp_path, capfd):
    advtrain.run(base_config(data_dir, model_dirs["bert"], tmp_path / "run", epochs=1, eval_every=1.0,
                             save_model=True))
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
    assert "Loading weights" not in (tmp_path / "run" / "train.log").read_text()
    assert advtrain.transformers.utils.logging.is_progress_bar_enabled()  # as it was before the run


# 14. a disk so full that the outputs do not fit beside the checkpoint: the checkpoint makes room
def test_outputs_that_do_not_fit_beside_the_checkpoint_replace_it(data_dir, model_dirs, tmp_path, monkeypatch):
    real, calls = advtrain.atomic_write, []

    def full_while_the_checkpoint_is_there(path, write):
        stage = advtrain.Path(path).parent
        if advtrain.Path(path).name == "oof.csv" and (stage / advtrain.CHECKPOINT).is_file():
            calls.append(path)
            raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(advtrain, "atomic_write", full_while_the_checkpoint_is_there)
    out = tmp_path / "run"
    advtrain.run(base_config(data_dir, model_dirs["bert"], out, epochs=1, eval_every=1.0))
    assert len(calls) == 1 and (out / "submission.csv").is_file() and (out / "oof.csv").is_file()
    assert "deleted checkpoint.pt (training is finished) and wrote them again" in (out / "train.log").read_text()


# 24. texts the vocabulary cannot spell are not called missing tokenizer files
def test_texts_in_a_script_the_vocabulary_cannot_spell_are_named(model_dirs):
    tok = advtrain.load_tokenizer(str(model_dirs["bert"]))
    config = advtrain.transformers.AutoConfig.from_pretrained(str(model_dirs["bert"]))
    ids = advtrain.tokenize(tok, ["東京で地震が発生", "大雨の警報"], 32)
    with pytest.raises(advtrain.UserError, match="or the texts are in a script its vocabulary cannot spell"):
        advtrain.check_tokenizer(tok, config, ids, "tiny")
