"""Shared fixtures and helpers: a synthetic competition and tiny models built offline, loaded through
from_pretrained (the real loading path)."""
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import advtrain  # noqa: E402

ATTACKS = {"fgm": advtrain.FGM, "pgd": advtrain.PGD, "freelb": advtrain.FreeLB, "awp": advtrain.AWP,
           "sift": advtrain.SiFT}
TEXTS = ["Forest fire near La Ronge", "I love pizza on Friday lol", "Flood hits Tokyo, 40 evacuated",
         "This album is fire"]


def without_dropout(model):
    """The model with every dropout at p=0, so that two passes over one batch are comparable."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return advtrain.make_demo_data(tmp_path_factory.mktemp("data"), n_train=1000, n_test=120)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, data_dir):
    texts = pd.read_csv(data_dir / "train.csv")["text"]
    return {arch: advtrain.make_tiny_model(tmp_path_factory.mktemp(arch), arch, texts)
            for arch in ("deberta-v2", "bert")}


@pytest.fixture(params=["deberta-v2", "bert"])
def arch(request):
    return request.param


@pytest.fixture
def tiny(model_dirs, arch):
    """A tiny classifier (dropout off), its tokenizer and a batch of four labelled tweets."""
    torch.manual_seed(0)
    model = without_dropout(advtrain.Classifier.from_pretrained(str(model_dirs[arch]), dropout=0.0))
    tok = advtrain.load_tokenizer(str(model_dirs[arch]))
    ids = advtrain.tokenize(tok, TEXTS, 64)
    batch, labels = advtrain.Collator(tok.pad_token_id)([(x, y) for x, y in zip(ids, [1, 0, 1, 0])])
    return model, tok, batch, labels


def base_config(data_dir, model_dir, out, **kw):
    settings = dict(model=str(model_dir), data_dir=str(data_dir), output_dir=str(out), epochs=2, batch_size=16,
                    lr=2e-3, holdout_size=100, valid_size=100, device="cpu", progress=False, save_model=False,
                    adv_start="0")
    settings.update(kw)
    return advtrain.Config(**settings)


def kaggle_repo(tmp_path):
    """A copy of the repository's Kaggle pieces (Makefile, advtrain.py, tools, notebooks, metadata) to run make in."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Makefile", "advtrain.py", "kernel-metadata.json", "requirements.txt", "requirements-dev.txt",
                 "constraints-ci.txt"):
        shutil.copy2(ROOT / name, repo / name)
    shutil.copytree(ROOT / "tools", repo / "tools")
    shutil.copytree(ROOT / "notebooks", repo / "notebooks")
    return repo


def fail_in_training(monkeypatch, error, after=0):
    """Make the (after+1)-th micro-batch raise error."""
    real, calls = advtrain.micro_step, []

    def micro_step(*args):
        calls.append(1)
        if len(calls) > after:
            raise error
        return real(*args)

    monkeypatch.setattr(advtrain, "micro_step", micro_step)
