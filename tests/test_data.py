"""Data: finding, validating, splitting, tokenizing and batching the competition files."""
import numpy as np
import pandas as pd
import pytest

import advtrain


def write(folder, train=None, test=None, sample=None):
    folder.mkdir(parents=True, exist_ok=True)
    train = train if train is not None else "id,keyword,location,text,target\n1,,,fire in town,1\n2,,,nice day,0\n"
    test = test if test is not None else "id,keyword,location,text\n10,,,flood\n11,,,cake\n"
    (folder / "train.csv").write_bytes(train.encode() if isinstance(train, str) else train)
    (folder / "test.csv").write_bytes(test.encode() if isinstance(test, str) else test)
    if sample is not None:
        (folder / "sample_submission.csv").write_text(sample)
    return folder


BAD_INPUTS = {
    "missing column": (dict(train="id,text\n1,a\n"), "train.csv lacks column(s) target"),
    "empty file": (dict(train=""), "train.csv is empty"),
    "header only": (dict(train="id,text,target\n"), "train.csv has a header but no rows"),
    "duplicate ids": (dict(train="id,text,target\n1,a,0\n1,b,1\n"), "train.csv has 1 duplicate id(s)"),
    "bad label": (dict(train="id,text,target\n1,a,0\n2,b,2\n"), "target must be 0 or 1 for task binary"),
    "text label": (dict(train="id,text,target\n1,a,yes\n2,b,1\n"), "target must be 0 or 1 for task binary"),
    "not utf-8": (dict(train=b"id,text,target\n1,caf\xe9 \xff,0\n"), "train.csv is not UTF-8 text"),
    "test lacks text": (dict(test="id,keyword\n1,a\n"), "test.csv lacks column(s) text"),
    "sample ids differ": (dict(sample="id,target\n10,0\n99,0\n"), "list different ids"),
    "gzip": (dict(train=b"\x1f\x8b\x08\x00rest"), "train.csv is a gzip archive, not a CSV"),
    "semicolons": (dict(train="id;text;target\n1;a;0\n"), "It looks separated by ';'"),
    "utf-8 offset": (dict(train=b"id,text,target\n1,abcdefghijklmnopqrstuvwxyz,0\n2,caf\xe9,1\n"),
                     "byte 0xe9 at byte offset 51"),
    "duplicate id shown plainly": (dict(train="id,text,target\n7,a,0\n7,b,1\n"), "e.g. 7: ids must be unique"),
    "too few rows": (dict(), "train has 2 rows: --holdout-size 1500 + --valid-size 1500 leave none"),
    "missing id column": (dict(test="ident,text\n1,a\n"), "test.csv lacks column(s) id: its columns are ident, text"),
    "empty target": (dict(train="id,text,target\n1,a,\n2,b,1\n"), "1 row(s) have no target (line 2)"),
    "duplicated column": (dict(train="id,text,target,target\n1,a,0,1\n"), "has the column 'target' more than once"),
    "excel": (dict(train=b"PK\x03\x04" + b"[Content_Types].xml xl/workbook.xml"), "is an Excel workbook, not a CSV"),
    "folder": (dict(train=None), "is a folder, not a file"),
    "semicolons and commas": (dict(train="id;text;target\n1;a, b, c;0\n2;d;1\n"), "It looks separated by ';'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_clear_line_and_exit_2(case, tmp_path, capsys):
    files, message = BAD_INPUTS[case]
    folder = write(tmp_path / "d", **{k: v for k, v in files.items() if v is not None})
    if case == "folder":
        (folder / "train.csv").unlink()
        (folder / "train.csv").mkdir()
    task = ["--task", "binary"] if "label" in case else []
    code = advtrain.main(["train", "--data-dir", str(folder), "--output-dir", str(tmp_path / "o"),
                          "--model", "unused", "--no-progress", *task])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_data_dir_names_the_fix(tmp_path, capsys):
    assert advtrain.main(["train", "--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "make data" in capsys.readouterr().err


def test_empty_text_stays_empty_words_like_na_stay_text_and_keyword_is_prepended(tmp_path):
    folder = write(tmp_path, train="id,keyword,text,target\n1,wild%20fires,,1\n2,,hello,0\n3,,NA,0\n4,,None,1\n"
                                   "5,,null,0\n6,,N/A,1\n7,,nan,0\n")
    data = advtrain.load_competition(advtrain.Config(data_dir=str(folder), use_keyword=True))
    first, second = advtrain.input_texts(data["train"], advtrain.Config(use_keyword=True), "[SEP]")
    assert first == ["wild fires: ", "hello", "NA", "None", "null", "N/A", "nan"] and second is None
    assert data["order"].tolist() == ["10", "11"]


def test_sample_submission_order_wins(tmp_path):
    folder = write(tmp_path, sample="id,target\n11,0\n10,0\n")
    assert advtrain.load_competition(advtrain.Config(data_dir=str(folder)))["order"].tolist() == ["11", "10"]


def test_find_data_dir_prefers_explicit_then_local(tmp_path, monkeypatch):
    write(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(advtrain, "KAGGLE_INPUT", tmp_path / "no-kaggle")
    assert str(advtrain.find_data_dir("")) == "data"
    explicit = write(tmp_path / "elsewhere")
    assert advtrain.find_data_dir(str(explicit)) == explicit


def test_holdout_split_is_the_articles_row_for_row():
    df = pd.DataFrame({"row": range(7613)})
    shuffled = df.sample(frac=1, random_state=42).reset_index(drop=True)["row"].to_numpy()
    train, valid, holdout = advtrain.holdout_split(7613, 42)
    assert holdout.tolist() == shuffled[:1500].tolist()
    assert valid.tolist() == shuffled[1500:3000].tolist()
    assert train.tolist() == shuffled[3000:].tolist() and len(train) == 4613


def test_holdout_split_refuses_to_leave_nothing_to_train():
    with pytest.raises(advtrain.UserError, match="leave none to train on"):
        advtrain.holdout_split(100, 0, 60, 40)


def test_kfold_is_stratified_and_covers_every_row_once():
    y = np.array([0] * 60 + [1] * 40)
    folds = advtrain.kfold_splits(y, 5, seed=1)
    valid = np.concatenate([va for _, va in folds])
    assert sorted(valid.tolist()) == list(range(100))
    assert all(y[va].mean() == pytest.approx(0.4) for _, va in folds)


def test_tokenize_truncates_keeping_special_tokens(model_dirs):
    tok = advtrain.load_tokenizer(str(model_dirs["bert"]))
    ids = advtrain.tokenize(tok, ["fire " * 50, "pizza"], max_len=8)
    assert len(ids[0]) == 8 and ids[0][0] == tok.cls_token_id and ids[0][-1] == tok.sep_token_id
    assert len(ids[1]) < 8


def test_collator_pads_dynamically_or_to_a_fixed_width():
    items = [([5, 6, 7], 1), ([5], 0)]
    batch, labels = advtrain.Collator(pad_id=0)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert labels.tolist() == [1, 0]
    assert advtrain.Collator(pad_id=0, pad_to=6)(items)[0]["input_ids"].shape == (2, 6)


def test_length_grouped_batches_cover_everything_once_and_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 90, size=1000)
    sampler = advtrain.LengthGroupedBatches(lengths, 32, shuffle=True, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(len(b) * lengths[b].max() for b in map(np.array, batches))
    plain = advtrain.LengthGroupedBatches(lengths, 32, shuffle=True, seed=0, group_by_length=False)
    padded_plain = sum(len(b) * lengths[b].max() for b in map(np.array, plain))
    assert padded < 0.7 * padded_plain
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_ids_stay_exactly_as_written(tmp_path):
    folder = write(tmp_path, test="id,text\n00677,flood\nNA,cake\n")
    order = advtrain.load_competition(advtrain.Config(data_dir=str(folder)))["order"]
    assert order.tolist() == ["00677", "NA"]


@pytest.mark.parametrize("model,message", [("file", "is a file"), ("empty", "has no config.json"),
                                           ("./missing/model", "no such folder")])
def test_model_path_mistakes_are_named(model, message, tmp_path, capsys):
    folder = write(tmp_path / "d")
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    name = str(tmp_path / model) if model in ("file", "empty") else model
    code = advtrain.main(["train", "--data-dir", str(folder), "--output-dir", str(tmp_path / "o"), "--model", name,
                          "--holdout-size", "0", "--valid-size", "1", "--split", "kfold", "--n-folds", "2"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_a_truncated_weights_file_is_one_sentence(model_dirs, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for f in model_dirs["bert"].iterdir():
        data = f.read_bytes()
        (folder / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    with pytest.raises(advtrain.UserError, match="Could not load model"):
        advtrain.Classifier.from_pretrained(str(folder))
