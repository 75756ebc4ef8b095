"""advtrain's speed benchmark: training and prediction speed of every method, and of the 2022
article's setup, side by side in one process, as a table (bench.md, bench.json).

    python tools/bench.py --model <folder or hub name> [--steps 30 --rounds 3]
    python tools/bench.py --quick        # a tiny model, seconds: checks that the bench runs
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from advtrain import (DISASTER_TWEETS, METHODS, Classifier, Collator, Config, UserError, atomic_write, build_optimizer,  # noqa: E402
                      build_scheduler, compile_blocks, describe_device, load_competition,
                      load_tokenizer, make_attack, make_demo_data, make_loader, make_tiny_model, micro_step,
                      model_max_len, optimizer_step, predict_proba, resolve_amp, resolve_device,
                      resolve_model, shown_model, tokenize, versions, write_json, write_submission)


# microsoft/deberta-v3-xsmall's config.json, so that its architecture can be timed without a download.
DEBERTA_V3_XSMALL = dict(
    model_type="deberta-v2", hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
    vocab_size=128100, max_position_embeddings=512, relative_attention=True, position_buckets=256,
    norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"], layer_norm_eps=1e-7,
    max_relative_positions=-1, position_biased_input=False, type_vocab_size=0, hidden_act="gelu",
    hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, pad_token_id=0)


def bench_texts(data_dir: str = ""):
    """(training texts, test texts, where they came from): the competition's if present, else synthetic."""
    try:
        data = load_competition(Config(data_dir=data_dir))
        return data["train"]["text"].tolist(), data["test"]["text"].tolist(), "competition files"
    except UserError:
        folder = make_demo_data(Path(tempfile.mkdtemp(prefix="advtrain-bench-")), n_train=4613, n_test=3263)
        return (pd.read_csv(folder / "train.csv")["text"].tolist(), pd.read_csv(folder / "test.csv")["text"].tolist(),
                "synthetic tweets")


def bench_model(name: str, texts, workdir: Path):
    """(classifier, tokenizer, description). 'deberta-v3-xsmall' is that architecture with random weights
    and a WordPiece tokenizer built on the texts; 'tiny' a 2-layer DeBERTa-v2; anything else is loaded."""
    if name in ("tiny", "deberta-v3-xsmall"):
        folder = make_tiny_model(workdir / "model", "deberta-v2", texts)
        tokenizer = load_tokenizer(str(folder))
        if name == "tiny":
            return Classifier.from_pretrained(str(folder)), tokenizer, "tiny DeBERTa-v2 (2 layers, hidden 32)"
        config = transformers.AutoConfig.for_model(**DEBERTA_V3_XSMALL)
        backbone = transformers.AutoModel.from_config(config)
        return Classifier(backbone), tokenizer, "deberta-v3-xsmall architecture, random weights"
    path = resolve_model(name)  # a local folder is named by its last parts, never by the machine's full path
    short = shown_model(name)
    return Classifier.from_pretrained(path), load_tokenizer(path), short


def _memory_probe(device):
    """(reset, read): peak memory of what runs between them. GPU: torch.cuda.max_memory_allocated;
    CPU: the process's peak resident set (Linux: reset through /proc/self/clear_refs)."""
    if device.type == "cuda":
        def reset():
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.memory_allocated(device)

        return reset, lambda: torch.cuda.max_memory_allocated(device)

    def rss(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    def reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return rss("VmRSS:")

    if not Path("/proc/self/clear_refs").exists():
        return None
    return reset, lambda: rss("VmHWM:")


def bench(model: str = "deberta-v3-xsmall", steps: int = 30, warmup: int = 5, rounds: int = 3, batch_size: int = 32,
          methods=METHODS, data_dir: str = "", device: str = "auto", output_dir: str = "submissions/bench",
          compile: bool = False) -> dict:
    """Time every method's training step, the article's setup ('article setup') and the submission path,
    alternating the rows round by round so that drift hits them alike; print and save a markdown table."""
    dev = resolve_device(device)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_texts, test_texts, source = bench_texts(data_dir)
    with tempfile.TemporaryDirectory(prefix="advtrain-bench-") as tmp:
        base, tokenizer, described = bench_model(model, train_texts, Path(tmp))
    limit = model_max_len(tokenizer, base.backbone.config)
    train_ids = tokenize(tokenizer, train_texts, limit)
    test_ids = tokenize(tokenizer, test_texts, limit)
    longest = max(map(len, train_ids))
    labels = np.arange(len(train_ids)) % 2
    pad_id = tokenizer.pad_token_id or 0

    kit = dict(batch_size=batch_size, compile=compile)
    article = dict(batch_size=8, pad_to_max=True, max_len=longest, amp="off", fused_adamw=False,
                      group_by_length=False)
    rows = [("article setup", Config(method="baseline", **article)),
            ("kit, batch 8", Config(method="baseline", batch_size=8, compile=compile))]
    rows += [(f"kit {m}", Config(method=m, **kit)) for m in ["baseline"] + [m for m in methods if m != "baseline"]]
    state = []
    for name, cfg in rows:
        transformers.set_seed(0)
        model_copy = copy.deepcopy(base).to(dev)
        optimizer = build_optimizer(model_copy, cfg, dev)
        scheduler = build_scheduler(optimizer, "constant", 0, 1)
        row_amp = resolve_amp(cfg.amp, dev)
        collator = Collator(pad_id, longest if cfg.pad_to_max else None)
        loader = make_loader(train_ids, labels, batch_size=cfg.batch_size, shuffle=True, collator=collator,
                             group_by_length=cfg.group_by_length, pin=dev.type == "cuda")
        state.append(dict(name=name, cfg=cfg, model=model_copy, forward=compile_blocks(model_copy, cfg.compile),
                          optimizer=optimizer, scheduler=scheduler, amp=row_amp,
                          scaler=torch.amp.GradScaler(dev.type) if row_amp == torch.float16 else None,
                          attack=make_attack(cfg, model_copy),
                          batches=itertools.cycle(loader), seconds=0.0, samples=0, steps=0, peak=0))

    def run_steps(s, n):
        s["model"].train()
        loss = None
        for _ in range(n):
            batch, y = next(s["batches"])
            loss = micro_step(s["attack"], s["forward"], batch, y, dev, s["amp"], s["scaler"])
            optimizer_step(s["model"], s["optimizer"], s["scheduler"], s["scaler"], s["cfg"].max_grad_norm)
            s["samples"] += len(y)
        return loss.item()  # waits for the device

    probe = _memory_probe(dev)
    for s in state:
        run_steps(s, warmup)
        s["samples"] = 0
    for r in range(rounds):
        for s in tqdm(state, desc=f"bench round {r + 1}/{rounds}", leave=False):
            before = probe[0]() if probe else 0
            start = time.perf_counter()
            run_steps(s, steps)
            s["seconds"] += time.perf_counter() - start
            s["steps"] += steps
            if probe:
                resident = sum(p.numel() * p.element_size() for p in s["model"].parameters())
                resident += sum(t.numel() * t.element_size() for st in s["optimizer"].state.values()
                                for t in st.values() if torch.is_tensor(t))
                s["peak"] = max(s["peak"], probe[1]() - before + resident)

    predictor = state[2]
    start = time.perf_counter()
    probs = predict_proba(predictor["model"], test_ids, 128, pad_id, dev, predictor["amp"])
    predict_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ids = np.arange(len(test_ids))
    with tempfile.TemporaryDirectory() as tmp:
        predict_proba(predictor["model"], test_ids, 128, pad_id, dev, predictor["amp"])
        write_submission(Path(tmp) / "submission.csv", DISASTER_TWEETS, ids.astype(str), probs, "id",
                         {"target": "target"})
    submission_seconds = time.perf_counter() - start

    kit_base = state[2]  # "kit baseline": every attack's step is compared with it
    table = []
    for s in state:
        step_ms = 1000 * s["seconds"] / s["steps"]
        table.append({"row": s["name"], "batch": s["cfg"].batch_size,
                      "amp": str(s["amp"]).replace("torch.", "") if s["amp"] else "fp32",
                      "samples_per_s": round(s["samples"] / s["seconds"], 1), "step_ms": round(step_ms, 2),
                      "step_vs_kit_baseline": round(step_ms / (1000 * kit_base["seconds"] / kit_base["steps"]), 2),
                      "speedup_vs_article_setup": round(s["samples"] / s["seconds"]
                                                     / (state[0]["samples"] / state[0]["seconds"]), 2),
                      "peak_memory_mb": round(s["peak"] / 2 ** 20, 1) if probe else None})
    result = {"device": describe_device(dev), "model": described, "texts": source, "train_rows": len(train_ids),
              "longest_train_text": longest, "steps_per_row": steps * rounds, "rounds": rounds,
              "versions": versions(), "rows": table,
              "predict_samples_per_s": round(len(test_ids) / predict_seconds, 1),
              "submission_seconds": round(submission_seconds, 3), "test_rows": len(test_ids)}
    text = bench_markdown(result)
    atomic_write(out / "bench.md", lambda tmp: Path(tmp).write_text(text))
    write_json(out / "bench.json", result)
    print(text)
    return result


def bench_markdown(result: dict) -> str:
    v = result["versions"]
    lines = [f"# advtrain bench\n\ndevice {result['device']} | model {result['model']} | {result['texts']} "
             f"({result['train_rows']} training texts, longest {result['longest_train_text']} tokens) | "
             f"{result['steps_per_row']} timed steps per row in {result['rounds']} alternating rounds | "
             f"torch {v['torch']}, transformers {v['transformers']}\n",
             "| row | batch | dtype | samples/s | step ms | step / kit baseline | speed-up vs article setup "
             "| peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['batch']} | {r['amp']} | {r['samples_per_s']:.1f} | {r['step_ms']:.1f} | "
                     f"{r['step_vs_kit_baseline']:.2f}x | {r['speedup_vs_article_setup']:.2f}x | "
                     f"{r['peak_memory_mb'] if r['peak_memory_mb'] is not None else 'n/a'} |")
    lines.append(f"\nPrediction (the submission path): {result['predict_samples_per_s']:.0f} samples/s; predicting and "
                 f"writing a {result['test_rows']}-row submission took {result['submission_seconds']:.2f} s.\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    b = argparse.ArgumentParser(prog="tools/bench.py",
                                description="training and prediction speed of every method, and of the article's setup")
    b.add_argument("--model", default="deberta-v3-xsmall",
                   help="hub name or folder; 'deberta-v3-xsmall' = that architecture with random weights, no "
                        "download; 'tiny' = a 2-layer model (default: %(default)s)")
    b.add_argument("--steps", type=int, default=30, help="timed steps per row and round (default: %(default)s)")
    b.add_argument("--rounds", type=int, default=3, help="alternating rounds (default: %(default)s)")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps per row first (default: %(default)s)")
    b.add_argument("--batch-size", type=int, default=32, help="the kit rows' batch (default: %(default)s)")
    b.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    b.add_argument("--data-dir", default="", help="competition folder for real texts (default: as for train)")
    b.add_argument("--device", default="auto")
    b.add_argument("--output-dir", default="submissions/bench")
    b.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the kit rows")
    b.add_argument("--quick", action="store_true", help="tiny model, 2 steps, 1 round: seconds (CI)")
    args = b.parse_args(argv)
    try:
        for flag in ("steps", "rounds", "warmup", "batch_size"):
            if getattr(args, flag) < 1:
                raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}.")
        methods = [m for m in args.methods.split(",") if m]
        if any(m not in METHODS for m in methods):
            raise UserError(f"--methods takes names from {', '.join(METHODS)}, got {args.methods!r}.")
        quick = dict(model="tiny", steps=2, rounds=1, warmup=1) if args.quick else {}
        bench(**{**dict(model=args.model, steps=args.steps, rounds=args.rounds, warmup=args.warmup,
                        batch_size=args.batch_size, methods=methods, data_dir=args.data_dir, device=args.device,
                        output_dir=args.output_dir, compile=args.compile), **quick})
    except UserError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
