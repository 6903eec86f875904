"""``JDTrainer`` on packed sequences (``DataCollatorWithFlattening``: one row, ``position_ids``
restarting at 0 per sequence), models without a loss of their own (``shift_labels``), and
``jd_loss`` for overrides of ``compute_loss`` (in evaluation too); Falcon's ``FalconLinear``."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from oracle import oracle_gramian, relative_error
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")
if not transformers.utils.is_torch_available():  # (transformers 5 needs torch >= 2.6)
    pytest.skip("this transformers does not run with this torch", allow_module_level=True)

from pjd_optim import UPGrad  # noqa: E402
from pjd_optim.integrations.transformers import JDTrainer, objective_losses  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
V = 23


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model: nn.Module = transformers.LlamaForCausalLM(config).double()
    return model


def packed_batch() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    features = [
        {"input_ids": torch.randint(0, V, (n,), generator=generator).tolist()} for n in (3, 5, 2, 4)
    ]
    for feature in features:
        feature["labels"] = list(feature["input_ids"])
    collated: dict[str, Tensor] = transformers.DataCollatorWithFlattening()(features)
    return collated


def args(**options: Any) -> Any:
    return transformers.TrainingArguments(
        output_dir="/tmp/pjd_optim_hf", learning_rate=0.1, optim="sgd", report_to=[],
        use_cpu=True, max_grad_norm=0.0, **options,
    )  # fmt: skip


def test_packed_sequences_are_one_objective_each() -> None:
    """Before, the packed row was one objective (``m = 1``, the plain token mean)."""
    batch = packed_batch()
    assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"] == 0).sum()) == 4
    model = llama()
    trainer = JDTrainer(model=model, args=args(), considered=model.lm_head, objectives="sequence")
    # (after Trainer's set-up, which changes how this transformers masks packed rows)
    reference = copy.deepcopy(model)
    trainer.create_optimizer()
    trainer.compute_loss(model, batch).backward()
    step = trainer.jd_optimizer.last_step  # type: ignore[union-attr]
    assert step is not None and step.weights.numel() == 4
    # The oracle: each sequence's mean token loss, sequences cut where the positions restart.
    logits = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    starts = [*(batch["position_ids"][0] == 0).nonzero().flatten().tolist(), logits.shape[1]]
    losses = torch.stack(
        [
            F.cross_entropy(logits[0, a : b - 1], batch["input_ids"][0, a + 1 : b])
            for a, b in itertools.pairwise(starts)
        ]
    )
    gramian = oracle_gramian(losses, list(reference.get_submodule("lm_head").parameters()))
    # (the objectives' cross-entropy runs in float32, as Trainer's loss does)
    assert relative_error(step.gramian, gramian) < 1e-6
    assert relative_error(step.weights, UPGrad()(gramian)) < 1e-6


def test_segments_from_cumulative_lengths_match_position_ids() -> None:
    batch = packed_batch()
    logits = torch.randn(1, batch["labels"].shape[1], V, dtype=torch.float64)
    bounds = torch.tensor([0, 3, 8, 10, 14])
    by_positions = objective_losses(
        logits, batch["labels"], "sequence", True, segments=(batch["position_ids"] == 0).cumsum(1)
    )
    from pjd_optim.integrations.transformers import _segments

    segments = _segments(nn.Linear(1, 1), {"cu_seq_lens_q": bounds}, batch["labels"])
    assert segments is not None
    by_bounds = objective_losses(logits, batch["labels"], "sequence", True, segments=segments)
    assert by_positions.shape == (4,)
    torch.testing.assert_close(by_positions, by_bounds)


class NoLoss(nn.Module):
    """A causal LM of the user's own that returns logits only."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(V, 8), nn.Linear(8, V)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> Any:
        return transformers.modeling_outputs.CausalLMOutput(logits=self.head(self.emb(input_ids)))


def test_a_model_without_its_own_loss_needs_shift_labels() -> None:
    """Before, the shift was guessed from the class name (here: not shifted, so each token was
    trained to predict itself), silently."""
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, V, (3, 5)), "labels": torch.randint(0, V, (3, 5))}
    model = NoLoss()
    trainer = JDTrainer(model=model, args=args(), considered=model.head)
    trainer.create_optimizer()
    with pytest.raises(ValueError, match="shift_labels"):
        trainer.compute_loss(model, batch)
    trainer.jd_optimizer.close()  # type: ignore[union-attr]
    trainer = JDTrainer(model=model, args=args(), considered=model.head, shift_labels=True)
    trainer.create_optimizer()
    loss = trainer.compute_loss(model, batch)
    logits = model(batch["input_ids"]).logits
    expected = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none"
    ).mean(dim=1)
    torch.testing.assert_close(loss, expected.mean())


def test_shift_labels_that_contradict_the_models_own_loss_are_refused() -> None:
    model = llama()
    batch = {"input_ids": torch.randint(0, V, (2, 6)), "labels": torch.randint(0, V, (2, 6))}
    trainer = JDTrainer(model=model, args=args(), considered=model.lm_head, shift_labels=False)
    with pytest.raises(ValueError, match="shift_labels=False does not reproduce"):
        trainer.compute_loss(model, batch)


def test_jd_loss_in_an_override_trains_and_evaluates() -> None:
    """The advice of JDTrainer's refusals: ``evaluate()`` raised (losses without gradients, or
    no optimizer yet)."""

    class Regression(JDTrainer):
        def compute_loss(
            self,
            model: nn.Module,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            out = model(inputs["x"]).squeeze(1)
            loss = self.jd_loss((out - inputs["y"]).pow(2))
            return (loss, out) if return_outputs else loss

    class Data(torch.utils.data.Dataset[dict[str, Tensor]]):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            return {"x": torch.full((2,), float(i)), "y": torch.tensor(float(i % 3))}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
    options = dict(
        per_device_train_batch_size=4, max_steps=1, remove_unused_columns=False, label_names=["y"]
    )
    trainer = Regression(
        model=model, args=args(**options), considered=model[2], train_dataset=Data(),
        eval_dataset=Data(),
    )  # fmt: skip
    assert "eval_loss" in trainer.evaluate()  # (before train: no optimizer yet)
    trainer.train()
    assert trainer.jd_optimizer is not None and trainer.jd_optimizer.last_step is not None
    assert "eval_loss" in trainer.evaluate()


def test_falcon_linear_takes_the_linear_rule_past_an_in_place_residual() -> None:
    """Falcon adds its attention output in place to its MLP's (``FalconLinear``) output: under
    the generic rule, which checks a re-run against that output, the last layer was refused."""
    from pjd_optim import PartialJDOptimizer

    config = transformers.FalconConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, vocab_size=V
    )
    torch.manual_seed(0)
    model = transformers.FalconForCausalLM(config).double()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, V, (3, 6))

    def losses_of(m: nn.Module) -> Tensor:
        logits = m(ids).logits[:, :-1]
        flat = F.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
        return flat.view(3, -1).mean(dim=1)

    last = model.transformer.h[-1]
    optimizer = PartialJDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, considered=last
    )
    optimizer.backward(losses_of(model))
    assert optimizer.last_step is not None
    expected = oracle_gramian(losses_of(reference), list(reference.transformer.h[-1].parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12
