"""advtrain: adversarial fine-tuning of transformer text classifiers, in one file.

Upload it to Kaggle as a utility script and `import advtrain`, run it from the command line
(`python advtrain.py train --method awp`), or copy a single attack class into your own notebook:
each attack (FGM, PGD, FreeLB, AWP, SiFT) needs nothing but torch.

The file reads top to bottom in the order data flows: config -> data -> model -> attacks ->
training loop with prediction (and the transformers.Trainer subclass) -> submission -> a whole run ->
comparison across seeds -> offline demo -> CLI. The speed benchmark is tools/bench.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import platform
import random
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import transformers
from tqdm.auto import tqdm

__version__ = "0.1.0"
log = logging.getLogger("advtrain")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

METHODS = ("baseline", "fgm", "pgd", "freelb", "awp", "sift")


def _opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    """Every setting of a run. Each field is a CLI flag of the same name (`batch_size` -> `--batch-size`).

    Defaults are sound values for fine-tuning deberta-v3-xsmall on short texts (lr 3e-5, batch 32,
    warmup 10%, cosine decay, clipping at 1.0), not the article's lr 2e-6: `--preset article`
    reproduces the article's protocol instead.
    """

    # run
    method: str = _opt("baseline", "adversarial method", METHODS)
    preset: str = _opt("", "start from a named set of settings; explicit flags still win", ("", "article", "recipe"))
    model: str = _opt("microsoft/deberta-v3-xsmall", "hub name or local folder of a Hugging Face encoder")
    data_dir: str = _opt("", "folder with train.csv/test.csv; empty: the Kaggle mount, else ./data")
    output_dir: str = _opt("submissions/run", "where submission.csv, metrics.json, train.log and the model go")
    overwrite: bool = _opt(False, "replace the files of an earlier run in output_dir (only once this run succeeds)")
    resume: bool = _opt(False, "continue the interrupted run in output_dir from its last completed epoch")
    seed: int = _opt(42, "seed of the data split, the shuffling and the initialisation")
    device: str = _opt("auto", "auto (cuda if present), cuda, cuda:1, cpu")
    # data
    use_keyword: bool = _opt(False, "prepend the keyword column to the text ('keyword: text')")
    max_len: int = _opt(0, "token limit; 0 = the longest training text, capped by the model")
    split: str = _opt("holdout", "holdout: the article's protocol; kfold: stratified folds with OOF",
                      ("holdout", "kfold"))
    holdout_size: int = _opt(1500, "holdout rows (first rows after the seeded shuffle)")
    valid_size: int = _opt(1500, "validation rows (the next rows after the holdout)")
    n_folds: int = _opt(5, "folds for split=kfold")
    group_by_length: bool = _opt(True, "batch texts of similar length together (less padding)")
    pad_to_max: bool = _opt(False, "pad every batch to max_len, as the article did (slow; for comparison)")
    # model
    pooling: str = _opt("cls", "sentence vector: first token or masked mean", ("cls", "mean"))
    dropout: float = _opt(0.1, "dropout before the classification head")
    # optimisation
    epochs: int = _opt(3, "training epochs")
    batch_size: int = _opt(32, "micro-batch size")
    eval_batch_size: int = _opt(128, "batch size for validation and prediction")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(3e-5, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.01, "AdamW weight decay, not applied to biases and LayerNorm weights")
    warmup: float = _opt(0.1, "fraction of the optimizer steps spent warming up linearly")
    scheduler: str = _opt("cosine", "learning-rate decay after warmup", ("cosine", "linear", "constant"))
    max_grad_norm: float = _opt(1.0, "clip the global gradient norm to this; 0 = no clipping")
    amp: str = _opt("auto", "mixed precision: auto = bf16 on compute capability >= 8, fp16 below, off on CPU",
                    ("auto", "bf16", "fp16", "off"))
    fused_adamw: bool = _opt(True, "fused AdamW kernel on CUDA; off: the for-loop one, as transformers.AdamW was")
    compile: bool = _opt(False, "torch.compile the model (falls back to eager if compilation fails)")
    eval_every: float = _opt(0.25, "evaluate on validation every this fraction of an epoch (<= 1) or every this "
                             "many optimizer steps (> 1); the best evaluation's weights are kept")
    select_metric: str = _opt("f1", "validation metric that picks the best evaluation", ("f1", "accuracy"))
    threshold: str = _opt("argmax", "decision rule for label 1: argmax, auto = the probability threshold that "
                          "maximises F1 on validation (out-of-fold for kfold), or a probability such as 0.4; "
                          "auto did not transfer to the holdout on the real files (RESULTS.md)")
    num_workers: int = _opt(0, "DataLoader worker processes")
    progress: bool = _opt(True, "show tqdm progress bars")
    save_model: bool = _opt(True, "save the best weights to output_dir/model.pt")
    # adversarial training: when it starts
    adv_start: str = _opt("warmup", "when the attack starts (the article's most important knob): warmup = when the "
                          "learning-rate warm-up ends, auto = at the first evaluation that does not improve on the "
                          "best so far, or an epoch such as 1 or 0.5")
    adv_threshold: float = _opt(0.0, "also wait until the best validation metric reaches this (0 = off)")
    # adversarial training: each method's settings
    eps_relative: bool = _opt(True, "FGM/PGD/FreeLB sizes are in units of the mean token-embedding norm "
                              "(so one default suits every model); off: absolute")
    fgm_eps: float = _opt(0.2, "FGM: L2 size of the embedding perturbation (per example, or per batch for vocab)")
    fgm_scope: str = _opt("example", "FGM: normalise per example (paper) or over the embedding matrix (Kaggle)",
                          ("example", "vocab"))
    pgd_eps: float = _opt(0.2, "PGD: radius of the L2 ball per example")
    pgd_alpha: float = _opt(0.06, "PGD: ascent step size")
    pgd_steps: int = _opt(3, "PGD: ascent steps (K)")
    freelb_steps: int = _opt(3, "FreeLB: ascent steps (K)")
    freelb_lr: float = _opt(0.1, "FreeLB: ascent step size")
    freelb_init: float = _opt(0.1, "FreeLB: initial perturbation magnitude (FreeLB's init_mag)")
    freelb_max_norm: float = _opt(0.0, "FreeLB: L2 bound per example, 0 = unbounded")
    awp_lr: float = _opt(1.0, "AWP: step size, relative to each weight's norm (AWP's adv_lr)")
    awp_eps: float = _opt(0.01, "AWP: each weight stays within +-eps*|w| (AWP's adv_eps)")
    awp_params: str = _opt("weight", "AWP: perturb the parameters whose name contains this (AWP's param_filter)")
    sift_lambda: float = _opt(3.0, "SiFT: weight of the consistency loss, DeBERTa's vat_lambda (SiFT's alpha); "
                              "3 for deberta-v3-xsmall")
    sift_init: float = _opt(1e-2, "SiFT: std of the initial perturbation")
    sift_lr: float = _opt(1e-4, "SiFT: ascent step size")
    sift_module: str = _opt("", "SiFT: name of the module to perturb in front of (default: embeddings.LayerNorm)")

    def __post_init__(self):
        """Apply the preset to every field still at its default, then check every setting, so that a bad
        one fails here, before any data or model is loaded."""
        if self.preset:
            for f in dataclasses.fields(self):
                if f.name in PRESETS.get(self.preset, {}) and getattr(self, f.name) == f.default:
                    setattr(self, f.name, PRESETS[self.preset][f.name])
        for f in dataclasses.fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                raise UserError(f"{f.name}={value!r} is not one of {', '.join(map(repr, choices))}.")
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{f.name} must be a finite number, got {value}.")
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "pgd_steps", "freelb_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("seed", "num_workers", "max_len", "weight_decay", "max_grad_norm", "adv_threshold", "fgm_eps",
                     "pgd_eps", "pgd_alpha", "freelb_lr", "freelb_init", "freelb_max_norm", "awp_lr", "awp_eps",
                     "sift_lambda", "sift_init", "sift_lr"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must not be negative, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr} (on the command line: --lr 3e-5).")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout is a probability in [0, 1), got {self.dropout}.")
        if not 0 <= self.warmup < 1:
            raise UserError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}.")
        if self.split == "holdout" and (self.holdout_size < 1 or self.valid_size < 1):
            raise UserError(f"holdout_size and valid_size must be at least 1 for split=holdout, got "
                            f"{self.holdout_size} and {self.valid_size}.")
        if self.split == "kfold" and self.n_folds < 2:
            raise UserError(f"n_folds must be at least 2 for split=kfold, got {self.n_folds}.")
        if self.eval_every <= 0 or (self.eval_every > 1 and self.eval_every != int(self.eval_every)):
            raise UserError(f"eval_every is a fraction of an epoch in (0, 1] or a whole number of optimizer steps, "
                            f"got {self.eval_every}.")
        if self.adv_start not in ("warmup", "auto") and not _is_number(self.adv_start, minimum=0):
            raise UserError(f"adv_start must be warmup, auto or an epoch >= 0 such as 1 or 0.5, "
                            f"got {self.adv_start!r}.")
        if self.threshold not in ("auto", "argmax") and not _is_number(self.threshold, minimum=0, maximum=1):
            raise UserError(f"threshold must be auto, argmax or a probability in [0, 1], got {self.threshold!r}.")
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:")
                                                               and self.device[5:].isdigit()):
            raise UserError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}.")


def _is_number(text, minimum=-math.inf, maximum=math.inf) -> bool:
    """Whether text (a setting given as a string) is a finite number within [minimum, maximum]."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return False
    return math.isfinite(value) and minimum <= value <= maximum


PRESETS = {
    # The 2022 Advent Calendar article: batch 8, lr 2e-6, 5 epochs, fp32, every text padded to the
    # longest one, no clipping (declared, never applied), best epoch by accuracy, attack from step 0.
    "article": dict(
        epochs=5, batch_size=8, lr=2e-6, weight_decay=0.01, warmup=0.0, scheduler="cosine",
        max_grad_norm=0.0, amp="off", fused_adamw=False, pad_to_max=True, group_by_length=False,
        dropout=0.0, select_metric="accuracy", adv_start="0", eval_every=1.0, threshold="argmax",
        eps_relative=False, fgm_eps=0.1, fgm_scope="vocab", awp_lr=1e-4, awp_eps=1e-4, awp_params="weight",
    ),
    # The protocol of the comparison on the real files (RESULTS.md), pinned so that later changes of the
    # defaults do not move it: evaluation four times an epoch, the attack from the end of the warm-up,
    # input-space sizes relative to the embeddings, argmax labels. No method beat the baseline there;
    # these are the settings under which each was measured, not a promise of a gain.
    "recipe": dict(
        eval_every=0.25, adv_start="warmup", threshold="argmax", eps_relative=True, fgm_eps=0.2, fgm_scope="example",
        awp_lr=1.0, awp_eps=0.01, awp_params="weight", sift_lambda=3.0, sift_init=1e-2, sift_lr=1e-4,
    ),
}


class UserError(ValueError):
    """A problem the user can fix (a file, a column, a setting); the CLI prints it and exits with 2."""


def env_overrides(cfg: Config, environ=None) -> Config:
    """cfg with each field replaced by the environment variable ADVTRAIN_<FIELD> where it is set
    (ADVTRAIN_EPOCHS=1, ADVTRAIN_MODEL=/path): how the tests run the Kaggle notebooks offline."""
    environ = os.environ if environ is None else environ
    changes = {}
    for f in dataclasses.fields(Config):
        raw = environ.get(f"ADVTRAIN_{f.name.upper()}")
        if raw is None:
            continue
        kind = type(f.default)
        if kind is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise UserError(f"ADVTRAIN_{f.name.upper()}={raw!r}: use 1/0, true/false or yes/no.")
            changes[f.name] = raw.lower() in ("1", "true", "yes")
        else:
            try:
                changes[f.name] = kind(raw)
            except ValueError:
                raise UserError(f"ADVTRAIN_{f.name.upper()}={raw!r} is not a valid {kind.__name__}.") from None
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------------
# Data: find, validate, split, tokenize, batch
# ---------------------------------------------------------------------------------------------

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_MOUNTS = ("competitions/nlp-getting-started", "nlp-getting-started")


def find_data_dir(data_dir: str = "", needs: str = "train.csv") -> Path:
    """An explicit folder wins; else the Kaggle competition mount; else any folder under /kaggle/input
    holding `needs`; else ./data."""
    if data_dir:
        path = Path(data_dir)
        if not (path / needs).is_file():
            raise UserError(f"{path / needs} not found: point --data-dir at the folder holding the "
                            "competition's train.csv and test.csv (`make data` downloads them).")
        return path
    for mount in KAGGLE_MOUNTS:
        if (KAGGLE_INPUT / mount / needs).is_file():
            return KAGGLE_INPUT / mount
    if KAGGLE_INPUT.is_dir():
        found = sorted(KAGGLE_INPUT.rglob(needs))
        if found:
            return found[0].parent
    if Path("data", needs).is_file():
        return Path("data")
    raise UserError(f"No {needs} found in ./data or under /kaggle/input: run `make data` "
                    "(or attach the competition to the notebook), or pass --data-dir.")


def _plain(value):
    """A numpy scalar as the plain Python value, so that messages read 2, not np.int64(2)."""
    return value.item() if hasattr(value, "item") else value


def read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    """Read a competition CSV and check what every later step relies on; one clear sentence per problem.
    Ids are kept as the text in the file (00677 stays 00677)."""
    if not path.is_file():
        raise UserError(f"{path} not found: the competition folder needs train.csv and test.csv.")
    raw = path.read_bytes()
    archive = {b"\x1f\x8b": "gzip", b"PK": "zip"}.get(raw[:2])
    if archive:
        raise UserError(f"{path} is a {archive} archive, not a CSV: "
                        "unpack it first (`make data` does).")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {raw[e.start]:#x} at byte offset {e.start}): "
                        "re-save it as UTF-8.") from None
    try:
        df = pd.read_csv(io.BytesIO(raw), encoding="utf-8",
                         dtype={"id": str, "text": str, "keyword": str, "location": str})
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty: download it again with `make data`.") from None
    except pd.errors.ParserError as e:
        raise UserError(f"{path} is not a readable CSV ({str(e).strip()}).") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        hint = " It looks separated by ';': save it with commas." if ";" in ",".join(map(str, df.columns)) else ""
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}: expected {', '.join(required)} "
                        f"(found {', '.join(map(str, df.columns))}).{hint}")
    if df.empty:
        raise UserError(f"{path} has a header but no rows.")
    if df["id"].isna().any():
        raise UserError(f"{path} has {int(df['id'].isna().sum())} row(s) without an id.")
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise UserError(f"{path} has {len(dup)} duplicate id(s), e.g. {dup.iloc[0]}: ids must be unique.")
    if "target" in required:
        target = pd.to_numeric(df["target"], errors="coerce")
        bad = ~target.isin([0, 1])
        if bad.any():
            rows = ", ".join(str(i + 2) for i in np.flatnonzero(bad)[:3])
            raise UserError(f"{path}: target must be 0 or 1, but {int(bad.sum())} row(s) are not "
                            f"(line {rows}, value {_plain(df['target'][bad].iloc[0])!r}).")
        df["target"] = target.astype(int)
    return df


def load_competition(data_dir: Path, use_keyword: bool = False):
    """train, test and the submission id order (sample_submission's if present, else test's)."""
    train = read_csv(data_dir / "train.csv", ("id", "text", "target"))
    test, order = load_test(data_dir)
    for name, df in (("train.csv", train), ("test.csv", test)):
        n_nan = int(df["text"].isna().sum())
        if n_nan:
            log.info(f"{name}: {n_nan} empty text(s) read as ''")
        df["text"] = df["text"].fillna("")
        if use_keyword and "keyword" in df.columns:
            kw = df["keyword"].fillna("").str.replace("%20", " ")
            df["text"] = np.where(kw != "", kw + ": " + df["text"], df["text"])
    return train, test, order


def load_test(data_dir: Path):
    """test.csv and the submission id order (sample_submission's if present, else test's)."""
    test = read_csv(data_dir / "test.csv", ("id", "text"))
    order = test["id"]
    sample_path = data_dir / "sample_submission.csv"
    if sample_path.is_file():
        sample = read_csv(sample_path, ("id",))
        if set(sample["id"]) != set(test["id"]):
            raise UserError(f"{sample_path} and {data_dir / 'test.csv'} list different ids: "
                            "download both again with `make data`.")
        order = sample["id"]
    return test, order.to_numpy()


def holdout_split(n: int, seed: int, holdout_size: int = 1500, valid_size: int = 1500):
    """The article's protocol: shuffle the rows with the seed (pandas' `sample(frac=1, random_state=seed)`);
    rows 0..holdout_size-1 are the holdout, the next valid_size rows validation, the rest training."""
    if holdout_size + valid_size >= n:
        raise UserError(f"train.csv has {n} rows: --holdout-size {holdout_size} + --valid-size {valid_size} leave "
                        "none to train on; lower them, or use --split kfold.")
    order = pd.RangeIndex(n).to_series().sample(frac=1, random_state=seed).to_numpy()
    holdout, valid, train = np.split(order, [holdout_size, holdout_size + valid_size])
    return train, valid, holdout


def kfold_splits(targets: np.ndarray, n_folds: int, seed: int):
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(targets)), targets))


def model_max_len(tokenizer, model_config) -> int:
    """The longest input the model takes: the tokenizer's limit and the position table's, when set."""
    limits = [tokenizer.model_max_length, getattr(model_config, "max_position_embeddings", None)]
    limits = [x for x in limits if isinstance(x, int) and 0 < x < 100_000]
    return min(limits) if limits else 512


def tokenize(tokenizer, texts, max_len: int) -> list[list[int]]:
    """Token ids of every text, once, unpadded; texts over max_len are truncated by the tokenizer
    (so the special tokens stay)."""
    ids = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
    long = [i for i, x in enumerate(ids) if len(x) > max_len]
    if long:
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_len)["input_ids"]
        for i, x in zip(long, cut):
            ids[i] = x
    return ids


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Batches of indices. Shuffled, then (group_by_length) sorted by length inside windows of 50
    batches so that each batch needs little padding, and the batches shuffled again. Under
    data-parallel training every rank draws the same list of batches and takes its share of each
    one (rows rank, rank + world_size, ...), so the global batch, and with it the optimisation, is
    the same on one GPU or several: batch_size is the global batch."""

    def __init__(self, lengths, batch_size: int, shuffle: bool, seed: int = 0, group_by_length: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.lengths, self.batch_size, self.shuffle = np.asarray(lengths), batch_size, shuffle
        self.seed, self.group_by_length, self.epoch = seed, group_by_length, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        if self.group_by_length:
            window = 50 * self.batch_size
            order = np.concatenate([w[np.argsort(-self.lengths[w], kind="stable")]
                                    for w in np.split(order, range(window, len(order), window))])
        batches = np.split(order, range(self.batch_size, len(order), self.batch_size))
        if self.shuffle and self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.world_size > 1:  # a batch smaller than the world is repeated so that every rank gets a row
            batches = [np.resize(b, max(len(b), self.world_size))[self.rank::self.world_size] for b in batches]
        return iter([b.tolist() for b in batches])


class Collator:
    """Pads a list of (ids, label) to the longest item of the batch (or to pad_to)."""

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id, self.pad_to = pad_id, pad_to

    def __call__(self, items):
        width = self.pad_to or max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": mask}, labels


def make_loader(ids, labels, *, batch_size: int, shuffle: bool, collator, seed: int = 0, group_by_length: bool = True,
                num_workers: int = 0, pin: bool = False, rank: int = 0, world_size: int = 1):
    labels = labels if labels is not None else [-1] * len(ids)
    dataset = list(zip(ids, labels))
    sampler = LengthGroupedBatches([len(x) for x in ids], batch_size, shuffle, seed, group_by_length, rank, world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                       num_workers=num_workers, pin_memory=pin)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class Classifier(nn.Module):
    """A Hugging Face encoder (DeBERTa-v2/v3, BERT, RoBERTa, ELECTRA, ...) + pooling + dropout + linear head.
    Returns logits of shape (batch, num_labels)."""

    def __init__(self, backbone: nn.Module, num_labels: int = 2, pooling: str = "cls", dropout: float = 0.1):
        super().__init__()
        if getattr(backbone, "pooler", None) is not None:  # BERT-style pooler: unused here, and DDP wants every
            backbone.pooler = None                         # parameter to receive a gradient
        self.backbone, self.pooling = backbone, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.hidden_size, num_labels)
        std = getattr(backbone.config, "initializer_range", 0.02)
        nn.init.normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(cls, name_or_dir: str, **kwargs) -> "Classifier":
        try:
            backbone = transformers.AutoModel.from_pretrained(name_or_dir)
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, safetensors' own error for a truncated file
            raise UserError(f"Could not load model {name_or_dir!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else 'no detail'}): without internet, pass --model a "
                            "local folder with config.json and complete weights (on Kaggle, attach it as a "
                            "dataset).") from None
        return cls(backbone, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "mean":
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        else:
            pooled = hidden[:, 0]
        return self.head(self.dropout(pooled))


def resolve_model(name: str) -> str:
    """A local folder as it is; else a Hugging Face snapshot attached under /kaggle/input whose folder
    (or config's _name_or_path) ends with the hub name's last part, so that notebooks run with the
    internet off; else the hub name itself. What is plainly meant as a local path must be a model folder."""
    path = Path(name).expanduser()
    if path.is_file():
        raise UserError(f"--model {name} is a file: pass the folder holding config.json, the weights and the "
                        "tokenizer files.")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"--model {name} has no config.json: pass a folder saved with save_pretrained (config, "
                        "weights and tokenizer files).")
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local and not path.is_dir():
        raise UserError(f"--model {name}: no such folder.")
    if path.is_dir() or not KAGGLE_INPUT.is_dir():
        return name
    wanted = name.rstrip("/").split("/")[-1].lower()
    for config in sorted(KAGGLE_INPUT.rglob("config.json")):
        try:
            origin = str(json.loads(config.read_text()).get("_name_or_path", ""))
        except (OSError, ValueError):
            continue
        if wanted in (config.parent.name.lower(), origin.rstrip("/").split("/")[-1].lower()):
            log.info(f"model {name}: using the snapshot attached at {config.parent}")
            return str(config.parent)
    return name


def load_tokenizer(name_or_dir: str):
    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_dir)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError; TypeError from transformers 4.x without the files
        raise UserError(f"Could not load the tokenizer of {name_or_dir!r} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no detail'}): the model folder needs its tokenizer "
                        "files (tokenizer.json, or a vocab / spm model), saved with save_pretrained.") from None


# ---------------------------------------------------------------------------------------------
# Attacks
#
# One interface for every method: replace `loss.backward()` with
#
#     loss = attack.backward(forward, loss_fn, scaler=scaler, accumulation_steps=accum)
#
# where `forward()` runs the model on the current batch (inside autocast if you use AMP) and
# `loss_fn(output)` turns its output into the task loss. The attack runs the clean forward and
# backward itself, then its adversarial passes, so that it sees this micro-batch's gradient and
# nothing accumulated before it; gradients of all passes add up in `.grad`. Clip and step the
# optimizer afterwards as usual; the attack never touches the optimizer. It returns the clean loss
# (detached). Each class below needs only torch (torch, torch.nn.functional as F, contextlib), so it
# can be copied into a notebook on its own; the small helpers `_no_sync`, `_scaled` and `_norm` are
# the same text in every class that uses them.
# Sizes in the input space (FGM, PGD, FreeLB) are in units of the model's mean token-embedding
# norm by default (relative=True), so one default suits MiniLM, DeBERTa-v3 and RoBERTa alike;
# `attack.scale` is that unit, measured once when the attack is built.
# A step whose direction comes from a gradient that is not finite (an fp16 overflow) gets no
# perturbation and is counted in `attack.skipped` (a tensor: counting costs no host-device sync).
# ---------------------------------------------------------------------------------------------


class Baseline:
    """No attack: the clean forward and backward, through the same call as the attacks."""

    def __init__(self, model=None):
        self.skipped = torch.zeros((), dtype=torch.long)

    def backward(self, forward, loss_fn, scaler=None, accumulation_steps=1):
        loss = loss_fn(forward())
        self._scaled(loss, scaler, accumulation_steps).backward()
        return loss.detach()

    @staticmethod
    def _scaled(loss, scaler, accumulation_steps):
        """The loss as backward wants it: averaged over the accumulation group, times the fp16 loss scale."""
        loss = loss / accumulation_steps
        return scaler.scale(loss) if scaler is not None else loss


class FGM:
    """Fast Gradient Method on the input embeddings (Miyato et al. 2017, arXiv:1605.07725).

    After the clean backward, the word-embedding output of the batch is shifted by
    r = eps * g / ||g|| (g: its gradient in this micro-batch) and the batch is run forward and
    backward once more. The weights are never modified, so there is nothing to restore and no
    vocab x hidden matrix to copy. scope="example" normalises each example's gradient, as in the
    paper; scope="vocab" normalises the gradient of the embedding rows the batch uses, so every
    occurrence of a token moves alike: the FGM of Kaggle notebooks and of the 2022 article (eps 0.1
    absolute there). With relative=True eps is in units of the mean token-embedding norm (`scale`):
    0.2 moves each tweet about as far as a fifth of one token's embedding.

        attack = FGM(model, eps=0.2)
        loss = attack.backward(lambda: model(**batch), lambda out: F.cross_entropy(out, labels))
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model, eps: float = 0.2, scope: str = "example", relative: bool = True):
        if scope not in ("example", "vocab"):
            raise ValueError(f"FGM scope must be 'example' or 'vocab', got {scope!r}")
        inner = getattr(model, "module", model)
        if not callable(getattr(inner, "get_input_embeddings", None)):
            raise ValueError(f"FGM perturbs the output of model.get_input_embeddings(), which "
                             f"{type(inner).__name__} does not define: add that method returning its token embedding")
        self.embedding = inner.get_input_embeddings()
        with torch.no_grad():
            self.scale = self.embedding.weight.float().norm(dim=-1).mean().item() if relative else 1.0
        self._ddp = model if hasattr(model, "no_sync") else None
        self.eps, self.scope = eps, scope
        self.skipped = torch.zeros((), dtype=torch.long)
        self._delta = self._ids = None

    def _no_sync(self):
        """Under DDP, a pass whose gradients must not be all-reduced yet (the last pass of the step syncs)."""
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()

    @staticmethod
    def _scaled(loss, scaler, accumulation_steps):
        """The loss as backward wants it: averaged over the accumulation group, times the fp16 loss scale."""
        loss = loss / accumulation_steps
        return scaler.scale(loss) if scaler is not None else loss

    @staticmethod
    def _norm(x):
        """L2 norm of each example (over every dimension but the first), shaped to broadcast against x."""
        return x.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))

    def _hook(self, module, inputs, output):
        if self._delta is None:  # clean pass: a zero perturbation whose .grad is this batch's gradient
            self._ids, self._delta = inputs[0], torch.zeros_like(output, requires_grad=True)
        return output + self._delta.to(output.dtype)

    def perturbation(self, grad: torch.Tensor) -> torch.Tensor:
        """r = eps * scale * g / ||g||, or zeros when g is not finite. For scope="vocab" the norm is
        taken over the gradient of the embedding rows that this batch's tokens use, one row each."""
        g = grad.float()
        if self.scope == "vocab":
            rows, where = torch.unique(self._ids.reshape(-1), return_inverse=True)
            per_row = g.new_zeros(len(rows), g.shape[-1]).index_add_(0, where, g.flatten(0, -2))
            norm = per_row.norm()
            g = per_row[where].view_as(g)
        else:
            norm = self._norm(g)
        ok = torch.isfinite(norm).all()
        self.skipped = self.skipped.to(ok.device) + (~ok)
        r = (self.eps * self.scale) * g / norm.clamp_min(1e-12)
        return torch.where(ok, r, torch.zeros_like(r))

    def backward(self, forward, loss_fn, scaler=None, accumulation_steps=1):
        handle = self.embedding.register_forward_hook(self._hook)
        try:
            with self._no_sync():
                loss = loss_fn(forward())
                self._scaled(loss, scaler, accumulation_steps).backward()
            if self._delta is None or self._delta.grad is None:
                raise RuntimeError("FGM: the forward pass never used model.get_input_embeddings() on input ids "
                                   "(fed inputs_embeds?): call the model with input_ids")
            self._delta = self.perturbation(self._delta.grad)
            self._scaled(loss_fn(forward()), scaler, accumulation_steps).backward()
        finally:
            handle.remove()
            self._delta = self._ids = None
        return loss.detach()


class PGD:
    """Projected Gradient Descent on the input embeddings (Madry et al. 2018; the NLP variant of
    Zhu et al. 2020). K ascent steps of size alpha, each projected back into the L2 ball of radius
    eps around the clean embeddings (per example). The first K-1 adversarial passes only compute
    the gradient of the perturbation (torch.autograd.grad), so the parameters' gradients are the
    clean one plus the last adversarial one, with no gradient backup to get wrong. With
    relative=True eps and alpha are in units of the mean token-embedding norm (see FGM).

        attack = PGD(model, eps=0.2, alpha=0.06, steps=3)
        loss = attack.backward(lambda: model(**batch), lambda out: F.cross_entropy(out, labels))
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model, eps: float = 0.2, alpha: float = 0.06, steps: int = 3, relative: bool = True):
        inner = getattr(model, "module", model)
        if not callable(getattr(inner, "get_input_embeddings", None)):
            raise ValueError(f"PGD perturbs the output of model.get_input_embeddings(), which "
                             f"{type(inner).__name__} does not define: add that method returning its token embedding")
        self.embedding = inner.get_input_embeddings()
        with torch.no_grad():
            self.scale = self.embedding.weight.float().norm(dim=-1).mean().item() if relative else 1.0
        self._ddp = model if hasattr(model, "no_sync") else None
        self.eps, self.alpha, self.steps = eps, alpha, steps
        self.skipped = torch.zeros((), dtype=torch.long)
        self._delta = None

    def _no_sync(self):
        """Under DDP, a pass whose gradients must not be all-reduced yet (the last pass of the step syncs)."""
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()

    @staticmethod
    def _scaled(loss, scaler, accumulation_steps):
        """The loss as backward wants it: averaged over the accumulation group, times the fp16 loss scale."""
        loss = loss / accumulation_steps
        return scaler.scale(loss) if scaler is not None else loss

    @staticmethod
    def _norm(x):
        """L2 norm of each example (over every dimension but the first), shaped to broadcast against x."""
        return x.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))

    def _hook(self, module, inputs, output):
        if self._delta is None:
            self._delta = torch.zeros_like(output, requires_grad=True)
        return output + self._delta.to(output.dtype)

    def backward(self, forward, loss_fn, scaler=None, accumulation_steps=1):
        eps, alpha = self.eps * self.scale, self.alpha * self.scale
        handle = self.embedding.register_forward_hook(self._hook)
        try:
            with self._no_sync():
                loss = loss_fn(forward())
                self._scaled(loss, scaler, accumulation_steps).backward()
            if self._delta is None or self._delta.grad is None:
                raise RuntimeError("PGD: the forward pass never used model.get_input_embeddings() on input ids "
                                   "(fed inputs_embeds?): call the model with input_ids")
            grad, delta, ok = self._delta.grad, self._delta.detach(), torch.ones((), dtype=torch.bool)
            for step in range(self.steps):
                norm = self._norm(grad.float())
                ok = ok.to(norm.device) & torch.isfinite(norm).all()
                delta = delta + alpha * grad.float() / norm.clamp_min(1e-12)
                delta = delta * (eps / self._norm(delta).clamp_min(1e-12)).clamp(max=1.0)
                delta = torch.where(ok, delta, torch.zeros_like(delta))
                last = step == self.steps - 1
                self._delta = delta.detach().requires_grad_(not last)
                if last:
                    self._scaled(loss_fn(forward()), scaler, accumulation_steps).backward()
                else:
                    with self._no_sync():
                        grad, = torch.autograd.grad(self._scaled(loss_fn(forward()), scaler, accumulation_steps),
                                                    self._delta)
            self.skipped = self.skipped.to(ok.device) + (~ok)
        finally:
            handle.remove()
            self._delta = None
        return loss.detach()


class FreeLB:
    """FreeLB (Zhu et al. 2020, arXiv:1909.11764): K ascent steps on a perturbation of the input
    embeddings, each backward adding loss/K to the parameters' gradients ("free" adversarial
    training), on top of the clean loss (without it FreeLB can fall below the baseline). The
    perturbation starts uniform, masked to real tokens and scaled by init_mag / sqrt(len * hidden);
    each step moves it by lr * g / ||g|| per example and, if max_norm > 0, projects it back into
    that L2 ball. With relative=True lr, init_mag and max_norm are in units of the mean
    token-embedding norm (see FGM). If the clean pass's gradient is not finite, no perturbation.

        attack = FreeLB(model, steps=3, lr=0.1, init_mag=0.1)
        loss = attack.backward(lambda: model(**batch), lambda out: F.cross_entropy(out, labels))
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model, steps: int = 3, lr: float = 0.1, init_mag: float = 0.1, max_norm: float = 0.0,
                 pad_token_id: int | None = None, relative: bool = True):
        inner = getattr(model, "module", model)
        if not callable(getattr(inner, "get_input_embeddings", None)):
            raise ValueError(f"FreeLB perturbs the output of model.get_input_embeddings(), which "
                             f"{type(inner).__name__} does not define: add that method returning its token embedding")
        self.embedding = inner.get_input_embeddings()
        with torch.no_grad():
            self.scale = self.embedding.weight.float().norm(dim=-1).mean().item() if relative else 1.0
        self._ddp = model if hasattr(model, "no_sync") else None
        if pad_token_id is None:
            config = getattr(inner, "config", None) or getattr(getattr(inner, "backbone", None), "config", None)
            pad_token_id = getattr(config, "pad_token_id", None)
        self.pad_token_id = pad_token_id
        self.steps, self.lr, self.init_mag, self.max_norm = steps, lr, init_mag, max_norm
        self.skipped = torch.zeros((), dtype=torch.long)
        self._delta = self._mask = None

    def _no_sync(self):
        """Under DDP, a pass whose gradients must not be all-reduced yet (the last pass of the step syncs)."""
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()

    @staticmethod
    def _scaled(loss, scaler, accumulation_steps):
        """The loss as backward wants it: averaged over the accumulation group, times the fp16 loss scale."""
        loss = loss / accumulation_steps
        return scaler.scale(loss) if scaler is not None else loss

    @staticmethod
    def _norm(x):
        """L2 norm of each example (over every dimension but the first), shaped to broadcast against x."""
        return x.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))

    def _hook(self, module, inputs, output):
        if self._delta is None:  # clean pass: which positions are real tokens, and a zero probe of the gradient
            ids = inputs[0]
            keep = ids != self.pad_token_id if self.pad_token_id is not None else torch.ones_like(ids, dtype=torch.bool)
            self._mask = keep.unsqueeze(-1).to(torch.float32)
            self._delta = torch.zeros_like(output, requires_grad=True)
        return output + self._delta.to(output.dtype)

    def _project(self, delta):
        if self.max_norm <= 0:
            return delta
        return delta * (self.max_norm * self.scale / self._norm(delta).clamp_min(1e-12)).clamp(max=1.0)

    def backward(self, forward, loss_fn, scaler=None, accumulation_steps=1):
        handle = self.embedding.register_forward_hook(self._hook)
        try:
            with self._no_sync():
                loss = loss_fn(forward())
                self._scaled(loss, scaler, accumulation_steps).backward()
            if self._delta is None or self._delta.grad is None:
                raise RuntimeError("FreeLB: the forward pass never used model.get_input_embeddings() on input ids "
                                   "(fed inputs_embeds?): call the model with input_ids")
            ok = torch.isfinite(self._norm(self._delta.grad.float())).all()
            mask = self._mask
            lengths = mask.flatten(1).sum(1).view(-1, *[1] * (mask.dim() - 1))
            hidden = self._delta.shape[-1]
            delta = (torch.rand(*mask.shape[:-1], hidden, device=mask.device) * 2 - 1) * mask
            delta = self._project(delta * (self.init_mag * self.scale) / (lengths * hidden).sqrt())
            delta = torch.where(ok, delta, torch.zeros_like(delta))
            for step in range(self.steps):
                self._delta = delta.requires_grad_()
                with self._no_sync() if step < self.steps - 1 else contextlib.nullcontext():
                    self._scaled(loss_fn(forward()) / self.steps, scaler, accumulation_steps).backward()
                if step < self.steps - 1:
                    grad = self._delta.grad.float()
                    norm = self._norm(grad)
                    ok = ok & torch.isfinite(norm).all()
                    moved = self._project(delta.detach() + (self.lr * self.scale) * grad / norm.clamp_min(1e-12))
                    delta = torch.where(ok, moved, torch.zeros_like(moved))
            self.skipped = self.skipped.to(ok.device) + (~ok)
        finally:
            handle.remove()
            self._delta = self._mask = None
        return loss.detach()


class AWP:
    """Adversarial Weight Perturbation (Wu et al. 2020, arXiv:2004.05884), in the form Kaggle
    solutions use (Feedback Prize 2021 1st place and after): after the clean backward, each chosen
    weight w with this micro-batch's gradient g moves by adv_lr * g / ||g|| * ||w||, clamped to
    [w0 - adv_eps*|w0|, w0 + adv_eps*|w0|]; the batch is run forward and backward on the perturbed
    weights; then every weight is copied back bit for bit from the single backup, taken before the
    first weight moves, so that a failure anywhere (even half-way through the perturbation) leaves
    the weights as they were. Sizes are relative to each weight already. The gradient of this
    micro-batch is read by tensor hooks during the clean backward, so gradient accumulation never
    leaks earlier micro-batches into the direction. Norms stay on the device: no host sync per
    parameter.

        attack = AWP(model, adv_lr=1.0, adv_eps=0.01)
        loss = attack.backward(lambda: model(**batch), lambda out: F.cross_entropy(out, labels))
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model, adv_lr: float = 1.0, adv_eps: float = 0.01, param_filter: str = "weight"):
        inner = getattr(model, "module", model)
        self.params = [p for n, p in inner.named_parameters() if p.requires_grad and param_filter in n]
        if not self.params:
            raise ValueError(f"AWP found no trainable parameter whose name contains {param_filter!r}")
        self._ddp = model if hasattr(model, "no_sync") else None
        self.adv_lr, self.adv_eps = adv_lr, adv_eps
        self.skipped = torch.zeros((), dtype=torch.long)

    def _no_sync(self):
        """Under DDP, a pass whose gradients must not be all-reduced yet (the last pass of the step syncs)."""
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()

    @staticmethod
    def _scaled(loss, scaler, accumulation_steps):
        """The loss as backward wants it: averaged over the accumulation group, times the fp16 loss scale."""
        loss = loss / accumulation_steps
        return scaler.scale(loss) if scaler is not None else loss

    @torch.no_grad()
    def _perturb(self, params, grads, backup):
        """Move params in place, each within adv_eps * |w0| of its backup w0."""
        g_norm = torch.stack([g.float().norm() for g in grads])
        w_norm = torch.stack([w.float().norm() for w in backup])
        ok = torch.isfinite(g_norm).all()
        self.skipped = self.skipped.to(ok.device) + (~ok)
        scale = torch.where(ok, self.adv_lr * w_norm / g_norm.clamp_min(1e-12), torch.zeros_like(g_norm))
        for p, g, w0, s in zip(params, grads, backup, scale.unbind()):
            step = (g * s.to(g.dtype)).nan_to_num_(0.0, 0.0, 0.0)
            bound = w0.abs().mul_(self.adv_eps)
            torch.minimum(step, bound, out=step)
            torch.maximum(step, bound.neg_(), out=step)
            p.add_(step.to(p.dtype))

    def backward(self, forward, loss_fn, scaler=None, accumulation_steps=1):
        captured = [None] * len(self.params)
        hooks = [p.register_hook(lambda g, i=i: captured.__setitem__(i, g)) for i, p in enumerate(self.params)]
        try:
            with self._no_sync():
                loss = loss_fn(forward())
                self._scaled(loss, scaler, accumulation_steps).backward()
        finally:
            for h in hooks:
                h.remove()
        hit = [i for i, g in enumerate(captured) if g is not None]
        params, grads = [self.params[i] for i in hit], [captured[i] for i in hit]
        captured.clear()
        if self._ddp is not None and torch.distributed.is_initialized():  # the all-ranks gradient, in one call
            flat = torch.cat([g.reshape(-1) for g in grads]) / torch.distributed.get_world_size()
            torch.distributed.all_reduce(flat)
            grads = [x.view_as(g) for x, g in zip(flat.split([g.numel() for g in grads]), grads)]
        backup = [p.detach().clone() for p in params]
        try:
            self._perturb(params, grads, backup)
            grads.clear()  # this micro-batch's gradients are not needed in the adversarial pass
            self._scaled(loss_fn(forward()), scaler, accumulation_steps).backward()
        finally:
            with torch.no_grad():
                for p, w0 in zip(params, backup):
                    p.copy_(w0)
        return loss.detach()


class SiFT:
    """Scale-invariant fine-tuning (He et al. 2021, DeBERTa, arXiv:2006.03654) as DeBERTa's own
    `DeBERTa/sift/sift.py` defines it, callable like the others.

    A parameter-free LayerNorm (eps 1e-7) is put in front of the embeddings' LayerNorm for the
    duration of the call, so the perturbation lives on normalised embeddings whatever their scale.
    After the clean forward, delta ~ N(0, init^2) clamped to +-2*init takes one ascent step,
    delta += lr * g / (1e-6 + max|g|) per token, where g is the gradient w.r.t. delta alone of
    sum over rows of CE(p_clean, q_perturbed) with the clean predictions fixed (the step is the
    same at any batch size, accumulation or fp16 loss scale). The perturbed forward then adds
    alpha * symmetric KL(perturbed, clean), row mean, to the task loss, and one backward runs
    through both passes: as in DeBERTa, one direction of the KL flows into the perturbed
    predictions, the other into the clean ones. `last_kl` holds the symmetric KL itself (no
    entropy terms). Defaults are DeBERTa's: init 1e-2, lr 1e-4, alpha (its vat_lambda) 3 for
    deberta-v3-xsmall, 5 for larger. Needs a head with at least two logits.

        attack = SiFT(model, alpha=3.0)
        loss = attack.backward(lambda: model(**batch), lambda out: F.cross_entropy(out, labels))
        optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model, alpha: float = 3.0, init: float = 1e-2, lr: float = 1e-4, module=None):
        inner = getattr(model, "module", model)
        if module is None or module == "":
            found = [m for n, m in inner.named_modules() if n.endswith("embeddings.LayerNorm")]
            if len(found) != 1:
                raise ValueError(f"SiFT found {len(found)} modules named '*embeddings.LayerNorm' in "
                                 f"{type(inner).__name__}; pass module= (the LayerNorm after the embeddings, "
                                 "or its name; --sift-module on the command line)")
            module = found[0]
        elif isinstance(module, str):
            named = dict(inner.named_modules())
            if module not in named:
                raise ValueError(f"SiFT: no module named {module!r} in {type(inner).__name__}")
            module = named[module]
        self.module, self.alpha, self.init, self.lr = module, alpha, init, lr
        self._ddp = model if hasattr(model, "no_sync") else None
        self.skipped = torch.zeros((), dtype=torch.long)
        self.last_kl = torch.zeros(())
        self._clean = self._delta = None

    def _no_sync(self):
        """Under DDP, a pass whose gradients must not be all-reduced yet (the last pass of the step syncs)."""
        return self._ddp.no_sync() if self._ddp is not None else contextlib.nullcontext()

    @staticmethod
    def _scaled(loss, scaler, accumulation_steps):
        """The loss as backward wants it: averaged over the accumulation group, times the fp16 loss scale."""
        loss = loss / accumulation_steps
        return scaler.scale(loss) if scaler is not None else loss

    @staticmethod
    def symmetric_kl(logits, target):
        """KL(p||q) + KL(q||p) per row (p: softmax of target, q: of logits), with DeBERTa's gradient:
        the probability factors are constants, so one direction flows through log q, the other through
        log p (detach target to keep it fixed). Its value is the KL itself, >= 0 and 0 when p == q."""
        lq = F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), -1)
        lp = F.log_softmax(target.float().reshape(-1, target.shape[-1]), -1)
        p, q = lp.exp().detach(), lq.exp().detach()
        return (p * (lp.detach() - lq)).sum(-1) + (q * (lq.detach() - lp)).sum(-1)

    def _hook(self, module, args):
        x = args[0]
        if self._delta is None:  # clean pass: normalise and remember
            self._clean = F.layer_norm(x.float(), x.shape[-1:], eps=1e-7)
            return (self._clean.to(x.dtype),) + args[1:]
        return ((self._clean.detach() + self._delta).to(x.dtype),) + args[1:]

    def backward(self, forward, loss_fn, scaler=None, accumulation_steps=1):
        handle = self.module.register_forward_pre_hook(self._hook)
        try:
            with self._no_sync():
                out = forward()
            logits = getattr(out, "logits", out)
            if logits.shape[-1] < 2:
                raise ValueError("SiFT needs a head with at least 2 logits: the symmetric KL of a single "
                                 "logit is always 0 (use FGM or AWP for regression)")
            if self._clean is None:
                raise RuntimeError("SiFT: the forward pass never reached the module it perturbs in front of "
                                   f"({type(self.module).__name__}): pass module= the LayerNorm after the embeddings")
            loss = loss_fn(out)
            noise = torch.randn_like(self._clean, dtype=torch.float32) * self.init
            delta = noise.clamp(-2 * self.init, 2 * self.init)
            self._delta = delta.requires_grad_()
            with self._no_sync():
                adv = forward()
                ascent = self.symmetric_kl(getattr(adv, "logits", adv), logits.detach()).sum()
                unit = scaler.scale(ascent.new_ones(())) if scaler is not None else 1.0  # no fp16 underflow,
                grad, = torch.autograd.grad(ascent * unit, self._delta)  # then undone; a tensor: no host sync
            grad = grad / unit
            ok = torch.isfinite(grad).all()
            self.skipped = self.skipped.to(ok.device) + (~ok)
            moved = delta.detach() + self.lr * grad / (1e-6 + grad.abs().amax(-1, keepdim=True))
            self._delta = torch.where(ok, moved, torch.zeros_like(moved))
            out = forward()
            kl = self.symmetric_kl(getattr(out, "logits", out), logits).mean()
            self.last_kl = kl.detach()
            self._scaled(loss + self.alpha * kl, scaler, accumulation_steps).backward()
        finally:
            handle.remove()
            self._clean = self._delta = None
        return loss.detach()


def make_attack(cfg: Config, model):
    """The attack object the Config asks for (Baseline for method=baseline)."""
    try:
        return {
            "baseline": lambda: Baseline(model),
            "fgm": lambda: FGM(model, eps=cfg.fgm_eps, scope=cfg.fgm_scope),
            "pgd": lambda: PGD(model, eps=cfg.pgd_eps, alpha=cfg.pgd_alpha, steps=cfg.pgd_steps),
            "freelb": lambda: FreeLB(model, steps=cfg.freelb_steps, lr=cfg.freelb_lr, init_mag=cfg.freelb_init,
                                     max_norm=cfg.freelb_max_norm),
            "awp": lambda: AWP(model, adv_lr=cfg.awp_lr, adv_eps=cfg.awp_eps, param_filter=cfg.awp_params),
            "sift": lambda: SiFT(model, alpha=cfg.sift_lambda, init=cfg.sift_init, lr=cfg.sift_lr,
                                 module=cfg.sift_module or None),
        }[cfg.method]()
    except ValueError as e:
        raise UserError(f"--method {cfg.method}: {e}.") from None


# ---------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed() -> bool:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1): NCCL with one GPU per
    process, gloo on CPU. Returns whether this call started it (and so should end it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def resolve_device(name: str) -> torch.device:
    if world_size() > 1 and torch.cuda.is_available():  # torchrun: this process's own GPU
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible: use --device cpu (or auto).")
    return device


def resolve_amp(amp: str, device: torch.device):
    """The autocast dtype, or None for fp32. T4s (compute capability 7.5) report bf16 support but only
    emulate it, so "auto" decides on the compute capability, not torch.cuda.is_bf16_supported()."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """torch AdamW (transformers.AdamW is gone in v5); no weight decay on biases and LayerNorm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    kernel = {"fused": True} if cfg.fused_adamw else {"foreach": False}
    return torch.optim.AdamW(groups, lr=cfg.lr, **(kernel if device.type == "cuda" else {}))


def build_scheduler(optimizer, kind: str, warmup_steps: int, total_steps: int):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm: float):
    """Once per optimizer step, after every backward of the step (the attacks' included):
    unscale (fp16), clip the global norm, step, update the scale, advance the schedule."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    with warnings.catch_warnings():  # a step GradScaler skipped still advances the schedule, on purpose
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class AttackGate:
    """When the attack runs, decided before each optimizer step. adv_start: "warmup" (from the step
    the learning-rate warm-up ends: attacking a freshly initialised head is where FreeLB's early
    NaNs and AWP's early collapse come from, and an attack that starts late is never selected
    because the unattacked checkpoints before it score as well), "auto" (from the first evaluation
    that does not improve on the best so far: the attack as a push once plain training stalls), or
    an epoch (fractional). adv_threshold > 0 also waits until the best validation metric reaches it."""

    def __init__(self, cfg: Config, steps_per_epoch: int, warmup_steps: int):
        self.enabled, self.threshold, self.auto = cfg.method != "baseline", cfg.adv_threshold, cfg.adv_start == "auto"
        if self.auto:
            self.start = None
        elif cfg.adv_start == "warmup":
            self.start = warmup_steps
        else:
            self.start = math.ceil(round(float(cfg.adv_start) * steps_per_epoch, 6))
        self.best = None

    def observe(self, metric: float, step: int):
        """Record an evaluation made after `step` optimizer steps."""
        if self.auto and self.start is None and self.best is not None and metric <= self.best:
            self.start = step
        self.best = metric if self.best is None else max(self.best, metric)

    def on(self, step: int) -> bool:
        """Whether optimizer step `step` (counted from 0) runs the attack."""
        if not self.enabled or self.start is None or step < self.start:
            return False
        return self.threshold <= 0 or (self.best is not None and self.best >= self.threshold)


def evaluation_steps(eval_every: float, steps_per_epoch: int, epochs: int) -> list[int]:
    """The optimizer steps (counted from 1) after which to evaluate: every eval_every of an epoch
    (eval_every <= 1) or every eval_every steps (> 1), and always at the end of each epoch."""
    total = steps_per_epoch * epochs
    if eval_every > 1:
        points = set(range(int(eval_every), total + 1, int(eval_every)))
    else:
        within = [max(1, round(k * eval_every * steps_per_epoch)) for k in range(1, math.ceil(1 / eval_every - 1e-9))]
        points = {e * steps_per_epoch + s for e in range(epochs) for s in within if s < steps_per_epoch}
    return sorted(points | {e * steps_per_epoch for e in range(1, epochs + 1)})


def binary_metrics(y_true, y_pred) -> dict:
    """Accuracy and F1 of the positive class (the competition's metric)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    tp = int(((y_pred == 1) & (y_true == 1)).sum())
    fp = int(((y_pred == 1) & (y_true == 0)).sum())
    fn = int(((y_pred == 0) & (y_true == 1)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"accuracy": float((y_true == y_pred).mean()), "f1": float(f1)}


def best_threshold(y_true, prob) -> float:
    """The probability threshold t (predict 1 where prob > t) that maximises F1 on (y_true, prob),
    in one sort: every distinct prob is a candidate cut. Ties go to the threshold nearest 0.5."""
    y_true, prob = np.asarray(y_true), np.asarray(prob, dtype=np.float64)
    values = np.unique(prob)
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2])  # cut below each value
    order = np.argsort(-prob, kind="stable")
    sorted_prob, positives = prob[order], np.cumsum(y_true[order] == 1)
    predicted = np.searchsorted(-sorted_prob, -cuts, side="left")  # how many probs are > cut
    tp = np.where(predicted > 0, positives[np.maximum(predicted - 1, 0)], 0)
    f1 = 2 * tp / np.maximum(predicted + positives[-1], 1)
    best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))
    return float(np.clip(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]], 0.0, 1.0))


def _autocast(device: torch.device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def micro_step(attack, model, batch, labels, device, amp_dtype, scaler, accumulation_steps: int = 1):
    """Forward and backward of one micro-batch through the attack (Baseline: no attack); returns the loss."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    labels = labels.to(device, non_blocking=True)

    def forward():
        with _autocast(device, amp_dtype):
            return model(**batch)

    return attack.backward(forward, lambda logits: F.cross_entropy(logits.float(), labels), scaler,
                           accumulation_steps)


@torch.inference_mode()
def predict_proba(model, ids, batch_size: int, pad_id: int, device, amp_dtype=None) -> np.ndarray:
    """Class probabilities for every text, in input order: batches sorted by length, one copy to the host.
    Under data-parallel training each rank predicts every world_size-th text and all ranks receive
    the gathered whole, each text exactly once."""
    model.eval()
    shard = np.arange(len(ids))[rank()::world_size()]
    order = shard[np.argsort([len(ids[i]) for i in shard], kind="stable")]
    collate = Collator(pad_id)
    chunks = []
    for start in range(0, len(order), batch_size):
        batch, _ = collate([(ids[i], 0) for i in order[start:start + batch_size]])
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with _autocast(device, amp_dtype):
            logits = model(**batch)
        chunks.append(torch.softmax(getattr(logits, "logits", logits).float(), -1))
    local = torch.cat(chunks).cpu().numpy() if chunks else np.zeros((0, 2), dtype=np.float32)
    parts = [(order, local)]
    if world_size() > 1:
        parts = [None] * world_size()
        dist.all_gather_object(parts, (order, local))
    probs = np.empty((len(ids), parts[0][1].shape[-1]), dtype=np.float32)
    for rows, values in parts:
        probs[rows] = values
    return probs


class Selection:
    """Every evaluation of one fold, and the best one's weights (on the CPU) and validation probabilities."""

    def __init__(self, metric: str):
        self.metric, self.history, self.best, self.state, self.probs = metric, [], None, None, None

    def record(self, row: dict, metrics: dict, probs: np.ndarray, model: nn.Module) -> bool:
        """Add an evaluation; keep its weights if it is the best so far. Returns whether it is."""
        self.history.append(row)
        improved = self.best is None or metrics[self.metric] > self.best[self.metric]
        if improved:
            self.best = {"epoch": row["epoch"], "step": row["step"], "attack_seen": row["attack_seen"], **metrics}
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.probs = probs
        return improved


def train_fold(cfg: Config, model: nn.Module, train_data, valid_data, device, amp_dtype, pad_id: int, name="",
               resume: dict | None = None, checkpoint=None):
    """Train one model; evaluate on validation at the steps `evaluation_steps` names; keep the best
    evaluation's weights (on the CPU).

    train_data and valid_data are (token ids, labels). Returns a dict with one row per evaluation,
    the best one, its state_dict and validation probabilities, the attack's start, scale and skip
    count, and the training and evaluation times. After every epoch checkpoint(state) receives all it
    takes to continue from there (resume=state), with the same result as a run never interrupted."""
    loader = make_loader(*train_data, batch_size=cfg.batch_size, shuffle=True,
                         collator=Collator(pad_id, cfg.max_len if cfg.pad_to_max else None), seed=cfg.seed,
                         group_by_length=cfg.group_by_length, num_workers=cfg.num_workers,
                         pin=device.type == "cuda", rank=rank(), world_size=world_size())
    micro_batches = len(loader)
    steps_per_epoch = math.ceil(micro_batches / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup * total_steps)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg.scheduler, warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    wrapped = model
    if world_size() > 1:  # one process per GPU; DDP averages the gradients of the step's last backward
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    attack, plain = make_attack(cfg, wrapped), Baseline(wrapped)
    forward_model = compile_blocks(wrapped, cfg.compile)
    gate = AttackGate(cfg, steps_per_epoch, warmup_steps)
    evals = set(evaluation_steps(cfg.eval_every, steps_per_epoch, cfg.epochs))
    log.info(f"{name}{len(train_data[0])} training texts | {steps_per_epoch} optimizer steps per epoch, {total_steps} "
             f"in all, {warmup_steps} of warm-up | total batch {cfg.batch_size * cfg.grad_accum} = batch "
             f"{cfg.batch_size} x {cfg.grad_accum} accumulation, {world_size()} process(es) sharing each batch | "
             f"{len(evals)} evaluations on {len(valid_data[0])} validation texts")
    if getattr(attack, "scale", 1.0) != 1.0:
        log.info(f"{name}{cfg.method}: sizes are relative to the mean token-embedding norm {attack.scale:.4f}"
                 + (f" (fgm_eps {cfg.fgm_eps} -> {cfg.fgm_eps * attack.scale:.4f})" if cfg.method == "fgm" else ""))
    selection, adv_started, adv_steps = Selection(cfg.select_metric), None, 0
    train_seconds = eval_seconds = 0.0
    window_loss, window_batches = torch.zeros((), device=device), 0
    first_epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if scaler is not None and resume["scaler"] is not None:
            scaler.load_state_dict(resume["scaler"])
        gate.start, gate.best = resume["gate"]
        selection.__dict__.update(resume["selection"])
        adv_started, adv_steps, first_epoch = resume["adv_started"], resume["adv_steps"], resume["epoch"]
        train_seconds, eval_seconds = resume["train_seconds"], resume["eval_seconds"]
        attack.skipped = torch.tensor(resume["skipped"])
        set_rng_state(resume["rng"])
        log.info(f"{name}resumed after epoch {first_epoch} of {cfg.epochs}")

    for epoch in range(first_epoch, cfg.epochs):
        loader.batch_sampler.set_epoch(epoch)
        model.train()
        tick = time.perf_counter()
        bar = tqdm(loader, desc=f"{name}epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not cfg.progress or rank() > 0, dynamic_ncols=True)
        for i, (batch, labels) in enumerate(bar):
            if i % cfg.grad_accum == 0:
                step = epoch * steps_per_epoch + i // cfg.grad_accum
                group = min(cfg.grad_accum, micro_batches - i)  # an epoch's last group may be shorter
                active = gate.on(step)
                adv_steps += active
                if active and adv_started is None:
                    adv_started = {"epoch": round(step / steps_per_epoch, 4), "step": step}
                    log.info(f"{name}adversarial training ({cfg.method}) on from epoch "
                             f"{adv_started['epoch']:.2f} (optimizer step {step})")
            last_micro = (i + 1) % cfg.grad_accum == 0 or i + 1 == micro_batches
            with wrapped.no_sync() if wrapped is not model and not last_micro else contextlib.nullcontext():
                loss = micro_step(attack if active else plain, forward_model, batch, labels, device, amp_dtype,
                                  scaler, group)
            window_loss += loss
            window_batches += 1
            if not last_micro:
                continue
            optimizer_step(model, optimizer, scheduler, scaler, cfg.max_grad_norm)
            if cfg.progress and i % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if step + 1 not in evals:
                continue
            train_loss = (window_loss / window_batches).item()  # also waits for the GPU: the timing is honest
            train_seconds += time.perf_counter() - tick
            position = round((step + 1) / steps_per_epoch, 4)
            if not math.isfinite(train_loss):
                raise UserError(f"{name}training diverged: the mean training loss was {train_loss} up to epoch "
                                f"{position:.2f} (optimizer step {step + 1}); lower --lr or the attack's size, or "
                                "use --amp bf16 or off.")
            tock = time.perf_counter()
            probs = predict_proba(model, valid_data[0], cfg.eval_batch_size, pad_id, device, amp_dtype)
            seconds = time.perf_counter() - tock
            eval_seconds += seconds
            metrics = binary_metrics(valid_data[1], probs.argmax(1))
            row = {"epoch": position, "step": step + 1, "train_loss": round(train_loss, 6),
                   "valid_accuracy": metrics["accuracy"], "valid_f1": metrics["f1"], "adv_steps": adv_steps,
                   "attack_seen": adv_steps > 0, "lr": scheduler.get_last_lr()[0], "eval_seconds": round(seconds, 3)}
            improved = selection.record(row, metrics, probs, model)
            gate.observe(metrics[cfg.select_metric], step + 1)
            log.info(f"{name}epoch {position:.2f} | loss {train_loss:.4f} | valid acc {metrics['accuracy']:.4f} "
                     f"f1 {metrics['f1']:.4f} | {'attacked ' + str(adv_steps) + ' steps | ' if adv_steps else ''}"
                     f"eval {seconds:.1f}s{' | best' if improved else ''}")
            window_loss, window_batches = torch.zeros((), device=device), 0
            model.train()
            tick = time.perf_counter()
        bar.close()
        if checkpoint is not None:
            checkpoint({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                        "gate": (gate.start, gate.best), "selection": dict(vars(selection)),
                        "adv_started": adv_started, "adv_steps": adv_steps,
                        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                        "skipped": int(attack.skipped), "rng": rng_state()})
    skips = int(attack.skipped)
    if skips:
        log.info(f"{name}{cfg.method}: {skips} step(s) had a non-finite gradient and ran without perturbation")
    best = selection.best
    attack_said = f", {'after' if best['attack_seen'] else 'before'} the attack started" if cfg.method != "baseline" \
        else ""
    log.info(f"{name}selected the evaluation at epoch {best['epoch']:.2f} (valid {cfg.select_metric} "
             f"{best[cfg.select_metric]:.4f}){attack_said}")
    return {"history": selection.history, "best": best, "state": selection.state, "valid_probs": selection.probs[:, 1],
            "adv_started_at": adv_started, "attack_scale": getattr(attack, "scale", None), "attack_skips": skips,
            "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "train_samples": len(train_data[0]) * cfg.epochs}


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The transformer's stack of layers: the largest nn.ModuleList of at least two modules of one class."""
    stacks = [m for m in model.modules()
              if isinstance(m, nn.ModuleList) and len(m) > 1 and len({type(b) for b in m}) == 1]
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def compile_blocks(model: nn.Module, enabled: bool):
    """torch.compile each transformer layer in place (regional compilation). The embeddings, where
    the attacks hook in, stay eager, so a hook added or removed at any step takes effect (a model
    compiled whole does not see hooks registered after its first call); parameter names and the
    state_dict are unchanged. If compiling fails on the first batch, every layer goes back to eager
    and the run goes on; errors of later calls, and any error that is not the compiler's, propagate.
    Returns the callable to run the model with."""
    blocks = repeated_blocks(getattr(model, "module", model)) if enabled else None
    if blocks is None or not hasattr(nn.Module, "compile"):
        if enabled:
            log.warning("compile: no stack of transformer layers found (or torch < 2.2); running eagerly")
        return model
    for block in blocks:
        block.compile(dynamic=True)
    first = True

    def call(**kwargs):
        nonlocal first
        if not first:
            return model(**kwargs)
        first = False
        try:
            return model(**kwargs)
        except Exception as e:
            if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                raise
            log.warning(f"torch.compile failed on the first batch ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "running eagerly")
            for block in blocks:
                block._compiled_call_impl = None  # undo nn.Module.compile
            return model(**kwargs)

    return call


# ---------------------------------------------------------------------------------------------
# Hugging Face Trainer integration
# ---------------------------------------------------------------------------------------------


def _build_adversarial_trainer():
    """transformers.Trainer needs accelerate; build the subclass only when it is asked for, so that
    advtrain itself imports where accelerate is missing."""
    from transformers import Trainer

    class AdversarialTrainer(Trainer):
        """transformers.Trainer that runs an advtrain attack in every training step.

            trainer = advtrain.AdversarialTrainer(model=model, args=args, train_dataset=ds,
                                                  attack=advtrain.AWP(model, adv_lr=1.0, adv_eps=0.01))
            trainer.train()

        The attack's passes go through Trainer's own machinery: the accelerator's GradScaler (fp16),
        its autocast, Trainer's normalisation for gradient accumulation, max_grad_norm and the
        optimizer step (both after the step's last backward), DDP through torchrun. attack=None is
        plain Trainer; adv_start is the (fractional) epoch from which the attack runs. Works with
        Hugging Face heads (outputs with .loss/.logits; compute_loss_func is honoured) and with
        advtrain.Classifier (cross-entropy on its logits)."""

        def __init__(self, *args, attack=None, adv_start: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.attack, self.adv_start = attack, adv_start
            if isinstance(getattr(self.model, "module", self.model), Classifier) and self.args.label_names is None:
                self.label_names = ["labels"]  # its forward takes no labels: keep the column anyway
            if attack is not None and self.args.n_gpu > 1:
                raise ValueError("AdversarialTrainer runs one process per GPU: launch with torchrun, not "
                                 "DataParallel (set CUDA_VISIBLE_DEVICES to one GPU or use torchrun)")

        def _closures(self, model, inputs, num_items_in_batch):
            """(forward, loss_fn) for this batch, as the attacks take them."""
            inner = getattr(model, "module", model)
            if isinstance(inner, Classifier):
                labels = inputs["labels"]
                features = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
                return lambda: model(**features), lambda logits: F.cross_entropy(logits.float(), labels)
            if self.compute_loss_func is not None:
                labels = inputs["labels"]
                features = {k: v for k, v in inputs.items() if k != "labels"}
                return (lambda: model(**features),
                        lambda out: self.compute_loss_func(out, labels, num_items_in_batch=num_items_in_batch))
            extra = {"num_items_in_batch": num_items_in_batch} if (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None) else {}
            return lambda: model(**inputs, **extra), lambda out: out["loss"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not isinstance(getattr(model, "module", model), Classifier):
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)
            forward, loss_fn = self._closures(model, inputs, num_items_in_batch)
            logits = forward()
            loss = loss_fn(logits)
            return (loss, {"logits": logits}) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
            if self.attack is None or (self.state.epoch or 0.0) < self.adv_start:
                return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
            if str(self.accelerator.distributed_type).endswith("DEEPSPEED"):
                raise ValueError("advtrain attacks call backward themselves; DeepSpeed is not supported")
            model.train()
            if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
                self.optimizer.train()
            inputs = self._prepare_inputs(inputs)
            scaled_already = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
            accumulation = 1 if scaled_already else getattr(self, "current_gradient_accumulation_steps",
                                                            self.args.gradient_accumulation_steps)
            accumulation *= self.accelerator.gradient_accumulation_steps  # 1 where Trainer divides itself
            forward, loss_fn = self._closures(model, inputs, num_items_in_batch)
            with self.compute_loss_context_manager():
                loss = self.attack.backward(forward, loss_fn, scaler=self.accelerator.scaler,
                                            accumulation_steps=accumulation)
            return loss / accumulation

    return AdversarialTrainer


def __getattr__(name):
    if name == "AdversarialTrainer":
        globals()[name] = _build_adversarial_trainer()
        return globals()[name]
    raise AttributeError(f"module 'advtrain' has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Submission: check and write
# ---------------------------------------------------------------------------------------------


def read_submission(path: Path) -> pd.DataFrame:
    """A submission file as written (every cell as text), for check_submission to judge."""
    if not path.is_file():
        raise UserError(f"{path} not found: train first (make train) or fetch kernel outputs (make output).")
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable CSV ({type(e).__name__}).") from None


def check_submission(sub: pd.DataFrame, expected_ids, name: str = "submission") -> None:
    """Raise UserError unless sub is exactly id,target with each test id once (Kaggle matches rows by id,
    so any order) and targets written as 0 or 1. Ids are compared as text, as in the competition files."""
    if list(sub.columns) != ["id", "target"]:
        raise UserError(f"{name}: columns must be id,target, found {','.join(map(str, sub.columns))}.")
    ids, expected = sub["id"].astype(str), pd.Index(np.asarray(expected_ids).astype(str))
    if len(sub) != len(expected):
        raise UserError(f"{name}: {len(sub)} rows, but the test set has {len(expected)}.")
    dup = ids[ids.duplicated()]
    if len(dup):
        raise UserError(f"{name}: id {dup.iloc[0]} appears more than once.")
    unknown = ids[~ids.isin(expected)]
    if len(unknown):
        raise UserError(f"{name}: {len(unknown)} id(s) are not in the test set, e.g. {unknown.iloc[0]!r} "
                        "(ids must be written exactly as in test.csv).")
    target = sub["target"].astype(str)
    bad = ~target.isin(["0", "1"])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"{name}: target must be written 0 or 1, found {target.iloc[i]!r} at row {i + 1}.")


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename the temporary file over path: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file would be, not mkstemp's 0600
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_submission(path: Path, ids, labels, expected_ids) -> pd.DataFrame:
    sub = pd.DataFrame({"id": np.asarray(ids), "target": np.asarray(labels).astype(int)})
    check_submission(sub, expected_ids, str(path))
    atomic_write(path, lambda tmp: sub.to_csv(tmp, index=False))
    return sub


def _finite(obj):
    """obj with every non-finite float replaced by None, so that it is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    """Strict JSON (NaN and infinities become null), written atomically."""
    text = json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ---------------------------------------------------------------------------------------------
# A whole run: data -> folds -> submission, metrics.json
# ---------------------------------------------------------------------------------------------


# A run writes into output_dir/.advtrain-run/ and moves its files into output_dir only once it has
# succeeded; after a failure that folder keeps the log (with the error) and the last epoch's
# checkpoint for --resume, and blocks nothing. output_dir/.advtrain.lock keeps two runs apart.
STAGE, LOCK, CHECKPOINT = ".advtrain-run", ".advtrain.lock", "checkpoint.pt"
RUN_FILES = ("submission.csv", "test_probs.csv", "oof.csv", "metrics.json", "train.log", "model.pt")


def prepare_output_dir(path: str, overwrite: bool, resume: bool = False) -> Path:
    """Check output_dir before anything is loaded: a folder, and without earlier results unless asked."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir {out} is a file: choose a folder with --output-dir.")
    earlier = [p for p in out.iterdir() if not p.name.startswith(".advtrain")] if out.is_dir() else []
    if earlier and not overwrite and not resume:
        raise UserError(f"{out} already holds files from an earlier run: pass --overwrite to replace them (once "
                        "this run succeeds), or choose another --output-dir.")
    if resume and not (out / STAGE / CHECKPOINT).is_file():
        raise UserError(f"--resume: {out / STAGE} holds no checkpoint of an interrupted run (one is written at the "
                        "end of every epoch): run without --resume.")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold output_dir/.advtrain.lock for the duration of a run; a lock left by a dead process is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            text = lock.read_text().strip() if lock.is_file() else ""
            pid = int(text) if text.isdigit() else 0
            if pid and pid != os.getpid() and _alive(pid):
                raise UserError(f"{out} is being written by another advtrain run (process {pid}): wait for it to "
                                "finish, or choose another --output-dir.") from None
            lock.unlink(missing_ok=True)
    else:
        raise UserError(f"Could not take the lock {lock}: remove it if no advtrain run is writing into {out}.")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def publish(stage: Path, out: Path) -> None:
    """Move a finished run's files from stage into out. The earlier metrics.json goes first and the new
    one comes last, so a metrics.json always sits beside the files of its own run; files of an earlier
    run that this one did not write (model.pt after --no-save-model) are removed."""
    new = sorted((p.name for p in stage.iterdir() if p.is_file() and p.name != CHECKPOINT),
                 key=lambda name: name == "metrics.json")
    (out / "metrics.json").unlink(missing_ok=True)
    for p in out.iterdir():
        ours = p.name in RUN_FILES or (p.name.startswith("model_fold") and p.suffix == ".pt")
        if p.is_file() and ours and p.name not in new:
            p.unlink()
    for name in new:
        os.replace(stage / name, out / name)
    for p in stage.iterdir():
        p.unlink()
    stage.rmdir()


@contextlib.contextmanager
def logging_to(logfile: Path | None, append: bool = False):
    """Log lines go to stdout and to logfile for the duration of a run (nowhere when logfile is None)."""
    if logfile is None:
        handlers = [logging.NullHandler()]
    else:
        handlers = [logging.StreamHandler(sys.stdout),
                    logging.FileHandler(logfile, mode="a" if append else "w", encoding="utf-8")]
        handlers[1].setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in handlers:
        log.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


def versions() -> dict:
    return {"advtrain": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "pandas": pd.__version__}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class Interrupted(Exception):
    """Ctrl-C or SIGTERM (a Kaggle session ending): the run stops, its checkpoint stays for --resume."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def run(cfg: Config) -> dict:
    """Train with cfg, write submission.csv, test_probs.csv, oof.csv, metrics.json, train.log and
    model.pt into cfg.output_dir, and return the metrics dict (the content of metrics.json).
    The files appear once the run has succeeded (see STAGE); a failed run leaves the earlier ones as
    they were. Under torchrun every process trains its share; rank 0 alone logs and writes."""
    started_group = init_distributed()
    try:
        out = prepare_output_dir(cfg.output_dir, cfg.overwrite, cfg.resume)
        stage = out / STAGE
        if world_size() > 1:
            dist.barrier()  # every rank has checked the folder before rank 0 writes into it
        if rank() > 0:
            with logging_to(None):
                return _run(cfg, stage)
        with output_lock(out):
            if not cfg.resume and stage.exists():
                for p in stage.iterdir():
                    p.unlink()
            stage.mkdir(exist_ok=True)
            with logging_to(stage / "train.log", append=cfg.resume):
                try:
                    metrics = _run(cfg, stage)
                except (UserError, Interrupted, KeyboardInterrupt, OSError) as e:
                    why = "interrupted" if isinstance(e, (Interrupted, KeyboardInterrupt)) else str(e).rstrip(".")
                    kept = (" (its last completed epoch is kept: rerun with --resume)"
                            if (stage / CHECKPOINT).is_file() else "")
                    log.error(f"run stopped: {why}; the log of this run is {stage / 'train.log'}{kept}")
                    raise
                publish(stage, out)
                log.info(f"wrote {out / 'submission.csv'} and {out / 'metrics.json'}")
            return metrics
    finally:
        if started_group:
            dist.destroy_process_group()


def _run(cfg: Config, out: Path) -> dict:
    started = time.time()
    log.info(f"advtrain {__version__} | " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    data = prepare_data(cfg)
    cfg = dataclasses.replace(cfg, max_len=data["max_len"])
    log.info(f"data {data['dir']}: {len(data['train'])} train / {len(data['test'])} test rows, max_len "
             f"{data['max_len']} tokens (longest training text {data['longest']}) | device {describe_device(device)} | "
             f"amp {str(amp_dtype).replace('torch.', '') if amp_dtype else 'off'}")
    folds = make_folds(cfg, data["targets"])
    results, oof, test_probs = train_folds(cfg, data, folds, device, amp_dtype, out)
    metrics = summarize_run(cfg, data, folds, results, oof, device, amp_dtype, started)
    if rank() == 0:
        write_outputs(out, data, oof, test_probs, metrics)
    return metrics


def prepare_data(cfg: Config) -> dict:
    """Read and check the competition files, load the tokenizer and tokenize every text once."""
    data_dir = find_data_dir(cfg.data_dir)
    train_df, test_df, order = load_competition(data_dir, cfg.use_keyword)
    if cfg.split == "holdout":  # sizes that leave nothing to train on fail here, before the model loads
        holdout_split(len(train_df), cfg.seed, cfg.holdout_size, cfg.valid_size)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    try:
        model_config = transformers.AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:
        raise UserError(f"Could not load the config of {cfg.model!r} ({str(e).splitlines()[0]}).") from None
    limit = model_max_len(tokenizer, model_config)
    texts = train_df["text"].tolist()
    train_ids = tokenize(tokenizer, texts, limit)
    check_tokenizer(tokenizer, model_config, train_ids, cfg.model)
    longest = max(map(len, train_ids))
    max_len = min(cfg.max_len, limit) if cfg.max_len else longest
    if max_len < longest:
        train_ids = tokenize(tokenizer, texts, max_len)
    return {"dir": data_dir, "train": train_df, "test": test_df, "order": order, "model_path": model_path,
            "train_ids": train_ids, "test_ids": tokenize(tokenizer, test_df["text"].tolist(), max_len),
            "targets": train_df["target"].to_numpy(), "max_len": max_len, "longest": longest,
            "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0}


def check_tokenizer(tokenizer, model_config, ids, name: str) -> None:
    """Refuse a tokenizer that does not fit the model: ids past the model's vocabulary (an IndexError
    mid-training otherwise), or one that turns most words into the unknown token (a model folder
    without its tokenizer files gets an empty one, and trains on [UNK] alone)."""
    vocab = getattr(model_config, "vocab_size", None)
    top = max((max(x) for x in ids if x), default=0)
    if vocab and top >= vocab:
        raise UserError(f"The tokenizer of {name!r} produces token id {top}, but the model has only {vocab} "
                        "embeddings: the tokenizer files belong to another model; use the tokenizer saved with it.")
    unk = tokenizer.unk_token_id
    special = set(tokenizer.all_special_ids) - {unk}
    words = [t for x in ids for t in x if t not in special]
    unknown = sum(t == unk for t in words) / max(len(words), 1) if unk is not None else 0.0
    if unknown > 0.5:
        raise UserError(f"The tokenizer of {name!r} reads {100 * unknown:.0f}% of "
                        "the training tokens as unknown: the model folder lacks its tokenizer files "
                        "(tokenizer.json, vocab or spm model); copy them in with save_pretrained.")


def make_folds(cfg: Config, targets) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(train, valid, holdout) row indices per fold: one fold for split=holdout, n_folds without holdout."""
    if cfg.split == "holdout":
        return [holdout_split(len(targets), cfg.seed, cfg.holdout_size, cfg.valid_size)]
    if cfg.n_folds > min(np.bincount(targets, minlength=2)):
        raise UserError(f"n_folds={cfg.n_folds} is more than the {min(np.bincount(targets, minlength=2))} rows of the "
                        "rarer class in train.csv: choose --n-folds 5 or use --split holdout.")
    return [(tr, va, np.array([], dtype=int)) for tr, va in kfold_splits(targets, cfg.n_folds, cfg.seed)]


def train_folds(cfg: Config, data: dict, folds, device, amp_dtype, out: Path):
    """Train one model per fold; returns the per-fold results, the out-of-fold table (validation and
    holdout probabilities of every fold's best evaluation) and the test probabilities averaged over folds.
    At the end of every epoch the whole training state goes to out/checkpoint.pt, from which
    cfg.resume continues (finished folds are not trained again)."""
    ids, targets = data["train_ids"], data["targets"]
    saved = load_checkpoint(out / CHECKPOINT, cfg) if cfg.resume else {"completed": [], "current": None}
    completed = saved["completed"]

    def checkpoint(current):
        if rank() == 0:
            state = {"config": dataclasses.asdict(cfg), "completed": completed, "current": current}
            atomic_write(out / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    for k, (tr, va, ho) in enumerate(folds):
        if k < len(completed):
            log.info(f"fold {k + 1}/{len(folds)}: finished before the interruption, not trained again")
            continue
        name = f"fold {k + 1}/{len(folds)} " if len(folds) > 1 else ""
        seed_everything(cfg.seed)
        model = Classifier.from_pretrained(data["model_path"], pooling=cfg.pooling, dropout=cfg.dropout).to(device)
        current = saved["current"] if saved["current"] and saved["current"]["fold"] == k else None
        result = train_fold(cfg, model, ([ids[i] for i in tr], targets[tr]), ([ids[i] for i in va], targets[va]),
                            device, amp_dtype, data["pad_id"], name, resume=current,
                            checkpoint=lambda state, k=k: checkpoint(dict(state, fold=k)))
        model.load_state_dict(result.pop("state"))
        parts = [("valid", va, result.pop("valid_probs"))]
        if len(ho):
            parts.append(("holdout", ho, predict_proba(model, [ids[i] for i in ho], cfg.eval_batch_size,
                                                       data["pad_id"], device, amp_dtype)[:, 1]))
        oof = [pd.DataFrame({"id": data["train"]["id"].to_numpy()[rows], "target": targets[rows], "prob": prob,
                             "split": part, "fold": k}) for part, rows, prob in parts]
        test = predict_proba(model, data["test_ids"], cfg.eval_batch_size, data["pad_id"], device, amp_dtype)[:, 1]
        if cfg.save_model and rank() == 0:
            save_model(model, out / ("model.pt" if len(folds) == 1 else f"model_fold{k}.pt"))
        completed.append({"result": result, "oof": oof, "test": test})
        checkpoint(None)
        del model
    results = [c["result"] for c in completed]
    test_probs = np.mean([c["test"] for c in completed], axis=0)
    return results, pd.concat([df for c in completed for df in c["oof"]], ignore_index=True), test_probs


def load_checkpoint(path: Path, cfg: Config) -> dict:
    """The checkpoint of an interrupted run, if it was made with the same settings."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"--resume: {path} cannot be read ({type(e).__name__}): run without --resume.") from None
    differ = _differing_settings(saved["config"], cfg)
    if differ:
        raise UserError(f"--resume: the interrupted run used other settings ({', '.join(differ)}): resume with "
                        "the same settings, or run without --resume.")
    return saved


def save_model(model: nn.Module, path: Path) -> None:
    """model.pt; a full disk costs the model file, never the submission (written with the other outputs)."""
    try:
        atomic_write(path, lambda tmp: torch.save(model.state_dict(), tmp))
    except (OSError, RuntimeError) as e:
        log.warning(f"{path.name} not saved ({str(e).splitlines()[0]}): free some disk space, or pass "
                    "--no-save-model; the submission and metrics are written all the same")


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def decide_threshold(cfg: Config, valid: pd.DataFrame) -> float:
    """The probability above which a tweet is labelled 1 (argmax of two classes is prob > 0.5)."""
    if cfg.threshold == "argmax":
        return 0.5
    if cfg.threshold == "auto":
        return best_threshold(valid["target"], valid["prob"])
    return float(cfg.threshold)


def summarize_run(cfg: Config, data: dict, folds, results, oof: pd.DataFrame, device, amp_dtype, started) -> dict:
    """metrics.json: one shape whatever the split. `score` is measured on the holdout (split=holdout)
    or on the out-of-fold validation predictions (split=kfold), with argmax and with the threshold."""
    valid = oof[oof["split"] == "valid"]
    threshold = decide_threshold(cfg, valid)
    scored_on = "holdout" if cfg.split == "holdout" else "out-of-fold"
    scored = oof[oof["split"] == ("holdout" if cfg.split == "holdout" else "valid")]
    argmax = binary_metrics(scored["target"], (scored["prob"] > 0.5).astype(int))
    tuned = binary_metrics(scored["target"], (scored["prob"] > threshold).astype(int))
    log.info(f"{scored_on}: argmax acc {argmax['accuracy']:.4f} f1 {argmax['f1']:.4f} | threshold {threshold:.3f} "
             f"({cfg.threshold}) acc {tuned['accuracy']:.4f} f1 {tuned['f1']:.4f}")
    train_seconds = sum(r["train_seconds"] for r in results)
    bests = [r["best"] for r in results]
    return {
        "config": dataclasses.asdict(cfg),
        "evaluations": [dict(row, fold=k) for k, r in enumerate(results) for row in r["history"]],
        "selected": [dict(b, fold=k) for k, b in enumerate(bests)],
        "valid_best": {m: float(np.mean([b[m] for b in bests])) for m in ("accuracy", "f1")},
        "attack_seen": all(b["attack_seen"] for b in bests),
        "score": {"on": scored_on, "rows": len(scored), "threshold": threshold, "argmax": argmax, "tuned": tuned},
        "train_samples_per_s": round(sum(r["train_samples"] for r in results) / train_seconds, 2),
        "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(sum(r["eval_seconds"] for r in results), 2),
        "attack_scale": results[0]["attack_scale"],
        "attack_skips": sum(r["attack_skips"] for r in results),
        "adv_started_at": [r["adv_started_at"] for r in results],
        "device": describe_device(device) if world_size() == 1 else f"{world_size()} x {describe_device(device)}",
        "world_size": world_size(),
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "data": {"dir": str(data["dir"]), "train_rows": len(data["train"]), "test_rows": len(data["test"]),
                 "train": len(folds[0][0]), "valid": len(folds[0][1]), "holdout": len(folds[0][2]),
                 "max_len": data["max_len"], "longest_train_text": data["longest"]},
        "versions": versions(),
        "seconds_total": round(time.time() - started, 2),
    }


def write_outputs(out: Path, data: dict, oof: pd.DataFrame, test_probs, metrics: dict) -> None:
    """submission.csv (test labels at the run's threshold), test_probs.csv, oof.csv, metrics.json."""
    order = data["order"]
    prob = pd.Series(test_probs, index=data["test"]["id"].to_numpy()).loc[order].to_numpy()
    write_submission(out / "submission.csv", order, (prob > metrics["score"]["threshold"]).astype(int), order)
    probs_df = pd.DataFrame({"id": order, "prob": prob})
    atomic_write(out / "test_probs.csv", lambda tmp: probs_df.to_csv(tmp, index=False))
    atomic_write(out / "oof.csv", lambda tmp: oof.to_csv(tmp, index=False))
    write_json(out / "metrics.json", metrics)


# ---------------------------------------------------------------------------------------------
# Comparison across methods and seeds: the article's table, done with more than one seed
# ---------------------------------------------------------------------------------------------

def paired_interval(diffs) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% Student-t interval (nan bounds for a single pair)."""
    from scipy.stats import t

    diffs = np.asarray(diffs, dtype=float)
    mean = float(diffs.mean())
    if len(diffs) < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.975, len(diffs) - 1)) * float(diffs.std(ddof=1)) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def run_dir_name(method: str, seed: int) -> str:
    return f"{method}-seed{seed}"


# Settings that do not change a run's result: a finished run is reused whatever they were.
_NOT_RESULTS = ("output_dir", "overwrite", "resume", "progress", "num_workers")


def _differing_settings(recorded: dict, wanted: Config) -> list[str]:
    """The settings in which a finished run's recorded config differs from the wanted one. A setting
    the run did not record (it predates that setting) counts as its default."""
    want, defaults = dataclasses.asdict(wanted), {f.name: f.default for f in dataclasses.fields(Config)}
    return [k for k in want if k not in _NOT_RESULTS and k != "max_len" and recorded.get(k, defaults[k]) != want[k]]


def result_row(path: Path) -> tuple[dict, dict]:
    """One row of the comparison from a run's metrics.json, and the config the run recorded."""
    try:
        m = json.loads(path.read_text())
        score = m["score"]
        return {"method": m["config"]["method"], "seed": m["config"]["seed"],
                "valid_best": m["valid_best"][m["config"]["select_metric"]],
                "holdout_accuracy": score["tuned"]["accuracy"], "holdout_f1": score["tuned"]["f1"],
                "holdout_f1_argmax": score["argmax"]["f1"], "threshold": score["threshold"],
                "attack_seen": bool(m["attack_seen"]), "train_seconds": m["train_seconds"],
                "samples_per_s": m["train_samples_per_s"], "attack_skips": m["attack_skips"],
                "run": path.parent.name}, m["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a metrics.json of advtrain ({type(e).__name__}: {e}): delete that run "
                        "folder to run it again.") from None


def with_changed_labels(root: Path, results: pd.DataFrame, reference: str) -> pd.DataFrame:
    """results with `labels_changed`: for each run, the share of its submission.csv's test labels that
    differ against the reference method's run of the same seed (does the method change what is submitted?)."""
    labels = {r.run: pd.read_csv(Path(root) / r.run / "submission.csv", dtype=str).set_index("id")["target"]
              for r in results.itertuples()}
    ref = {r.seed: labels[r.run] for r in results.itertuples() if r.method == reference}
    changed = [float((labels[r.run] != ref[r.seed].loc[labels[r.run].index]).mean()) if r.seed in ref else np.nan
               for r in results.itertuples()]
    return results.assign(labels_changed=changed)


def summarize(results: pd.DataFrame, reference: str = "baseline"):
    """(per-method mean and std, per-method paired difference from the reference on the same seeds)."""
    metrics = ["valid_best", "holdout_accuracy", "holdout_f1", "holdout_f1_argmax", "attack_seen"]
    order = list(dict.fromkeys(results["method"]))
    summary = results.assign(attack_seen=results["attack_seen"].astype(float)).groupby(
        "method", sort=False)[metrics].agg(["mean", "std", "count"]).loc[order]
    diffs = []
    ref = results[results["method"] == reference].set_index("seed")
    for method in order:
        if method == reference or ref.empty:
            continue
        mine = results[results["method"] == method].set_index("seed")
        seeds = sorted(set(mine.index) & set(ref.index))
        if not seeds:
            continue
        row = {"method": method, "seeds": len(seeds)}
        for metric in ("holdout_f1", "holdout_f1_argmax", "holdout_accuracy"):
            mean, lo, hi = paired_interval(mine.loc[seeds, metric] - ref.loc[seeds, metric])
            row.update({f"{metric}_diff": mean, f"{metric}_lo": lo, f"{metric}_hi": hi})
        diffs.append(row)
    return summary, pd.DataFrame(diffs)


def _verdict(row, reference: str) -> str:
    mean, lo, hi = (100 * row[f"holdout_f1_{k}"] for k in ("diff", "lo", "hi"))
    if math.isnan(lo):
        return f"{row['method']} vs {reference}: {mean:+.2f} F1 points on one seed; one seed gives no interval."
    verdict = "distinguishable from zero" if lo > 0 or hi < 0 else "not distinguishable from zero"
    return (f"{row['method']} vs {reference}: {mean:+.2f} holdout F1 points (95% CI {lo:+.2f} to {hi:+.2f}, "
            f"{row['seeds']} seeds): {verdict}.")


def results_markdown(results: pd.DataFrame, reference: str = "baseline", header: str = "") -> str:
    summary, diffs = summarize(results, reference)

    def cell(method, metric):
        mean, std, n = summary.loc[method, (metric, "mean")], summary.loc[method, (metric, "std")], \
            summary.loc[method, (metric, "count")]
        return f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"

    lines = [header, "| method | seeds | selected after the attack started | test labels changed | valid best | "
             "holdout acc | holdout F1 (argmax) | holdout F1 (threshold) |", "|---|---|---|---|---|---|---|---|"]
    for method in summary.index:
        n = int(summary.loc[method, ("holdout_f1", "count")])
        seen = "n/a" if method == reference else f"{round(summary.loc[method, ('attack_seen', 'mean')] * n)}/{n}"
        rows = results[results["method"] == method]
        changed = "n/a" if method == reference or "labels_changed" not in results else \
            f"{100 * rows['labels_changed'].mean():.1f}% (min {100 * rows['labels_changed'].min():.1f}%)"
        lines.append(f"| {method} | {n} | {seen} | {changed} | {cell(method, 'valid_best')} | "
                     f"{cell(method, 'holdout_accuracy')} | {cell(method, 'holdout_f1_argmax')} | "
                     f"{cell(method, 'holdout_f1')} |")
    lines.append("\nmean ± standard deviation over seeds; accuracy and the last column at the run's threshold.")
    if len(diffs):
        lines += [f"\nPaired difference from {reference} (same seed, same split), in points:\n",
                  "| method | seeds | Δ holdout F1 (threshold) | 95% CI | Δ holdout F1 (argmax) | 95% CI | "
                  "Δ holdout acc | 95% CI |", "|---|---|---|---|---|---|---|---|"]
        metrics = ("holdout_f1", "holdout_f1_argmax", "holdout_accuracy")
        for _, r in diffs.iterrows():
            ci = {m: (f"{100 * r[m + '_lo']:+.2f} to {100 * r[m + '_hi']:+.2f}" if not math.isnan(r[m + "_lo"])
                      else "n/a") for m in metrics}
            lines.append(f"| {r['method']} | {r['seeds']} | " + " | ".join(
                f"{100 * r[m + '_diff']:+.2f} | {ci[m]}" for m in metrics) + " |")
        lines.append("")
        lines += [_verdict(r, reference) for _, r in diffs.iterrows()]
    return "\n".join(lines).strip() + "\n"


def plot_results(root: Path, results: pd.DataFrame) -> list[Path]:
    """valid_f1.png (validation F1 at every evaluation: mean line, min-max band over seeds) and
    holdout_f1.png (seeds and mean per method)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(results["method"]))
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in methods:
        runs = [json.loads((root / run / "metrics.json").read_text())["evaluations"]
                for run in results.loc[results["method"] == method, "run"]]
        width = min(map(len, runs))
        curves = np.array([[e["valid_f1"] for e in r[:width]] for r in runs])
        x = [e["epoch"] for e in runs[0][:width]]
        line, = ax.plot(x, curves.mean(0), marker="o", markersize=3, label=method)
        ax.fill_between(x, curves.min(0), curves.max(0), color=line.get_color(), alpha=0.15)
    ax.set(title="Validation F1 at each evaluation (mean over seeds, band: min-max)", xlabel="epoch",
           ylabel="validation F1")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths = [root / "valid_f1.png"]
    fig.savefig(paths[0])

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for x, method in enumerate(methods):
        scores = results.loc[results["method"] == method, "holdout_f1"].to_numpy()
        jitter = np.linspace(-0.08, 0.08, len(scores)) if len(scores) > 1 else np.zeros(1)
        ax.scatter(x + jitter, scores, alpha=0.7, label="seeds" if x == 0 else None, color="tab:blue")
        ax.hlines(scores.mean(), x - 0.25, x + 0.25, color="tab:red", linewidth=2, label="mean" if x == 0 else None)
    ax.set_xticks(range(len(methods)), methods)
    ax.set(title="Holdout F1 per method (points: seeds, bar: mean)", xlabel="method", ylabel="holdout F1")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    paths.append(root / "holdout_f1.png")
    fig.savefig(paths[1])
    return paths


def ensemble_submission(root: Path, runs: list[str], expected_ids, path: Path) -> dict:
    """Average the test probabilities of the runs and label at the mean of their thresholds; write one
    submission; report how often the runs disagree."""
    probs = [pd.read_csv(Path(root) / r / "test_probs.csv", dtype={"id": str}).set_index("id")["prob"] for r in runs]
    cuts = [json.loads((Path(root) / r / "metrics.json").read_text())["score"]["threshold"] for r in runs]
    mean = pd.concat(probs, axis=1).mean(axis=1).loc[list(expected_ids)]
    write_submission(path, mean.index, (mean.to_numpy() > np.mean(cuts)).astype(int), expected_ids)
    labels = np.array([(p.loc[list(expected_ids)].to_numpy() > c) for p, c in zip(probs, cuts)])
    disagree = [float((labels[i] != labels[j]).mean()) for i in range(len(runs)) for j in range(i + 1, len(runs))]
    return {"runs": runs, "submission": str(path), "threshold": float(np.mean(cuts)),
            "mean_pairwise_disagreement": float(np.mean(disagree)) if disagree else 0.0}


def compare(cfg: Config, methods, seeds, ensemble=None) -> pd.DataFrame:
    """Run every method x seed (the same split for all methods of one seed) into cfg.output_dir/<method>-seed<seed>/,
    then write results.csv, results.md and the plots from exactly those runs. A finished run is reused
    only if it was made with the same settings; otherwise compare stops and says which settings differ
    (pass --overwrite to run it again). ensemble: the methods whose test probabilities to average into
    ensemble_submission.csv."""
    methods, seeds = list(dict.fromkeys(methods)), list(dict.fromkeys(int(s) for s in seeds))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or not seeds:
        raise UserError(f"compare needs methods from {', '.join(METHODS)} and at least one seed "
                        f"(got methods={methods}, seeds={seeds}).")
    missing = [m for m in ensemble or [] if m not in methods]
    if missing:
        raise UserError(f"--ensemble names {', '.join(missing)}, which --methods does not run.")
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        for method in methods:
            out = root / run_dir_name(method, seed)
            wanted = dataclasses.replace(cfg, method=method, seed=seed, output_dir=str(out), overwrite=True)
            if (out / "metrics.json").is_file():
                row, recorded = result_row(out / "metrics.json")
                differ = _differing_settings(recorded, wanted)
                if not differ:
                    print(f"compare: {out} is finished with the same settings, not run again")
                    rows.append(row)
                    continue
                if not cfg.overwrite:
                    raise UserError(f"{out} was run with other settings ({', '.join(differ)}): pass --overwrite to "
                                    "run it again with these, or choose another --output-dir.")
            print(f"compare: {method} seed {seed} -> {out}")
            run(wanted)
            rows.append(result_row(out / "metrics.json")[0])
    results = with_changed_labels(root, pd.DataFrame(rows), "baseline" if "baseline" in methods else methods[0])
    atomic_write(root / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    shown = "/".join(Path(cfg.model).parts[-2:]) if Path(cfg.model).is_dir() else cfg.model  # no machine paths
    header = (f"# advtrain comparison\n\nmodel `{shown}`, "
              f"{cfg.epochs} epochs, batch {cfg.batch_size}, lr {cfg.lr}, attack from {cfg.adv_start}, "
              f"evaluation every {cfg.eval_every} epoch, threshold {cfg.threshold}, split {cfg.split}, "
              f"seeds {', '.join(map(str, seeds))}.\n")
    text = results_markdown(results, "baseline" if "baseline" in methods else methods[0], header)
    if ensemble:
        _, order = load_test(find_data_dir(cfg.data_dir, needs="test.csv"))
        runs = [run_dir_name(m, s) for m in ensemble for s in seeds]
        info = ensemble_submission(root, runs, order, root / "ensemble_submission.csv")
        text += (f"\nEnsemble of {', '.join(ensemble)} over {len(seeds)} seed(s) ({len(runs)} runs): "
                 f"ensemble_submission.csv; runs disagree on {100 * info['mean_pairwise_disagreement']:.1f}% "
                 "of test tweets on average.\n")
    atomic_write(root / "results.md", lambda tmp: Path(tmp).write_text(text))
    plot_results(root, results)
    print(text)
    return results


# ---------------------------------------------------------------------------------------------
# Demo: a synthetic competition and a tiny model, built offline (also the tests' fixtures)
# ---------------------------------------------------------------------------------------------

_DISASTER = ["{event} near {place}, {n} people evacuated", "Breaking: {event} hits {place} #{tag}",
             "{place} residents told to leave as the {event} spreads", "Emergency crews respond to {event} in {place}",
             "{n} dead after {event} in {place}, rescue under way", "Stay safe {place}, {event} warning until {day}"]
_CALM = ["Just had the best {food} in {place} lol", "This new {thing} is fire, totally {mood}",
         "Can't wait for {day} in {place} with {food}", "My {thing} exploded with notifications today haha",
         "{food} and a movie on {day}, {mood} as ever", "That {thing} review was a total {event} of a video"]
_SLOTS = {"event": ["wildfire", "earthquake", "flood", "hurricane", "tornado", "explosion", "landslide", "train crash"],
          "place": ["California", "Tokyo", "Nepal", "Texas", "Manila", "Ohio", "Lisbon", "Chile", "Kenya", "Quebec"],
          "tag": ["news", "breaking", "alert", "prayfor"], "n": ["2", "12", "40", "150", "300"],
          "day": ["Friday", "Saturday", "Sunday", "tonight"], "food": ["pizza", "tacos", "ramen", "pancakes"],
          "thing": ["phone", "album", "game", "jacket"], "mood": ["happy", "tired", "hyped", "lit"]}


def make_demo_data(folder, n_train: int = 1200, n_test: int = 300, seed: int = 0, noise: float = 0.05) -> Path:
    """train.csv, test.csv and sample_submission.csv in the competition's schema, from templates:
    disaster tweets and everyday ones that borrow disaster words, with `noise` of the labels flipped."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def tweet():
        label = rng.random() < 0.43
        slots = {k: rng.choice(v) for k, v in _SLOTS.items()}
        text = rng.choice(_DISASTER if label else _CALM).format(**slots)
        keyword = slots["event"].replace(" ", "%20") if label or rng.random() < 0.3 else ""
        return keyword, rng.choice(["", "", "USA", "Earth", "London"]), text, int(label ^ (rng.random() < noise))

    rows = [tweet() for _ in range(n_train + n_test)]
    frame = pd.DataFrame(rows, columns=["keyword", "location", "text", "target"])
    frame.insert(0, "id", rng.sample(range(3 * len(rows)), len(rows)))
    frame.iloc[:n_train].to_csv(folder / "train.csv", index=False)
    test = frame.iloc[n_train:].drop(columns="target")
    test.to_csv(folder / "test.csv", index=False)
    pd.DataFrame({"id": test["id"], "target": 0}).to_csv(folder / "sample_submission.csv", index=False)
    return folder


def make_tiny_model(folder, arch: str = "deberta-v2", texts=None, hidden: int = 32, layers: int = 2,
                    seed: int = 0) -> Path:
    """A randomly initialised encoder of the given architecture (deberta-v2, bert, roberta, electra)
    and a WordPiece tokenizer whose vocabulary is the words of `texts`, both written with
    save_pretrained so that loading them goes through from_pretrained like a real checkpoint.
    Deterministic: the same texts and seed give the same files."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    folder = Path(folder)
    texts = list(texts) if texts is not None else [t.format(**{k: v[0] for k, v in _SLOTS.items()})
                                                   for t in _DISASTER + _CALM]
    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    chars = sorted({c for w in words for c in w})
    frequent = [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:1000]]
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
                               + frequent))
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128)
    sizes = dict(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                 intermediate_size=2 * hidden, max_position_embeddings=128, pad_token_id=0)
    if arch == "deberta-v2":  # the deberta-v3 layout: relative attention only, no token types
        sizes.update(relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"], share_att_key=True,
                     position_biased_input=False, type_vocab_size=0, norm_rel_ebd="layer_norm", layer_norm_eps=1e-7)
    if arch == "electra":
        sizes.update(embedding_size=hidden)
    config = transformers.AutoConfig.for_model(arch, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModel.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def demo(output_dir: str = "submissions/demo", **overrides) -> dict:
    """The whole pipeline offline in about a minute on a CPU: synthetic tweets, a tiny DeBERTa-v2."""
    with tempfile.TemporaryDirectory(prefix="advtrain-demo-") as tmp:
        data = make_demo_data(Path(tmp, "data"))
        model = make_tiny_model(Path(tmp, "model"), "deberta-v2", pd.read_csv(data / "train.csv")["text"])
        settings = dict(model=str(model), data_dir=str(data), output_dir=output_dir, overwrite=True, epochs=3,
                        batch_size=16, lr=1e-3, holdout_size=200, valid_size=200, save_model=False)
        preset = PRESETS.get(overrides.get("preset", ""), {})  # a preset wins over the demo's own sizes
        return run(Config(**{**{k: v for k, v in settings.items() if k not in preset}, **overrides}))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_config_flags(parser: argparse.ArgumentParser, defaults: dict | None = None):
    """One flag per Config field. Flags default to 'not given', so a preset can fill what the user left out."""
    for f in dataclasses.fields(Config):
        default = (defaults or {}).get(f.name, f.default)
        kwargs = {"default": argparse.SUPPRESS, "help": f"{f.metadata['help']} (default: {default!r})"}
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[type(f.default).__name__]
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def config_to_argv(cfg: Config) -> list[str]:
    """The `train` flags that reproduce cfg (the inverse of config_from_args)."""
    argv = []
    for f in dataclasses.fields(Config):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return argv


def launch(cfg: Config, nproc: int) -> dict:
    """Run cfg data-parallel on nproc processes with torchrun (one per GPU; gloo on CPU), streaming
    rank 0's log, and return the run's metrics.json. What the notebooks call on Kaggle's two T4s."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "train", *config_to_argv(cfg)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
    if proc.returncode != 0:
        raise UserError(f"torchrun with {nproc} processes failed (exit code {proc.returncode}); the lines above "
                        f"say why (also in {Path(cfg.output_dir) / 'train.log'}).")
    return json.loads((Path(cfg.output_dir) / "metrics.json").read_text())


def config_from_args(args: argparse.Namespace, base: dict | None = None) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    given = {k: v for k, v in vars(args).items() if k in names}
    return Config(**{**(base or {}), **given})  # Config fills what is still at its default from the preset


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="advtrain.py", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"advtrain {__version__}")
    sub = parser.add_subparsers(dest="command")
    add_config_flags(sub.add_parser("train", help="fine-tune, evaluate and write a submission"))
    add_config_flags(sub.add_parser("demo", help="the whole pipeline offline on synthetic data and a tiny model"),
                     {"output_dir": "submissions/demo"})
    comp = sub.add_parser("compare", help="every method x seed, a table with intervals, plots, an ensemble")
    comp.add_argument("--methods", default="baseline,fgm,awp,sift", help="comma-separated (default: %(default)s)")
    comp.add_argument("--seeds", default="42,43,44", help="comma-separated (default: %(default)s)")
    comp.add_argument("--ensemble", default="", help="methods whose runs to average into ensemble_submission.csv")
    add_config_flags(comp, {"output_dir": "submissions/compare"})
    check = sub.add_parser("check-submission", help="validate a submission file against the test ids")
    check.add_argument("file")
    check.add_argument("--data-dir", default="", help="competition folder (default: as for train)")
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse reads `--lr -1e-3` as two flags; say how to write a negative number instead."""

    def error(self, message):
        if "expected one argument" in message:
            message += " (for a negative number write it as --flag=-1e-3)"
        super().error(message)


def _terminate(signum, frame):
    raise Interrupted(signum)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # SIGTERM (a Kaggle session ending) stops a run like Ctrl-C; only the main thread may set handlers
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:
        previous = None
    try:
        if args.command is None:  # what a Kaggle utility-script run does: show what this is, succeed
            print(f"advtrain {__version__} (torch {torch.__version__}, transformers {transformers.__version__}): "
                  "import advtrain in a notebook, or run a command:")
            parser.print_help()
        elif args.command == "train":
            run(config_from_args(args))
        elif args.command == "demo":
            demo(**{k: v for k, v in vars(args).items() if k != "command"})
        elif args.command == "compare":
            cfg = config_from_args(args, {"output_dir": "submissions/compare"})
            seeds = [s for s in args.seeds.split(",") if s]
            if not all(s.strip().lstrip("-").isdigit() for s in seeds):
                raise UserError(f"--seeds takes comma-separated integers, got {args.seeds!r}.")
            compare(cfg, [m for m in args.methods.split(",") if m], seeds,
                    [m for m in args.ensemble.split(",") if m] or None)
        elif args.command == "check-submission":
            _, order = load_test(find_data_dir(args.data_dir, needs="test.csv"))
            path = Path(args.file)
            check_submission(read_submission(path), order, str(path))
            print(f"{path}: OK ({len(order)} rows, each test id once, targets 0/1)")
    except UserError as e:
        print(f"advtrain: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system: permissions, a full disk, a folder where a file should be
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"advtrain: error: {e.strerror or e}{where}: check that the path exists and is writable, and "
              "that the disk has space.", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"advtrain: stopped by {signal.Signals(signum).name}; an interrupted run continues with --resume.",
              file=sys.stderr)
        return 128 + signum
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
