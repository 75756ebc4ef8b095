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
