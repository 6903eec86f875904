"""``JDTrainer``: Hugging Face's ``Trainer`` with partial JD, against manual steps on the same
batches (tiny random configurations, no downloads)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from oracle import relative_error
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")
if not transformers.utils.is_torch_available():  # (transformers 5 needs torch >= 2.6)
    pytest.skip("this transformers does not run with this torch", allow_module_level=True)

from pjd_optim import PartialJDOptimizer  # noqa: E402
from pjd_optim.integrations.transformers import JDTrainer, objective_losses  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class Tokens(torch.utils.data.Dataset[dict[str, Tensor]]):
    def __init__(
        self, count: int, length: int, vocab: int, classes: int | None = None, padded: bool = True
    ) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (count, length), generator=generator)
        if classes is None:
            self.labels = self.ids.clone()
            if padded:
                self.labels[0, 2:] = -100  # a sequence with one valid token
                self.labels[1, :] = -100  # and one without any (left out of "sequence" objectives)
        else:
            self.labels = torch.randint(0, classes, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=23, n_positions=16, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model: nn.Module = transformers.GPT2LMHeadModel(config)
    return model


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model: nn.Module = transformers.LlamaForCausalLM(config)
    return model


def bert_classifier() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        vocab_size=23, num_labels=3, max_position_embeddings=16,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model: nn.Module = transformers.BertForSequenceClassification(config)
    return model


def train(
    model: nn.Module, data: Tokens, considered: str, objectives: Any, accumulate: int
) -> list[dict[str, Tensor]]:
    """Two optimizer steps of ``JDTrainer`` (SGD, constant lr, no clipping); the batches used."""
    args = transformers.TrainingArguments(
        output_dir="/tmp/pjd_optim_hf",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulate,
        max_steps=2,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    seen: list[dict[str, Tensor]] = []

    class Recording(JDTrainer):
        def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *a: Any, **k: Any) -> Any:
            seen.append({key: value.clone() for key, value in inputs.items()})
            return super().compute_loss(model, inputs, *a, **k)

    trainer = Recording(
        model=model,
        args=args,
        train_dataset=data,
        considered=model.get_submodule(considered),
        objectives=objectives,
    )
    trainer.train()
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize(
    ("build", "considered", "objectives"),
    [
        (gpt2, "lm_head", "sequence"),
        (gpt2, "lm_head", "token"),
        (gpt2, "transformer.h.1", "sequence"),
        (llama, "model.norm", "token"),  # (padded: flat token losses through Llama's RMSNorm)
        (bert_classifier, "classifier", "sequence"),
    ],
)
def test_jd_trainer_steps_as_manual_partial_jd_steps(
    build: Any, considered: str, objectives: Any, accumulate: int
) -> None:
    model = build()
    reference = copy.deepcopy(model)
    data = Tokens(16, 8, 23, classes=3 if build is bert_classifier else None)
    seen = train(model, data, considered, objectives, accumulate)
    assert len(seen) == 2 * accumulate
    reference.train()
    manual = PartialJDOptimizer(
        torch.optim.SGD(reference.parameters(), lr=0.1),
        reference,
        considered=reference.get_submodule(considered),
    )
    causal = build is not bert_classifier
    for start in range(0, len(seen), accumulate):
        for inputs in seen[start : start + accumulate]:
            logits = reference(input_ids=inputs["input_ids"]).logits
            losses = objective_losses(logits, inputs["labels"], objectives, causal)
            manual.backward(losses / accumulate)
        manual.step()
        manual.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    moved = max(
        relative_error(p, q) for p, q in zip(model.parameters(), build().parameters(), strict=True)
    )
    assert moved > 1e-3  # (the steps did change the parameters)


def test_sequence_and_token_objectives_follow_the_labels() -> None:
    """Causal shift, ``-100`` ignored, sequences without a valid token left out (never NaN)."""
    logits = torch.randn(3, 4, 5)
    labels = torch.tensor([[1, 2, -100, -100], [-100, -100, -100, -100], [0, 1, 2, 3]])
    tokens = objective_losses(logits, labels, "token", causal=True)
    shifted = labels[:, 1:]
    assert tokens.shape == (int((shifted != -100).sum()),)
    sequences = objective_losses(logits, labels, "sequence", causal=True)
    assert sequences.shape == (2,) and bool(torch.isfinite(sequences).all())
    expected = torch.nn.functional.cross_entropy(logits[2, :-1], labels[2, 1:])
    assert torch.allclose(sequences[1], expected)
    first = torch.nn.functional.cross_entropy(logits[0, :1], labels[0, 1:2])
    assert torch.allclose(sequences[0], first)


@pytest.mark.slow
def test_token_objectives_with_the_last_block_considered_match_the_oracle() -> None:
    """Every label valid: the token losses are ``[B, T]``, so the last block (attention mixes the
    positions) can be considered (flat losses were refused); two SGD steps against the per-token
    oracle (``autograd.grad`` per loss) over the block, every parameter compared."""
    from oracle import oracle_backward

    model = gpt2()
    reference = copy.deepcopy(model)
    seen = train(model, Tokens(8, 6, 23, padded=False), "transformer.h.1", "token", 1)
    reference.train()
    considered = list(reference.get_submodule("transformer.h.1").parameters())
    for inputs in seen:
        logits = reference(input_ids=inputs["input_ids"]).logits[:, :-1]
        labels = inputs["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), reduction="none"
        )
        reference.zero_grad(set_to_none=True)
        oracle_backward(losses, considered, list(reference.parameters()))
        with torch.no_grad():
            for p in reference.parameters():
                if p.grad is not None:
                    p.sub_(0.1 * p.grad)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def one_step(jd: bool, smoothing: float) -> nn.Module:
    """One SGD step of ``Trainer``, or of ``JDTrainer`` with ``Mean()`` weighting (mean-loss
    training: the same step), on a Llama with padded labels."""
    from pjd_optim import Mean

    model = llama()
    args = transformers.TrainingArguments(
        output_dir="/tmp/pjd_optim_hf", per_device_train_batch_size=4, max_steps=1,
        learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no",
        use_cpu=True, seed=0, label_smoothing_factor=smoothing,
    )  # fmt: skip
    data = Tokens(4, 8, 23)
    if jd:
        JDTrainer(model=model, args=args, train_dataset=data, considered=model.lm_head,
                  objectives="token", weighting=Mean()).train()  # fmt: skip
    else:
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
    return model


@pytest.mark.slow
def test_label_smoothing_as_trainer_smooths() -> None:
    """``label_smoothing_factor`` smooths the objectives as ``Trainer``'s loss (it was ignored:
    with ``Mean()`` weighting the parameters ended 36% apart from ``Trainer``'s)."""
    expected = one_step(False, 0.3)
    actual = one_step(True, 0.3)
    for p, q in zip(actual.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class Wrapper(nn.Module):
    """A data-parallel-like wrapper (``.module``, no ``config``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_causal_models_are_seen_through_wrappers() -> None:
    """Labels are shifted for a causal LM wrapped by ``torch.compile``, ``DataParallel`` or a
    DDP-like wrapper (the wrapped model was read as not causal: every token trained to predict
    itself), and for decoder-only ``*ForConditionalGeneration``; not for encoder-decoders."""
    from pjd_optim.integrations.transformers import _causal

    model = llama()
    compiled: Any = torch.compile(model)
    for wrapped in (model, compiled, nn.DataParallel(model), Wrapper(model)):
        assert _causal(wrapped)
    assert not _causal(bert_classifier())
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=23, d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4)
    )
    assert not _causal(t5)
    vlm = type("TinyVLMForConditionalGeneration", (Wrapper,), {})(model)
    vlm.config = transformers.PretrainedConfig(is_encoder_decoder=False)
    assert _causal(vlm)


def test_a_batch_without_valid_labels_and_a_compute_loss_func_are_refused() -> None:
    """Every label -100: a clear error naming it (it said the batch had no sample); a
    ``compute_loss_func`` (one scalar, no Gramian): refused when the trainer is built."""
    with pytest.raises(ValueError, match="Every label of the batch is -100"):
        objective_losses(torch.randn(2, 4, 5), torch.full((2, 4), -100), "token", causal=True)
    with pytest.raises(ValueError, match="compute_loss_func returns one scalar"):
        JDTrainer(model=gpt2(), considered=[], compute_loss_func=lambda *a, **k: 0.0)


@pytest.mark.slow
def test_a_second_train_reuses_the_wrapper() -> None:
    """``trainer.train()`` twice: the optimizer accelerate prepared is not wrapped again (it was,
    with a second set of hooks on the considered module and a plain-step warning)."""
    model = gpt2()
    args = transformers.TrainingArguments(
        output_dir="/tmp/pjd_optim_hf", per_device_train_batch_size=4, max_steps=1,
        optim="sgd", report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
    )  # fmt: skip
    trainer = JDTrainer(model=model, args=args, train_dataset=Tokens(8, 6, 23),
                        considered=model.lm_head)  # fmt: skip
    trainer.train()
    first = trainer.jd_optimizer
    trainer.train()
    assert trainer.jd_optimizer is first
    assert len(model.get_submodule("lm_head")._forward_hooks) == 1


def own_loss_cases() -> dict[str, Any]:
    """Models whose own loss the objectives must reproduce, with a batch: a name that reads as
    causal with unshifted labels (XLNet), one that does not with shifted labels (Reformer), an
    encoder-decoder with labels longer than its inputs (BART: decoder inputs from the labels),
    and classifiers whose ``problem_type`` is multi-label or multi-output regression."""
    T, g = transformers, torch.Generator().manual_seed(0)
    ids = torch.randint(3, 23, (2, 8), generator=g)
    bert = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                vocab_size=23, max_position_embeddings=16, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)  # fmt: skip
    return {
        "xlnet": lambda: (
            T.XLNetLMHeadModel(
                T.XLNetConfig(
                    vocab_size=23, d_model=16, n_layer=1, n_head=2, d_inner=32, dropout=0.0
                )
            ),
            {"input_ids": ids, "labels": ids},
        ),
        "reformer": lambda: (
            T.ReformerModelWithLMHead(
                T.ReformerConfig(
                    vocab_size=23,
                    hidden_size=16,
                    num_attention_heads=2,
                    attention_head_size=8,
                    attn_layers=["local"],
                    is_decoder=True,
                    feed_forward_size=32,
                    axial_pos_shape=[2, 4],
                    axial_pos_embds_dim=[8, 8],
                    max_position_embeddings=8,
                    local_attn_chunk_length=4,
                    hidden_dropout_prob=0.0,
                    local_attention_probs_dropout_prob=0.0,
                )
            ),
            {"input_ids": ids, "labels": ids},
        ),
        "bart": lambda: (
            T.BartForConditionalGeneration(
                T.BartConfig(
                    vocab_size=23,
                    d_model=16,
                    encoder_layers=1,
                    decoder_layers=1,
                    encoder_attention_heads=2,
                    decoder_attention_heads=2,
                    encoder_ffn_dim=32,
                    decoder_ffn_dim=32,
                    max_position_embeddings=16,
                    dropout=0.0,
                )
            ),
            {"input_ids": ids, "labels": torch.randint(3, 23, (2, 5), generator=g)},
        ),
        "multi-label": lambda: (
            T.BertForSequenceClassification(
                T.BertConfig(num_labels=3, problem_type="multi_label_classification", **bert)
            ),
            {"input_ids": ids, "labels": torch.randint(0, 2, (2, 3), generator=g).float()},
        ),
        "regression": lambda: (
            T.BertForSequenceClassification(T.BertConfig(num_labels=2, **bert)),
            {"input_ids": ids, "labels": torch.randn(2, 2, generator=g)},
        ),
    }


def trainer_for(
    model: nn.Module, objectives: Any = "token", considered: Any = (), **args: Any
) -> JDTrainer:
    arguments = transformers.TrainingArguments(
        output_dir="/tmp/pjd_optim_hf", report_to=[], save_strategy="no", use_cpu=True, **args
    )
    return JDTrainer(
        model=model, args=arguments, considered=list(considered), objectives=objectives
    )


@pytest.mark.parametrize("case", list(own_loss_cases()))
def test_the_objectives_reproduce_the_models_own_loss(case: str) -> None:
    """The mean of the token objectives (a classifier's: of its examples') is the model's own
    loss: labels shifted as the model shifts them (not as its class name suggests), an
    encoder-decoder's decoder fed from the labels, a classifier's ``problem_type`` followed.
    Before, XLNet's tokens were shifted (4.14 against its loss 3.56), Reformer's not, BART's
    decoder took the inputs shifted (a raw error with labels of another length), and a
    multi-label classifier took a softmax cross-entropy."""
    torch.manual_seed(0)
    model, batch = own_loss_cases()[case]()
    model.eval()
    expected = model(**batch).loss
    actual = trainer_for(model).compute_loss(model, batch)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def test_a_model_loss_with_other_terms_is_refused() -> None:
    """A Mixtral whose loss adds its router's balancing loss (``output_router_logits=True``, the
    default coefficient 0.001: 6e-4 of the loss, accepted before): the objectives would leave
    it out, so the step is refused before anything changes."""
    config = transformers.MixtralConfig(
        vocab_size=23, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
        num_experts_per_tok=1, output_router_logits=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config)
    ids = torch.randint(0, 23, (2, 6))
    trainer = trainer_for(model)
    with pytest.raises(ValueError, match="do not reproduce MixtralForCausalLM's own loss"):
        trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
    model.config.output_router_logits = False
    model.eval()
    trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
    assert trainer.shifted


def test_a_tie_of_the_loss_values_is_decided_by_their_gradients() -> None:
    """XLNet (its class name reads as causal, its loss does not shift) with uniform logits (a
    zero head) and one label for every token: both alignments give the token mean log V, so
    the value alone accepted the name's guess (shifted) and kept it for every later batch; the
    gradient w.r.t. the logits tells them apart."""
    model, _ = own_loss_cases()["xlnet"]()
    with torch.no_grad():
        model.lm_loss.weight.zero_()
        model.lm_loss.bias.zero_()
    ids = torch.randint(3, 23, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, 5)
    trainer = trainer_for(model, "sequence", considered=[model.lm_loss])
    trainer.create_optimizer()
    model.train()
    trainer.compute_loss(model, {"input_ids": ids, "labels": labels})
    assert trainer.shifted is False


def test_label_smoothing_shifts_as_trainers_label_smoother() -> None:
    """Under label smoothing the labels do not go into the forward (as with ``Trainer``): the
    objectives shift them as ``Trainer``'s label smoother does, by the causal LM classes'
    names (Reformer's were not shifted)."""
    torch.manual_seed(0)
    model, batch = own_loss_cases()["reformer"]()
    model.eval()
    args = {"label_smoothing_factor": 0.1}
    ours = trainer_for(model, **args).compute_loss(model, dict(batch))
    arguments = transformers.TrainingArguments(
        output_dir="/tmp/pjd_optim_hf", report_to=[], save_strategy="no", use_cpu=True, **args
    )
    expected = transformers.Trainer(model=model, args=arguments).compute_loss(model, dict(batch))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)


def test_a_batch_without_labels_is_refused_clearly() -> None:
    """Question answering's ``start_positions``/``end_positions`` (``label_names``): a clear
    error naming the fix (a raw ``KeyError: 'labels'``)."""
    model = bert_classifier()
    with pytest.raises(ValueError, match="reads each batch's 'labels'"):
        trainer_for(model).compute_loss(model, {"input_ids": torch.zeros(2, 4, dtype=torch.long)})


@pytest.mark.slow
def test_mixed_precision_is_checked_by_value() -> None:
    """Under ``bf16=True`` accelerate returns the logits as a float32 copy of those the loss
    read, so the loss has no gradient w.r.t. them: the values decide (every step was refused)."""
    model = llama()
    args = transformers.TrainingArguments(
        output_dir="/tmp/pjd_optim_hf", per_device_train_batch_size=4, max_steps=1, optim="sgd",
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, bf16=True,
    )  # fmt: skip
    trainer = JDTrainer(model=model, args=args, train_dataset=Tokens(4, 6, 23),
                        considered=model.lm_head, objectives="token")  # fmt: skip
    trainer.train()
    assert trainer.shifted is True
