"""Each attack class pasted alone (torch, F and contextlib only) into training loops of the shapes public
Kaggle scripts have: a Feedback-Prize-style regression wrapper (AutoModel as self.model, mean pooling,
Linear(hidden, 6), SmoothL1, autocast + GradScaler, accumulation 2), an NBME-style token-classification
wrapper (self.transformer, no .config, returns (loss, logits)), and a wrapper under reentrant gradient
checkpointing. Each case runs with weights bitwise restored and finite gradients, or stops with one sentence."""
import contextlib
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

import advtrain
from conftest import ATTACKS, TEXTS


def pasted(cls):
    """The class as a notebook gets it: its source alone, executed with torch, F and contextlib."""
    scope = {"torch": torch, "F": F, "contextlib": contextlib, "__name__": "notebook"}
    exec(compile(inspect.getsource(cls), f"<{cls.__name__} pasted>", "exec"), scope)
    return scope[cls.__name__]


def checkpointing(backbone, reentrant: bool):
    kwargs = {"use_reentrant": reentrant}
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers 5
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class FeedbackModel(nn.Module):
    """The Feedback Prize ELL CustomModel: its own .config, AutoModel as self.model, mean pooling, 6 scores."""

    def __init__(self, path):
        super().__init__()
        self.config = transformers.AutoConfig.from_pretrained(path)
        self.config.hidden_dropout_prob = self.config.attention_probs_dropout_prob = 0.0
        self.model = transformers.AutoModel.from_pretrained(path, config=self.config)
        self.fc = nn.Linear(self.config.hidden_size, 6)

    def forward(self, inputs):
        hidden = self.model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return self.fc((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))


class NBMEModel(nn.Module):
    """The NBME model: the transformer as self.transformer, no .config, a logit per token, its loss inside."""

    def __init__(self, path):
        super().__init__()
        self.transformer = transformers.AutoModel.from_pretrained(path)
        self.transformer.config.hidden_dropout_prob = 0.0
        self.fc = nn.Linear(self.transformer.config.hidden_size, 1)

    def forward(self, input_ids, attention_mask, labels):
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.fc(hidden).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return (loss * attention_mask).sum() / attention_mask.sum(), logits


def make_attack(method, model, **kw):
    settings = {"fgm": dict(eps=0.5), "pgd": dict(eps=0.5, alpha=0.2), "freelb": dict(lr=0.5, init_mag=0.5),
                "awp": dict(), "sift": dict()}[method]
    return pasted(ATTACKS[method])(model, **{**settings, **kw})


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_restored(model, before):
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.fixture
def batch(model_dirs):
    tok = advtrain.load_tokenizer(str(model_dirs["deberta-v2"]))
    return tok(TEXTS, padding=True, return_tensors="pt")


@pytest.mark.parametrize("method", list(ATTACKS))
def test_feedback_prize_loop_fp16_scaler_and_accumulation(method, model_dirs, batch):
    torch.manual_seed(0)
    model = FeedbackModel(str(model_dirs["deberta-v2"]))
    attack = make_attack(method, model, **({"divergence": "mse"} if method == "sift" else {}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler, accum, criterion = torch.amp.GradScaler("cpu"), 2, nn.SmoothL1Loss()
    labels = torch.rand(len(TEXTS), 6) * 4 + 1
    inputs = dict(batch)

    def forward():  # the README's forward: a small def, so autocast can hold it
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(inputs)

    model.train()
    for i in range(4):
        before = snapshot(model)
        loss = attack.backward(forward, lambda out: criterion(out.float(), labels), scaler=scaler,
                               accumulation_steps=accum)
        assert_restored(model, before)
        assert torch.isfinite(loss)
        if (i + 1) % accum == 0:
            scaler.unscale_(optimizer)  # unscale first, then clip: the README's order
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1000.0)
            assert torch.isfinite(norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()


@pytest.mark.parametrize("method", ["fgm", "pgd", "freelb", "awp"])
def test_nbme_wrapper_without_config_returning_loss_and_logits(method, model_dirs, batch):
    torch.manual_seed(0)
    model = NBMEModel(str(model_dirs["deberta-v2"]))
    attack = make_attack(method, model)
    if method == "freelb":  # the pad id comes from the backbone's config, found inside the wrapper
        assert attack.pad_token_id == model.transformer.config.pad_token_id
    labels = (torch.rand(batch["input_ids"].shape) > 0.7).float()
    before = snapshot(model)
    loss = attack.backward(lambda: model(batch["input_ids"], batch["attention_mask"], labels), lambda out: out[0])
    assert_restored(model, before)
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.transformer.embeddings.word_embeddings.weight.grad is not None


def test_sift_on_per_token_logits_runs_per_position_or_refuses_in_one_sentence(model_dirs, batch):
    torch.manual_seed(0)
    model = NBMEModel(str(model_dirs["deberta-v2"]))
    labels = (torch.rand(batch["input_ids"].shape) > 0.7).float()

    def forward():
        return model(batch["input_ids"], batch["attention_mask"], labels)

    with pytest.raises(TypeError, match=r"cannot find the logits .* pass logits_fn="):
        make_attack("sift", model).backward(forward, lambda out: out[0])
    with pytest.raises(ValueError, match="one logit per token, and symmetric-kl would compare a softmax across "
                                         "positions: pass divergence='binary-symmetric-kl'"):
        make_attack("sift", model, logits_fn=lambda out: out[1]).backward(forward, lambda out: out[0])
    assert all(p.grad is None for p in model.parameters())
    attack = make_attack("sift", model, logits_fn=lambda out: out[1], divergence="binary-symmetric-kl")
    before = snapshot(model)
    loss = attack.backward(forward, lambda out: out[0])
    assert_restored(model, before)
    assert torch.isfinite(loss) and float(attack.last_kl) >= 0


def test_sift_on_a_regression_head_needs_an_elementwise_divergence(model_dirs, batch):
    model = FeedbackModel(str(model_dirs["deberta-v2"]))
    model.fc = nn.Linear(model.config.hidden_size, 1)  # a one-output regression head, SiFT's default divergence
    with pytest.raises(ValueError, match="pass divergence='mse' for a regression head"):
        make_attack("sift", model).backward(lambda: model(dict(batch)), lambda out: out.pow(2).mean())
    attack = make_attack("sift", model, divergence="mse")
    attack.backward(lambda: model(dict(batch)), lambda out: out.pow(2).mean())
    assert float(attack.last_kl) > 0


@pytest.mark.parametrize("method", list(ATTACKS))
def test_reentrant_gradient_checkpointing_runs_or_refuses_before_touching_grad(method, model_dirs):
    tok = advtrain.load_tokenizer(str(model_dirs["bert"]))
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    # BERT: under transformers 5, DeBERTa-v2 with reentrant checkpointing fails in plain training already
    model = advtrain.Classifier.from_pretrained(str(model_dirs["bert"]), dropout=0.0)
    checkpointing(model.backbone, reentrant=True)
    model.train()
    labels = torch.tensor([1, 0, 1, 0])
    attack = make_attack(method, model)
    before = snapshot(model)

    def forward():
        return model(batch["input_ids"], batch["attention_mask"])

    if method in ("pgd", "sift"):
        with pytest.raises(RuntimeError, match="needs non-reentrant gradient checkpointing: enable it with model."
                                               r"gradient_checkpointing_enable\(gradient_checkpointing_kwargs="):
            attack.backward(forward, lambda out: F.cross_entropy(out, labels))
        assert all(p.grad is None for p in model.parameters())
        checkpointing(model.backbone, reentrant=False)  # the fix the sentence names
    loss = attack.backward(forward, lambda out: F.cross_entropy(out, labels))
    assert_restored(model, before)
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.head.weight.grad is not None


def test_a_model_with_two_backbones_or_no_pad_id_is_refused_in_one_sentence(model_dirs):
    class TwoTowers(nn.Module):
        def __init__(self, path):
            super().__init__()
            self.a, self.b = transformers.AutoModel.from_pretrained(path), transformers.AutoModel.from_pretrained(path)

    for method in ("fgm", "pgd", "freelb"):
        with pytest.raises(ValueError, match=r"neither TwoTowers nor exactly one of its submodules defines it "
                                             r"\(2 do\)"):
            make_attack(method, TwoTowers(str(model_dirs["bert"])))

    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)

        def get_input_embeddings(self):
            return self.emb

    with pytest.raises(ValueError, match="FreeLB found no config with a pad_token_id .* pass pad_token_id="):
        make_attack("freelb", Bare())
    assert make_attack("freelb", Bare(), pad_token_id=0).pad_token_id == 0


@pytest.fixture(scope="module")
def three_archs(tmp_path_factory):
    return {arch: advtrain.make_tiny_model(tmp_path_factory.mktemp(arch), arch, TEXTS)
            for arch in ("bert", "roberta", "deberta-v2")}


def trains_plainly(model, batch, labels) -> bool:
    """Whether plain training (no attack) runs under the model's checkpointing: under transformers 4.x's
    default (reentrant), DeBERTa-v2 fails by itself ("backward through the graph a second time")."""
    try:
        F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), labels).backward()
        return True
    except RuntimeError:
        return False
    finally:
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("method", list(ATTACKS))
@pytest.mark.parametrize("arch", ["bert", "roberta", "deberta-v2"])
def test_default_gradient_checkpointing_trains_or_names_the_call_that_works(arch, method, three_archs):
    """model.gradient_checkpointing_enable() as Kaggle notebooks call it (transformers' default kind: reentrant
    in 4.x, not in 5.x): the attack gives the gradients of no checkpointing, or (PGD, SiFT under reentrant)
    refuses before touching a gradient with the call that works, which then gives them."""
    path = three_archs[arch]
    tok = advtrain.load_tokenizer(str(path))
    batch, labels = tok(TEXTS, padding=True, return_tensors="pt"), torch.tensor([1, 0, 1, 0])
    grads = []
    for checkpoint in (False, True):
        torch.manual_seed(0)
        model = advtrain.Classifier.from_pretrained(str(path), dropout=0.0)
        model.train()
        if checkpoint:
            model.backbone.gradient_checkpointing_enable()
            if not trains_plainly(model, batch, labels):  # transformers' own failure: nothing an attack can do
                checkpointing(model.backbone, reentrant=False)
        before = snapshot(model)

        def attack_step():
            torch.manual_seed(1)
            make_attack(method, model).backward(lambda: model(batch["input_ids"], batch["attention_mask"]),
                                                lambda out: F.cross_entropy(out, labels))

        try:
            attack_step()
        except RuntimeError as e:
            assert checkpoint and method in ("pgd", "sift"), e
            assert "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})" in str(e)
            assert all(p.grad is None for p in model.parameters())
            checkpointing(model.backbone, reentrant=False)  # the call the sentence names
            attack_step()
        assert_restored(model, before)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
