"""The Kaggle round trip behind the Makefile: data, notebooks, push, status, output, submit.

    python tools/kaggle_kit.py data | notebooks | push | status | output | submit | submissions

Standard library only; it drives the official `kaggle` command-line tool, which `make setup` installs
into .venv: kaggle 2.2.x, whose real CLI the tests drive against a stand-in Kaggle API. Another CLI can
be named with KAGGLE_BIN; the status lines of 1.6 and 1.7 are read too, but kaggle before 1.8 ignores
machine_shape, so "GPU T4 x2" is not guaranteed there.
Settings come from the environment, as make passes them: METHODS (a subset of the notebooks),
GPU_SESSIONS (Kaggle's cap on concurrent GPU sessions, 2), FORCE, METHOD, FILE, MSG.
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
import tempfile
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

GPU_SESSIONS = 2  # Kaggle runs at most this many GPU batch sessions per account at once
WANTED = ("submission.csv", "metrics.json", "train.log", "results.md", "results.csv", "valid.png",
          "score.png", "ensemble_submission.csv")  # what `make output` keeps of /kaggle/working
FINISHED = ("COMPLETE", "ERROR", "CANCEL_ACKNOWLEDGED", "CANCEL_REQUESTED")


def kaggle_executable() -> str:
    """The kaggle CLI: KAGGLE_BIN, else the one beside this Python (the project's .venv), else PATH."""
    for candidate in (os.environ.get("KAGGLE_BIN"), str(Path(sys.executable).parent / "kaggle"),
                      shutil.which("kaggle")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise KitError("the kaggle CLI is not installed: run `make setup` (it installs kaggle into .venv), or "
                   "pip install 'kaggle>=2.2' six")


def explain(args: tuple[str, ...], output: str) -> str:
    """Kaggle's whole answer as one sentence with the fix, for the failures users meet."""
    lines = [line.strip() for line in output.splitlines() if line.strip()
             and not re.search(r"warning|warnings\.warn|^\s*from |^\s*import ", line, re.IGNORECASE)]
    text = " ".join(lines)
    low = text.lower()
    what = " ".join(args[:2])
    if re.search(r"authentication required|401|unauthorized|could not find kaggle\.json", low):
        return (f"Kaggle did not accept your credentials for `kaggle {what}`: create a token at "
                "https://www.kaggle.com/settings/api and save it as ~/.kaggle/access_token (or ~/.kaggle/kaggle.json "
                "for an old-style key), set KAGGLE_API_TOKEN, or run `kaggle auth login`.")
    if "403" in text or "forbidden" in low:
        return (f"Kaggle refused `kaggle {what}` (403): accept the competition's rules at "
                f"https://www.kaggle.com/c/{COMPETITION}/rules, and for GPU kernels verify your phone number.")
    if "404" in text or "not found" in low:
        return (f"Kaggle found nothing for `kaggle {' '.join(args)}` (404): check the name; kernels exist once "
                "`make push` has pushed them.")
    if re.search(r"connection|name or service not known|max retries|timed out|network", low):
        return f"no connection to Kaggle for `kaggle {what}`: check the network (or a proxy), then try again."
    if "modulenotfounderror" in low or "no module named" in low:
        return (f"the kaggle CLI is broken ({text[:200]}): reinstall it with `make setup`, or "
                "pip install 'kaggle>=2.2' six")
    return f"`kaggle {' '.join(args)}` failed: {text[:600] or 'no output'}"


def kaggle(*args: str, capture: bool = False) -> str:
    """Run the kaggle CLI; any failure, including one it reports with exit code 0, is a KitError."""
    done = subprocess.run([kaggle_executable(), *args], capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0 or "Authentication required" in output:
        raise KitError(explain(args, output))
    if not capture:
        print(done.stdout, end="")
    return done.stdout


def config_dir() -> Path:
    """Where the CLI keeps its credentials: KAGGLE_CONFIG_DIR, ~/.kaggle, else ~/.config/kaggle."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    home = Path.home() / ".kaggle"
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    return home if home.exists() or not xdg.exists() else xdg


def owner() -> str:
    """Your Kaggle user name: KAGGLE_USERNAME, else kaggle.json, else the CLI's own `kaggle config view`
    (which knows every form of credentials it accepts)."""
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
    match = re.search(r"username:\s*(\S+)", kaggle("config", "view", capture=True))
    if not match or match.group(1) == "None":
        raise KitError("cannot tell your Kaggle user name: set KAGGLE_USERNAME (your kaggle.com name).")
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


def url(kernel: str) -> str:
    return f"https://www.kaggle.com/code/{kernel}"


def parse_status(text: str) -> str:
    """The status field of `kaggle kernels status`: `has status "KernelWorkerStatus.COMPLETE"` (1.7 and
    later) or `has status "complete"` / "cancelAcknowledged" (1.6), as COMPLETE / CANCEL_ACKNOWLEDGED."""
    match = re.search(r'has status "([^"]*)"', text)
    if not match:
        raise KitError(f"unexpected answer from `kaggle kernels status`: {text.strip()[:300]}")
    value = match.group(1).rsplit(".", 1)[-1]
    return re.sub(r"(?<=[a-z])(?=[A-Z])", "_", value).upper()


def status_of(kernel: str) -> str:
    return parse_status(kaggle("kernels", "status", kernel, capture=True))


def push(folder: Path) -> None:
    """kaggle kernels push, which reports a refusal on stdout with exit code 0: stop on it with Kaggle's reason."""
    out = kaggle("kernels", "push", "-p", str(folder), capture=True)
    refused = re.search(r"Kernel push error:\s*(.*)", out)
    if refused or "successfully pushed" not in out.lower() and "kernel version" not in out.lower():
        reason = refused.group(1).strip() if refused else out.strip()[:300]
        fix = ("wait until your running GPU sessions finish (make status), then push again" if "GPU session" in reason
               else "fix kernel-metadata.json or your account (phone verification), then push again")
        raise KitError(f"Kaggle refused to push {folder.name}: {reason} ({fix}).")
    print(out.strip().splitlines()[-1])


def wait_until_finished(kernels: list[str], poll: float, timeout: float) -> dict[str, str]:
    """Poll until every kernel is COMPLETE, ERROR or cancelled; returns their final states."""
    start, states = time.monotonic(), {}
    while True:
        for kernel in kernels:
            if states.get(kernel) not in FINISHED:
                states[kernel] = status_of(kernel)
                print(f"{kernel}: {states[kernel]}", flush=True)
        if all(state in FINISHED for state in states.values()):
            return states
        if time.monotonic() - start > timeout:
            raise KitError(f"{', '.join(k for k in kernels if states[k] not in FINISHED)} not finished after "
                           f"{timeout:.0f} s: check `make status`, then `make push` the rest.")
        time.sleep(poll)


def failed_log(kernel: str, lines: int = 15) -> str:
    """The last lines of a kernel's log (kaggle kernels output also fetches <slug>.log)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            kaggle("kernels", "output", kernel, "-p", tmp, capture=True)
        except KitError as e:
            return f"(no log: {e})"
        logs = sorted(Path(tmp).glob("*.log"))
        if not logs:
            return "(no log)"
        text = logs[0].read_text(errors="replace")
        try:  # Kaggle's log is a JSON list of {"data": ...} records
            text = "".join(record.get("data", "") for record in json.loads(text))
        except (ValueError, AttributeError):
            pass
        return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def selected(methods: str) -> list[str]:
    names = [m for m in methods.split(",") if m] if methods else NOTEBOOKS
    unknown = [m for m in names if m not in NOTEBOOKS]
    if unknown:
        raise KitError(f"unknown METHODS={methods}: use names from {', '.join(NOTEBOOKS)}, e.g. METHODS=fgm,awp")
    return names


# --------------------------------------------------------------------------------------------- commands


def cmd_data(data: Path = ROOT / "data") -> None:
    if (data / "train.csv").is_file() and (data / "test.csv").is_file():
        print(f"{data} already holds the competition files")
        return
    data.mkdir(exist_ok=True)
    kaggle("competitions", "download", COMPETITION, "-p", str(data))
    archive = data / f"{COMPETITION}.zip"
    if not archive.is_file():
        raise KitError(f"{archive} was not downloaded: accept the competition's rules at "
                       f"https://www.kaggle.com/c/{COMPETITION}/rules, then run make data again.")
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(data)
    except zipfile.BadZipFile:
        archive.unlink()
        raise KitError(f"{archive} was not a complete zip file (removed): run make data again.") from None
    archive.unlink()
    print(f"unpacked {', '.join(sorted(p.name for p in data.glob('*.csv')))} into {data}")


def cmd_push(methods: str, poll: float, timeout: float, sessions: int) -> None:
    names = selected(methods)
    user = owner()
    build = ROOT / "build" / "kaggle"
    shutil.rmtree(build, ignore_errors=True)
    push(stage(ROOT, user, build))
    utility = f"{user}/{UTILITY}"
    if wait_until_finished([utility], poll, timeout)[utility] != "COMPLETE":
        raise KitError(f"the run of {utility} did not complete: read its log at {url(utility)} and push again.\n"
                       + failed_log(utility))
    states = {}
    for start in range(0, len(names), sessions):  # waves: Kaggle runs at most `sessions` GPU sessions at once
        wave = names[start:start + sessions]
        for name in wave:
            push(stage(ROOT / "notebooks" / name, user, build))
        states.update(wait_until_finished([kernel_id(ROOT / "notebooks" / n, user) for n in wave], poll, timeout))
    print(table(states))


def table(states: dict[str, str]) -> str:
    rows = [f"{kernel:<40} {state:<20} {url(kernel)}" for kernel, state in states.items()]
    return "\n".join([f"{'kernel':<40} {'status':<20} url", *rows])


def cmd_status(methods: str) -> bool:
    """Every kernel's state; for a failed one, the end of its log. Returns whether all were readable and none failed."""
    user, ok = owner(), True
    utility = f"{user}/{UTILITY}"
    states = {utility: status_of(utility)}  # credentials and network fail here, once
    for kernel in [kernel_id(ROOT / "notebooks" / n, user) for n in selected(methods)]:
        try:
            states[kernel] = status_of(kernel)
        except KitError as e:
            states[kernel], ok = f"unknown ({e})", False
    print(table({k: v.split(" (")[0] for k, v in states.items()}))
    for kernel, state in states.items():
        if state.startswith("unknown"):
            print(f"{kernel}: {state}")
        elif state == "ERROR":
            ok = False
            print(f"{kernel} failed; the end of its log:\n{failed_log(kernel)}")
    return ok


def cmd_output(methods: str, force: bool) -> bool:
    """The files a user needs from each finished kernel into submissions/kaggle/<name>/ (never mixed with
    local runs); an earlier download is replaced only with FORCE=1."""
    user, ok = owner(), True
    version = re.search(r"(\d+)\.\d+", kaggle("--version", capture=True))
    pattern = ["--file-pattern", "|".join(re.escape(w) for w in WANTED)] if version and int(version.group(1)) >= 2 \
        else []
    for name in selected(methods):
        kernel = kernel_id(ROOT / "notebooks" / name, user)
        target = ROOT / "submissions" / "kaggle" / name
        try:
            state = status_of(kernel)
            if state != "COMPLETE":
                print(f"{kernel}: {state}, nothing to fetch" + (f"; the end of its log:\n{failed_log(kernel)}"
                                                                 if state == "ERROR" else ""))
                ok = ok and state != "ERROR"
                continue
            if target.is_dir() and any(target.iterdir()) and not force:
                print(f"{kernel}: {target.relative_to(ROOT)} holds an earlier download: make output FORCE=1 "
                      "replaces it")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                kaggle("kernels", "output", kernel, "-p", tmp, *pattern, capture=True)
                found = {p.name: p for p in sorted(Path(tmp).rglob("*")) if p.is_file() and p.name in WANTED}
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                for file_name, path in found.items():
                    shutil.copy2(path, target / file_name)
            print(f"{kernel}: {', '.join(found) or 'no files'} -> {target.relative_to(ROOT)}")
        except KitError as e:
            ok = False
            print(f"{kernel}: {e}")
    return ok


def submission_file(method: str, file: str) -> Path:
    """FILE if given; else the method's local run, else its Kaggle download (METHOD=ensemble: compare's ensemble)."""
    if file:
        path = Path(file)
        if not path.is_file():
            raise KitError(f"FILE={file} not found.")
        return path
    if method not in list(METHODS) + ["ensemble"]:
        raise KitError(f"unknown METHOD={method or '(empty)'}: use one of {', '.join(METHODS)} or ensemble, "
                       "e.g. make submit METHOD=awp, or make submit FILE=path/to/submission.csv")
    name, folder = ("ensemble_submission.csv", "compare") if method == "ensemble" else ("submission.csv", method)
    for path in (ROOT / "submissions" / folder / name, ROOT / "submissions" / "kaggle" / folder / name):
        if path.is_file():
            return path
    make = ("`make compare ARGS=\"--ensemble fgm,awp\"`" if method == "ensemble"
            else f"`make train METHOD={method}`")
    raise KitError(f"no {name} for METHOD={method} in submissions/{folder}/ or submissions/kaggle/{folder}/: run "
                   f"{make}, or fetch the kernel outputs with `make output`.")


def cmd_submit(method: str, file: str, message: str) -> None:
    path = submission_file(method, file)
    checked = subprocess.run([sys.executable, str(ROOT / "advtrain.py"), "check-submission", str(path)],
                             capture_output=True, text=True, cwd=ROOT)
    if checked.returncode != 0:
        raise KitError(f"not submitted, {path} fails the check: "
                       f"{checked.stderr.strip().removeprefix('advtrain: error: ')}")
    kaggle("competitions", "submit", COMPETITION, "-f", str(path), "-m", message or f"advtrain {method or path.name}")


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    def env(name, default=""):  # make exports an unset variable as empty
        return os.environ.get(name) or default

    poll, timeout = float(env("KAGGLE_POLL_SECONDS", "20")), float(env("KAGGLE_WAIT_SECONDS", "3600"))
    methods = env("METHODS", "") if env("METHODS_FROM", "") == "command line" else ""
    try:
        ok = True
        if command == "notebooks":
            for folder in write_notebooks():
                print(f"wrote {folder.relative_to(ROOT)}")
        elif command == "data":
            cmd_data()
        elif command == "push":
            sessions = env("GPU_SESSIONS", str(GPU_SESSIONS))
            if not sessions.isdigit() or int(sessions) < 1:
                raise KitError(f"GPU_SESSIONS={sessions}: a whole number of concurrent GPU sessions, 2 on Kaggle.")
            cmd_push(methods, poll, timeout, int(sessions))
        elif command == "status":
            ok = cmd_status(methods)
        elif command == "output":
            ok = cmd_output(methods, env("FORCE", "") not in ("", "0"))
        elif command == "submit-check":  # before make builds .venv: a bad METHOD or FILE costs nothing
            submission_file(env("METHOD", ""), env("FILE", ""))
        elif command == "submit":
            cmd_submit(env("METHOD", ""), env("FILE", ""), env("SUBMIT_MESSAGE", env("MSG", "")))
        elif command == "submissions":
            kaggle("competitions", "submissions", COMPETITION)
        else:
            print(__doc__)
            return 0 if command in ("", "-h", "--help") else 2
    except KitError as e:
        print(f"kaggle_kit: error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
