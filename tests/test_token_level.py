"""Attacks in token-level fp16 loops (issue 26): the NBME shape (one logit per token, padded, partly masked,
fp16 autocast with GradScaler), SiFT's mask, and skip counts said once."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import advtrain


class PerToken(nn.Module):
    """NBME's model: backbone, a linear layer per token, one logit per position."""

    def __init__(self, path):
        super().__init__()
        self.model = transformers.AutoModel.from_pretrained(str(path))
        self.fc = nn.Linear(self.model.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask):
        return self.fc(self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state).squeeze(-1)


@pytest.fixture(scope="module")
def nbme(tmp_path_factory):
    """A tiny DeBERTa-v2 and a batch of 4 x 128 positions: 35% padding, labels -1 outside the note."""
    path = advtrain.make_tiny_model(tmp_path_factory.mktemp("nbme"), "deberta-v2",
                                    texts=[f"word{i} note{i % 7} patient{i % 11}" for i in range(300)])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (4, 128), generator=g)
    attention = torch.ones(4, 128, dtype=torch.long)
    attention[:, int(128 * 0.65):] = 0
    ids[attention == 0] = 0
    labels = torch.full((4, 128), -1.0)
    labels[:, 10:60] = (torch.rand(4, 50, generator=g) > 0.7).float()
    return path, ids, attention, labels


def masked_bce(logits, labels):
    counted = (labels != -1).float()
    return (F.binary_cross_entropy_with_logits(logits.float(), labels.clamp(min=0), reduction="none")
            * counted).sum() / counted.sum()


def train_fp16(nbme, make_attack, steps=20, masked=True):
    """The NBME loop on the CPU: fp16 autocast, GradScaler, clipping after unscale_; GradScaler's skipped steps."""
    path, ids, attention, labels = nbme
    torch.manual_seed(0)
    net = PerToken(path)
    attack = make_attack(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-5)
    scaler = torch.amp.GradScaler("cpu")
    skipped = 0

    def forward():
        with torch.autocast("cpu", dtype=torch.float16):
            return net(ids, attention)

    for _ in range(steps):
        kw = {"mask": labels != -1} if masked and isinstance(attack, advtrain.SiFT) else {}
        attack.backward(forward, lambda out: masked_bce(out, labels), scaler=scaler, **kw)
        scale = scaler.get_scale()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        skipped += scaler.get_scale() < scale
    return skipped, attack


@pytest.mark.slow
def test_sift_on_per_token_logits_under_fp16_skips_no_more_steps_than_no_attack(nbme):
    plain, _ = train_fp16(nbme, advtrain.Baseline)
    sift, attack = train_fp16(nbme, lambda net: advtrain.SiFT(net, divergence="binary-symmetric-kl"))
    assert plain == 0 and sift == plain and int(attack.skipped) == 0
    with pytest.warns(UserWarning, match=r"logits \(4, 128\) are per token and no mask= was given"):
        unmasked, _ = train_fp16(nbme, lambda net: advtrain.SiFT(net, divergence="binary-symmetric-kl"), steps=5,
                                 masked=False)
    assert unmasked == 0  # averaged over positions, not summed: no overflow even without the mask


def test_logits_at_masked_positions_move_neither_the_sift_loss_nor_the_gradient(nbme):
    path, ids, attention, labels = nbme
    mask = labels != -1
    results = {}
    for name, at_masked in {"as is": lambda x: x, "changed": lambda x: 5 * x + 1}.items():
        torch.manual_seed(0)
        net = PerToken(path)
        attack = advtrain.SiFT(net, divergence="binary-symmetric-kl")

        def forward():
            out = net(ids, attention)
            return torch.where(mask, out, at_masked(out))

        torch.manual_seed(1)
        attack.backward(forward, lambda out: masked_bce(out, labels), mask=mask)
        results[name] = (attack.last_kl, [p.grad.clone() for p in net.parameters()])
    (kl_a, grads_a), (kl_b, grads_b) = results.values()
    assert kl_a > 0
    torch.testing.assert_close(kl_a, kl_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"SiFT mask has shape \(4,\), but the divergence is per position of shape "
                                         r"\(4, 128\)"):
        torch.manual_seed(0)
        net = PerToken(path)
        advtrain.SiFT(net, divergence="binary-symmetric-kl").backward(
            lambda: net(ids, attention), lambda out: masked_bce(out, labels), mask=torch.ones(4))


@pytest.mark.parametrize("method", ["fgm", "awp", "sift"])
def test_an_attack_says_once_that_it_ran_without_perturbation(method, model_dirs):
    torch.manual_seed(0)
    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]), dropout=0.0)
    tok = advtrain.load_tokenizer(str(model_dirs["bert"]))
    batch, labels = advtrain.Collator(tok.pad_token_id)([(x, y) for x, y in zip(
        advtrain.tokenize(tok, ["fire near town", "pizza tonight"], 16), [1, 0])])
    attack = {"fgm": advtrain.FGM, "awp": advtrain.AWP, "sift": advtrain.SiFT}[method](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

    def call():
        attack.backward(lambda: model(**batch) * float("inf"), lambda out: F.cross_entropy(out, labels), scaler)

    with pytest.warns(RuntimeWarning, match=f"{type(attack).__name__}: 1 call\\(s\\) had a non-finite gradient"):
        call()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call()  # said once
    assert int(attack.skipped) == 2


def test_the_kit_counts_grad_scaler_skips_in_metrics_json(data_dir, model_dirs, tmp_path, monkeypatch):
    from conftest import base_config
    real, calls = advtrain.micro_step, []

    def overflowing(*args):  # the 2nd and 3rd micro-batches leave an inf gradient, as an fp16 overflow does
        loss = real(*args)
        calls.append(1)
        if len(calls) in (2, 3):
            next(args[1].parameters()).grad.fill_(float("inf"))
        return loss

    cfg = base_config(data_dir, model_dirs["bert"], tmp_path / "plain", epochs=1, eval_every=1.0, amp="fp16")
    natural = advtrain.run(cfg)["grad_scaler_skips"]  # the first steps at scale 65536 may overflow by themselves
    monkeypatch.setattr(advtrain, "micro_step", overflowing)
    out = tmp_path / "fp16"
    metrics = advtrain.run(advtrain.dataclasses.replace(cfg, output_dir=str(out)))
    assert metrics["grad_scaler_skips"] == natural + 2
    assert advtrain.json.loads((out / "metrics.json").read_text())["grad_scaler_skips"] == natural + 2
    assert f"fp16: GradScaler skipped {natural + 2} of 50 optimizer steps" in (out / "train.log").read_text()
