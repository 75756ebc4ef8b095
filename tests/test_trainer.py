"""advtrain attacks inside transformers.Trainer, checked against advtrain's own loop."""
import copy
import subprocess
import sys

import pytest
import torch

import advtrain
from conftest import ATTACKS, ROOT, TEXTS, without_dropout
from test_attacks import no_hooks_left

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SETTINGS = {"baseline": {}, "fgm": dict(eps=0.1), "pgd": dict(eps=0.1, alpha=0.05, steps=2),
            "freelb": dict(steps=2, lr=0.05, init_mag=0.0), "awp": dict(adv_lr=1.0, adv_eps=0.01),
            "sift": dict(init=0.0)}


def attack_for(method, model):
    if method == "baseline":
        return None
    return ATTACKS[method](model, **SETTINGS[method])


def dataset(tok, n=8):
    texts = (TEXTS + ["Earthquake in Nepal", "Tacos tonight", "Tornado warning Ohio", "New phone"])[:n]
    ids = advtrain.tokenize(tok, texts, 32)
    width = max(map(len, ids))
    return [{"input_ids": torch.tensor(x + [tok.pad_token_id] * (width - len(x))),
             "attention_mask": torch.tensor([1] * len(x) + [0] * (width - len(x))), "labels": torch.tensor(i % 2)}
            for i, x in enumerate(ids)]


def trainer_args(tmp_path, accum=1, epochs=3, batch=8):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        num_train_epochs=epochs, learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)


class Sequential(advtrain.AdversarialTrainer):
    """Fixed batch order, so that the reference loop can see the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def reference_loop(model, data, method, accum, steps, batch):
    """advtrain's own loop (micro_step + optimizer_step) over the same batches and optimizer."""
    attack = attack_for(method, model) or advtrain.Baseline()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = advtrain.build_scheduler(optimizer, "constant", 0, 1)
    micro = [data[i:i + batch] for i in range(0, len(data), batch)]
    for _ in range(steps):
        for chunk in micro:
            features = {k: torch.stack([d[k] for d in chunk]) for k in ("input_ids", "attention_mask")}
            labels = torch.stack([d["labels"] for d in chunk])
            advtrain.micro_step(attack, model, features, labels, torch.device("cpu"), None, None, accum)
        advtrain.optimizer_step(model, optimizer, scheduler, None, 1.0)


def tiny_classifier(model_dirs):
    model = without_dropout(advtrain.Classifier.from_pretrained(str(model_dirs["deberta-v2"]), dropout=0.0))
    return model, advtrain.load_tokenizer(str(model_dirs["deberta-v2"]))


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("method", list(SETTINGS))
def test_trainer_steps_match_advtrains_own_loop(method, accum, model_dirs, tmp_path):
    model, tok = tiny_classifier(model_dirs)
    reference = copy.deepcopy(model)
    data = dataset(tok)
    batch = 8 // accum
    trainer = Sequential(model=model, args=trainer_args(tmp_path, accum, epochs=3, batch=batch), train_dataset=data,
                         attack=attack_for(method, model))
    trainer.train()
    reference_loop(reference, data, method, accum, steps=3, batch=batch)
    assert trainer.state.global_step == 3
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    no_hooks_left(model)


def test_attack_none_is_plain_trainer_and_hf_heads_work(model_dirs, tmp_path):
    tok = advtrain.load_tokenizer(str(model_dirs["bert"]))
    data = dataset(tok)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dirs["bert"]), num_labels=2)
    twin = copy.deepcopy(hf)
    transformers.Trainer(model=hf, args=trainer_args(tmp_path / "a"), train_dataset=data).train()
    advtrain.AdversarialTrainer(model=twin, args=trainer_args(tmp_path / "b"), train_dataset=data, attack=None).train()
    for a, b in zip(hf.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)

    attacked = transformers.AutoModelForSequenceClassification.from_pretrained(str(model_dirs["bert"]), num_labels=2)
    start = copy.deepcopy(attacked.state_dict())
    trainer = advtrain.AdversarialTrainer(model=attacked, args=trainer_args(tmp_path / "c"), train_dataset=data,
                                          attack=advtrain.AWP(attacked))
    trainer.train()
    assert any(not torch.equal(v, start[k]) for k, v in attacked.state_dict().items())
    no_hooks_left(attacked)


def test_adv_start_gates_the_attack(model_dirs, tmp_path):
    model, tok = tiny_classifier(model_dirs)
    seen = []

    class Counting(advtrain.FGM):
        def backward(self, *args, **kwargs):
            seen.append(1)
            return super().backward(*args, **kwargs)

    trainer = Sequential(model=model, args=trainer_args(tmp_path, epochs=3, batch=4), train_dataset=dataset(tok),
                         attack=Counting(model, eps=0.1), adv_start=2.0)
    trainer.train()
    assert trainer.state.global_step == 6 and len(seen) == 2


@pytest.mark.slow
def test_advtrain_imports_without_accelerate(tmp_path):
    blocker = tmp_path / "accelerate"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('accelerate is absent here')\n")
    code = ("import advtrain; print(advtrain.FGM.__name__);\n"
            "try:\n    advtrain.AdversarialTrainer\nexcept ImportError as e:\n    print('lazy', e)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("FGM")


TASKS = {"regression": advtrain.Task("regression", ["score"], "rmse"),
         "multilabel": advtrain.Task("multilabel", ["a", "b", "c"], "auc")}


def task_dataset(tok, task, n=8):
    rows = dataset(tok, n)
    g = torch.Generator().manual_seed(0)
    for row in rows:
        row["labels"] = (torch.rand(len(task.target_cols), generator=g) * 3 if task.kind == "regression"
                         else (torch.rand(len(task.target_cols), generator=g) > 0.5).float())
    return rows


@pytest.mark.parametrize("method", ["baseline", "fgm", "awp", "sift"])
@pytest.mark.parametrize("kind", list(TASKS))
def test_trainer_trains_the_tasks_own_loss_as_advtrains_loop_does(kind, method, model_dirs, tmp_path):
    task = TASKS[kind]
    model = without_dropout(advtrain.Classifier.from_pretrained(str(model_dirs["deberta-v2"]), dropout=0.0,
                                                                num_labels=task.num_outputs))
    tok = advtrain.load_tokenizer(str(model_dirs["deberta-v2"]))
    reference, data = copy.deepcopy(model), task_dataset(tok, task)

    def attack(m):
        if method == "sift":
            return advtrain.SiFT(m, init=0.0, divergence=task.divergence)
        return attack_for(method, m)

    trainer = Sequential(model=model, args=trainer_args(tmp_path, epochs=3), train_dataset=data,
                         attack=attack(model), task=task)
    trainer.train()
    mine = attack(reference) or advtrain.Baseline()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    scheduler = advtrain.build_scheduler(optimizer, "constant", 0, 1)
    features = {k: torch.stack([d[k] for d in data]) for k in ("input_ids", "attention_mask")}
    labels = torch.stack([d["labels"] for d in data])
    for _ in range(3):
        advtrain.micro_step(mine, reference, features, labels, torch.device("cpu"), None, None, 1, task.loss)
        advtrain.optimizer_step(reference, optimizer, scheduler, None, 1.0)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_without_a_task_the_classifier_follows_transformers_rule_for_its_loss(model_dirs, tmp_path):
    tok = advtrain.load_tokenizer(str(model_dirs["deberta-v2"]))
    for task in TASKS.values():
        model = advtrain.Classifier.from_pretrained(str(model_dirs["deberta-v2"]), num_labels=task.num_outputs)
        trainer = advtrain.AdversarialTrainer(model=model, args=trainer_args(tmp_path), attack=None,
                                              train_dataset=task_dataset(tok, task))
        logits, labels = torch.randn(4, task.num_outputs), torch.stack([r["labels"] for r in
                                                                          task_dataset(tok, task, 4)])
        expected = task.loss(logits, labels) if task.kind == "multilabel" or task.num_outputs > 1 else \
            torch.nn.functional.mse_loss(logits.squeeze(-1), labels.squeeze(-1))
        torch.testing.assert_close(trainer._classifier_loss(logits, labels), expected)
