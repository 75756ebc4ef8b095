"""The Kaggle round trip behind the Makefile: data, notebooks, push, status, output, submit.

    python tools/kaggle_kit.py data | notebooks | push | status | output | submit METHOD [MSG] | submissions

Standard library only; it drives the official `kaggle` command-line tool (`pip install kaggle`).
The committed metadata says OWNER where the Kaggle user name goes: `push` writes a copy with your
user name (from KAGGLE_USERNAME, else the kaggle config) into build/kaggle/ and pushes that, so
nobody edits JSON by hand. Each failure is one line naming the fix, exit code 2.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPETITION = "nlp-getting-started"
PLACEHOLDER = "OWNER"
UTILITY = "advtrain"
METHODS = {
    "baseline": ("Baseline", "Plain fine-tuning, no attack: the reference every method is measured against."),
    "fgm": ("FGM", "Fast Gradient Method (Miyato et al. 2017): one extra forward/backward on word embeddings "
                   "shifted by eps * g / ||g||."),
    "pgd": ("PGD", "Projected Gradient Descent (Madry et al. 2018): K ascent steps on the embeddings, projected "
                   "into an eps-ball."),
    "freelb": ("FreeLB", "FreeLB (Zhu et al. 2020): K ascent steps whose parameter gradients are averaged "
                         "(\"free\" adversarial training)."),
    "awp": ("AWP", "Adversarial Weight Perturbation (Wu et al. 2020; Feedback Prize 2021 1st place): perturbs "
                   "the weights, not the inputs."),
    "sift": ("SiFT", "Scale-invariant fine-tuning (He et al. 2021, DeBERTa): perturbs normalised embeddings "
                     "with a symmetric-KL consistency loss."),
}
NOTEBOOKS = list(METHODS) + ["compare"]


class KitError(Exception):
    """One line for the user, naming the fix."""


# --------------------------------------------------------------------------------------------- notebooks


def slug(title: str) -> str:
    """Kaggle's slug of a title: lower case, runs of other characters become one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _cell(kind: str, text: str) -> dict:
    cell = {"cell_type": kind, "metadata": {}, "source": text.strip("\n").splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


IMPORT_CELL = '''
# Find the advtrain utility script (attach it with "Add input" > Notebooks > advtrain).
# Its path under /kaggle/usr/lib differs between Kaggle images, so search for it.
import os, sys
from pathlib import Path

roots = [os.environ.get("ADVTRAIN_LIB", "/kaggle/usr/lib"), "."]
found = next((p for r in roots if Path(r).is_dir() for p in sorted(Path(r).rglob("advtrain.py"))), None)
if found is None:
    raise FileNotFoundError("advtrain.py not found: attach the advtrain utility script to this notebook "
                            "(Add input > Notebooks), or put advtrain.py next to it.")
sys.path.insert(0, str(found.parent))
import advtrain
import pandas as pd
print("advtrain", advtrain.__version__, "from", found)
'''

RUN_CELL = '''
import torch

cfg = advtrain.env_overrides(cfg)  # ADVTRAIN_<FIELD> environment variables win (the offline tests use them)
if USE_ALL_GPUS and torch.cuda.device_count() > 1:
    metrics = advtrain.launch(cfg, torch.cuda.device_count())  # torchrun: one process per GPU (DDP)
else:
    metrics = advtrain.run(cfg)
print("score:", metrics["score"], "| train samples/s:", metrics["train_samples_per_s"])
pd.DataFrame(metrics["evaluations"])
'''

COMPARE_RUN_CELL = '''
cfg = advtrain.env_overrides(cfg)  # ADVTRAIN_<FIELD> environment variables win (the offline tests use them)
methods = os.environ.get("ADVTRAIN_METHODS", METHODS).split(",")
seeds = [int(s) for s in os.environ.get("ADVTRAIN_SEEDS", SEEDS).split(",")]
table = advtrain.compare(cfg, methods, seeds)
print(Path(cfg.output_dir, "results.md").read_text())
table
'''


def config_cell(method: str, multi_gpu: bool = True) -> str:
    switch = ("USE_ALL_GPUS = True  # Kaggle's two T4s: data-parallel; each GPU takes half of every batch, so "
              "one or two GPUs train the same model\n")
    return f'''
# The only cell to edit. Every field of advtrain.Config is listed in the README's config table.
cfg = advtrain.Config(
    method="{method}",
    model="microsoft/deberta-v3-xsmall",  # hub name, or the folder of an attached snapshot (internet off)
    output_dir="/kaggle/working",
    overwrite=True,
    preset="recipe",  # the measured settings (README); explicit settings here win
    epochs=3,
    batch_size=32,
    lr=3e-5,
)
''' + (switch if multi_gpu else "")


def notebook(name: str) -> dict:
    if name == "compare":
        cells = [
            _cell("markdown", "# advtrain: method comparison across seeds\n\nEvery method x seed on the same "
                              "split per seed; mean +- std, paired differences from the baseline with 95% "
                              "intervals, and plots. Results land in /kaggle/working."),
            _cell("code", IMPORT_CELL),
            _cell("code", config_cell("baseline", multi_gpu=False).replace("# The only cell to edit.",
                                                          "# The only cell to edit (with METHODS and SEEDS).")
                  + 'METHODS = "baseline,fgm,awp,sift"\nSEEDS = "42,43,44"\n'),
            _cell("code", COMPARE_RUN_CELL),
            _cell("code", 'from IPython.display import Image, display\nfor png in sorted(Path(cfg.output_dir)'
                          '.glob("*.png")):\n    display(Image(filename=str(png)))'),
        ]
    else:
        title, what = METHODS[name]
        cells = [
            _cell("markdown", f"# advtrain: {title} on Disaster Tweets\n\n{what}\n\nFine-tunes "
                              "`microsoft/deberta-v3-xsmall`, keeps the best epoch by validation F1, reports the "
                              "holdout score and writes `submission.csv`, `metrics.json` and `train.log` to "
                              "/kaggle/working."),
            _cell("code", IMPORT_CELL),
            _cell("code", config_cell(name)),
            _cell("code", RUN_CELL),
        ]
    for i, cell in enumerate(cells):
        cell["id"] = f"{name}-{i}"
    return {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}}}


def notebook_metadata(name: str) -> dict:
    title = f"advtrain {METHODS[name][0] if name in METHODS else 'compare'}"
    return {"id": f"{PLACEHOLDER}/{slug(title)}", "title": title, "code_file": f"{slug(title)}.ipynb",
            "language": "python", "kernel_type": "notebook", "is_private": True, "enable_gpu": True,
            "enable_tpu": False, "enable_internet": True, "machine_shape": "NvidiaTeslaT4", "keywords": [],
            "dataset_sources": [], "competition_sources": [COMPETITION],
            "kernel_sources": [f"{PLACEHOLDER}/{UTILITY}"], "model_sources": []}


def _dump(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def write_notebooks(root: Path = ROOT) -> list[Path]:
    """notebooks/<name>/ with the notebook and its kernel-metadata.json, from the templates above."""
    written = []
    for name in NOTEBOOKS:
        meta = notebook_metadata(name)
        folder = root / "notebooks" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / meta["code_file"]).write_text(_dump(notebook(name)))
        (folder / "kernel-metadata.json").write_text(_dump(meta))
        written.append(folder)
    return written


# --------------------------------------------------------------------------------------------- kaggle CLI


def kaggle(*args: str, capture: bool = False) -> str:
    if shutil.which("kaggle") is None:
        raise KitError("the kaggle command is not installed: pip install kaggle")
    done = subprocess.run(["kaggle", *args], capture_output=True, text=True)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise KitError(f"`kaggle {' '.join(args)}` failed: {detail[-1] if detail else 'exit ' + str(done.returncode)}")
    if not capture:
        print(done.stdout, end="")
    return done.stdout


def config_dir() -> Path:
    return Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))


def check_credentials():
    if os.environ.get("KAGGLE_API_TOKEN") or (config_dir() / "access_token").is_file():
        return
    if (config_dir() / "kaggle.json").is_file() or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        return
    raise KitError(f"no Kaggle credentials: create an API token (kaggle.com > Settings > API) and save it as "
                   f"{config_dir() / 'kaggle.json'}, or set KAGGLE_USERNAME and KAGGLE_KEY.")


def owner() -> str:
    """Your Kaggle user name: KAGGLE_USERNAME, else kaggle.json, else `kaggle config view`."""
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    path = config_dir() / "kaggle.json"
    if path.is_file():
        try:
            name = json.loads(path.read_text()).get("username")
        except ValueError:
            raise KitError(f"{path} is not valid JSON: download a new API token from kaggle.com > Settings.") from None
        if name:
            return name
    check_credentials()
    match = re.search(r"username:\s*(\S+)", kaggle("config", "view", capture=True))
    if not match or match.group(1) == "None":
        raise KitError("cannot tell your Kaggle user name: set KAGGLE_USERNAME.")
    return match.group(1)


def stage(folder: Path, user: str, build: Path) -> Path:
    """Copy a kernel folder into build/, with OWNER replaced by the user name and code_file beside it."""
    meta = json.loads((folder / "kernel-metadata.json").read_text())
    target = build / meta["id"].split("/")[1]
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(folder / meta["code_file"], target / Path(meta["code_file"]).name)
    meta["code_file"] = Path(meta["code_file"]).name
    meta["id"] = meta["id"].replace(PLACEHOLDER, user, 1)
    meta["kernel_sources"] = [k.replace(PLACEHOLDER, user, 1) for k in meta.get("kernel_sources", [])]
    (target / "kernel-metadata.json").write_text(_dump(meta))
    return target


def kernel_id(folder: Path, user: str) -> str:
    return json.loads((folder / "kernel-metadata.json").read_text())["id"].replace(PLACEHOLDER, user, 1)


def status_of(kernel: str) -> str:
    out = kaggle("kernels", "status", kernel, capture=True)
    match = re.search(r"(COMPLETE|QUEUED|RUNNING|ERROR|CANCEL\w*|NEW_SCRIPT)", out, re.IGNORECASE)
    return match.group(1).upper() if match else out.strip()


def wait_until_complete(kernel: str, poll: float, timeout: float) -> None:
    start = time.monotonic()
    while True:
        state = status_of(kernel)
        print(f"{kernel}: {state}", flush=True)
        if state == "COMPLETE":
            return
        if state.startswith(("ERROR", "CANCEL")):
            raise KitError(f"the run of {kernel} ended with {state}: read its log at "
                           f"https://www.kaggle.com/code/{kernel} and push again.")
        if time.monotonic() - start > timeout:
            raise KitError(f"{kernel} was not COMPLETE after {timeout:.0f} s: check `make status`, then push the "
                           "notebooks with `make push` again.")
        time.sleep(poll)


# --------------------------------------------------------------------------------------------- commands


def cmd_data(data: Path = ROOT / "data") -> None:
    if (data / "train.csv").is_file() and (data / "test.csv").is_file():
        print(f"{data} already holds the competition files")
        return
    check_credentials()
    data.mkdir(exist_ok=True)
    kaggle("competitions", "download", COMPETITION, "-p", str(data))
    archive = data / f"{COMPETITION}.zip"
    if not archive.is_file():
        raise KitError(f"{archive} was not downloaded: accept the competition's rules at "
                       f"https://www.kaggle.com/c/{COMPETITION}/rules, then run make data again.")
    with zipfile.ZipFile(archive) as z:
        z.extractall(data)
    archive.unlink()
    print(f"unpacked {', '.join(sorted(p.name for p in data.glob('*.csv')))} into {data}")


def cmd_push(poll: float, timeout: float) -> None:
    check_credentials()
    user = owner()
    build = ROOT / "build" / "kaggle"
    shutil.rmtree(build, ignore_errors=True)
    utility = stage(ROOT, user, build)
    kaggle("kernels", "push", "-p", str(utility))
    wait_until_complete(f"{user}/{UTILITY}", poll, timeout)
    for name in NOTEBOOKS:
        kaggle("kernels", "push", "-p", str(stage(ROOT / "notebooks" / name, user, build)))


def cmd_status() -> None:
    check_credentials()
    user = owner()
    for kernel in [f"{user}/{UTILITY}"] + [kernel_id(ROOT / "notebooks" / n, user) for n in NOTEBOOKS]:
        print(f"{kernel}: {status_of(kernel)}")


def cmd_output() -> None:
    check_credentials()
    user = owner()
    for name in NOTEBOOKS:
        kernel = kernel_id(ROOT / "notebooks" / name, user)
        state = status_of(kernel)
        if state != "COMPLETE":
            print(f"{kernel}: {state}, nothing to fetch yet")
            continue
        target = ROOT / "submissions" / name
        target.mkdir(parents=True, exist_ok=True)
        kaggle("kernels", "output", kernel, "-p", str(target))


def cmd_submit(method: str, message: str) -> None:
    if method not in METHODS:
        raise KitError(f"unknown METHOD={method or '(empty)'}: use one of {', '.join(METHODS)}, "
                       "e.g. make submit METHOD=awp")
    path = ROOT / "submissions" / method / "submission.csv"
    if not path.is_file():
        raise KitError(f"{path.relative_to(ROOT)} not found: run `make train METHOD={method}` or fetch the "
                       "kernel outputs with `make output`.")
    check_credentials()
    checked = subprocess.run([sys.executable, str(ROOT / "advtrain.py"), "check-submission", str(path)],
                             capture_output=True, text=True, cwd=ROOT)
    if checked.returncode != 0:
        raise KitError(f"not submitted, {path.relative_to(ROOT)} fails the check: "
                       f"{checked.stderr.strip().removeprefix('advtrain: error: ')}")
    kaggle("competitions", "submit", COMPETITION, "-f", str(path), "-m", message or f"advtrain {method}")


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    poll = float(os.environ.get("KAGGLE_POLL_SECONDS", "20"))
    timeout = float(os.environ.get("KAGGLE_WAIT_SECONDS", "1800"))
    try:
        if command == "notebooks":
            for folder in write_notebooks():
                print(f"wrote {folder.relative_to(ROOT)}")
        elif command == "data":
            cmd_data()
        elif command == "push":
            cmd_push(poll, timeout)
        elif command == "status":
            cmd_status()
        elif command == "output":
            cmd_output()
        elif command == "submit":
            cmd_submit(rest[0] if rest else "", rest[1] if len(rest) > 1 else "")
        elif command == "submissions":
            check_credentials()
            kaggle("competitions", "submissions", COMPETITION)
        else:
            print(__doc__)
            return 0 if command in ("", "-h", "--help") else 2
    except KitError as e:
        print(f"kaggle_kit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
