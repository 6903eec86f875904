"""Hugging Face ``Trainer`` with partial Jacobian descent: :class:`JDTrainer`.

Everything of ``Trainer`` is kept (its optimizer and weight-decay groups, ``optim=``, scheduler,
clipping, gradient accumulation, mixed precision, ``accelerator.backward``); the optimizer it
builds is wrapped in a :class:`~pjd_optim.PartialJDOptimizer`, and the loss it backwards is
:meth:`~pjd_optim.PartialJDOptimizer.weighted_loss` of per-objective losses:

- ``objectives="sequence"``: each sequence's loss, the mean over its valid tokens (labels shifted
  for causal language models, ``-100`` ignored; sequences without a valid token are left out);
- ``objectives="token"``: each valid token's loss (``[B, T]`` when every token is valid, so that
  considered layers that mix positions, e.g. the last block, work; flat otherwise, which they
  refuse: only position-wise layers such as ``lm_head`` or the final norm then);
- models whose logits are ``[B, classes]`` (sequence classification): each example's loss, as
  the model's ``config.problem_type`` defines it (cross-entropy, squared error, or binary
  cross-entropy per label, each example's mean over its outputs).

As ``Trainer``, the labels go into the model's forward (encoder-decoders build their decoder
inputs from them) except under label smoothing. The first loss the model computes itself checks
the objectives: their token mean (or mean) must reproduce it, which also says whether the model
shifts its labels (a causal language model) or not; a model whose loss has other terms (MoE router
losses) or another form is refused with a clear error.

With gradient accumulation, each micro-batch has its own Gramian, and its weighted loss is divided
by the accumulation steps as ``Trainer`` divides a per-batch mean loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer

from ..optimizer import PartialJDOptimizer
from ..weightings import Weighting

Objectives = Literal["sequence", "token"]


class JDTrainer(Trainer):
    """``Trainer`` whose step is partial Jacobian descent over ``considered``.

    Example::

        trainer = JDTrainer(model=model, args=args, train_dataset=data,
                            considered=model.lm_head, objectives="sequence")
        trainer.train()

    Args:
        considered: modules or parameters of ``model`` whose Jacobian gives the Gramian (the
            output layer, a final norm, the last block).
        objectives: ``"sequence"`` or ``"token"`` (see the module docstring).
        weighting: as :class:`~pjd_optim.PartialJDOptimizer`'s (default ``UPGrad()``).
        The other arguments are ``Trainer``'s.
    """

    def __init__(
        self,
        *args: Any,
        considered: Iterable[nn.Module | Tensor] | nn.Module | Tensor,
        objectives: Objectives = "sequence",
        weighting: Weighting | None = None,
        **kwargs: Any,
    ) -> None:
        if objectives not in ("sequence", "token"):
            raise ValueError(f"objectives must be 'sequence' or 'token', got {objectives!r}.")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "JDTrainer computes per-objective losses itself; compute_loss_func returns one "
                "scalar, from which no Gramian can come. Override compute_loss to return "
                "self.jd_optimizer.weighted_loss(losses) instead."
            )
        super().__init__(*args, **kwargs)
        self.considered = considered
        self.objectives: Objectives = objectives
        self.weighting = weighting
        self.jd_optimizer: PartialJDOptimizer | None = None
        self.shifted: bool | None = None  # whether labels are shifted, once the model's loss said
        # Our loss is a mean over this micro-batch: Trainer divides it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer``'s optimizer (groups, ``optim=``), wrapped."""
        optimizer = super().create_optimizer(*args, **kwargs)
        inner = getattr(optimizer, "optimizer", None)  # (prepared by accelerate: a second train())
        if isinstance(inner, PartialJDOptimizer):
            self.jd_optimizer = inner
            return optimizer
        if not isinstance(optimizer, PartialJDOptimizer):
            model = self.model
            assert isinstance(model, nn.Module)
            optimizer = PartialJDOptimizer(
                optimizer, model, considered=self.considered, weighting=self.weighting
            )
            self.optimizer = optimizer
        self.jd_optimizer = optimizer
        return optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The weighted loss of the batch's objectives (their plain mean outside training)."""
        inputs = dict(inputs)
        smoothing = float(self.args.label_smoothing_factor)
        labels = inputs.pop("labels") if smoothing else inputs["labels"]  # (as Trainer)
        outputs = model(**inputs)
        own = None if smoothing else outputs.get("loss")
        if own is not None:
            outputs["loss"] = own = own.detach()  # (frees the graph of the model's own loss)
        problem = _problem_type(model)
        causal = self._shift(model, outputs.logits, labels, own, problem)
        losses = objective_losses(
            outputs.logits,
            labels,
            self.objectives,
            causal,
            label_smoothing=smoothing,
            problem_type=problem,
        )
        training = model.training and torch.is_grad_enabled()
        if training and self.jd_optimizer is None:
            self.create_optimizer()
        if training and self.jd_optimizer is not None:
            loss = self.jd_optimizer.weighted_loss(losses)
        else:
            loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def _shift(
        self,
        model: nn.Module,
        logits: Tensor,
        labels: Tensor,
        own: Tensor | None,
        problem: str | None,
    ) -> bool:
        """Whether token ``t``'s logits predict label ``t + 1``: the alignment whose token mean
        reproduces the model's own loss ``own`` (checked once; :func:`_causal`'s guess first,
        and where the model computes no loss), or a clear error where neither does."""
        guess = _causal(model)
        if self.shifted is not None or own is None:
            return guess if self.shifted is None else self.shifted
        means = []
        with torch.no_grad():
            for shifted in (guess, not guess) if logits.ndim == 3 else (guess,):
                mean = objective_losses(logits, labels, "token", shifted, problem_type=problem)
                means.append(float(mean.mean()))
                if math.isclose(means[-1], float(own), rel_tol=_LOSS_RTOL, abs_tol=1e-12):
                    self.shifted = shifted
                    return shifted
        name = type(_unwrapped(model)).__name__
        raise ValueError(
            f"JDTrainer's objectives do not reproduce {name}'s own loss ({float(own):.6g}; "
            f"the mean of the objectives' losses is {' or '.join(f'{m:.6g}' for m in means)}, "
            "labels shifted or not): its loss has other terms (MoE router losses with "
            "output_router_logits=True?) or another form, which the objectives would leave "
            "out. Turn those terms off, or override compute_loss to return "
            "self.jd_optimizer.weighted_loss(losses) with one loss per objective."
        )


def objective_losses(
    logits: Tensor,
    labels: Tensor,
    objectives: Objectives,
    causal: bool,
    label_smoothing: float = 0.0,
    problem_type: str | None = None,
) -> Tensor:
    """Per-objective losses of a batch (see the module docstring); ``label_smoothing``: as
    ``TrainingArguments.label_smoothing_factor`` (``(1 − ε)·NLL + ε·mean_k(−log p_k)``);
    ``problem_type``: as a classifier's ``config.problem_type`` (``None``: inferred as
    Hugging Face's classifiers do, from the outputs' count and the labels' dtype)."""
    if logits.ndim == 2:  # sequence classification or regression: one loss per example
        if problem_type is None:
            integer = labels.dtype in (torch.long, torch.int)
            problem_type = _PROBLEMS[0 if logits.shape[-1] == 1 else 1 if integer else 2]
        if problem_type == "regression":
            return (logits.float() - labels.float().view_as(logits)).pow(2).mean(dim=1)
        if problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(
                logits.float(), labels.float(), reduction="none"
            ).mean(dim=1)
        return F.cross_entropy(
            logits.float(), labels, reduction="none", label_smoothing=label_smoothing
        )
    if causal:  # token t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    tokens = F.cross_entropy(
        logits.float().transpose(1, 2), labels, reduction="none", label_smoothing=label_smoothing
    )
    valid = labels != -100
    if not bool(valid.any()):
        raise ValueError(
            "Every label of the batch is -100: it has no objective to weigh. Leave such "
            "batches out of the dataset (or give them a valid token)."
        )
    if objectives == "token":  # [B, T] where every token counts: layers that mix positions work
        return tokens if bool(valid.all()) else tokens[valid]
    counts = valid.sum(dim=1)
    keep = counts > 0
    return (tokens * valid).sum(dim=1)[keep] / counts[keep]


_PROBLEMS = ("regression", "single_label_classification", "multi_label_classification")
_LOSS_RTOL = 1e-3  # the model's own loss against the objectives' mean (the same float32 maths)


def _problem_type(model: nn.Module) -> str | None:
    problem = getattr(getattr(_unwrapped(model), "config", None), "problem_type", None)
    return problem if problem in _PROBLEMS else None


def _causal(model: nn.Module) -> bool:
    """Whether token ``t``'s logits predict label ``t + 1``: causal language models
    (``*ForCausalLM``, ``*LMHeadModel``, and decoder-only ``*ForConditionalGeneration`` such as
    vision-language models, as Hugging Face's own loss treats them), seen through
    ``torch.compile`` and ``DistributedDataParallel``/``DataParallel`` wrappers."""
    model = _unwrapped(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):  # (the decoder's logits align with labels)
        return False
    architectures = getattr(config, "architectures", None) or []
    names = [type(model).__name__, str(getattr(model, "loss_type", None)), *architectures]
    return any(name.endswith(_CAUSAL) for name in names)


_CAUSAL = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s wrapper (``_orig_mod``) and data-parallel ones
    (``module``, on a wrapper without a Hugging Face ``config``)."""
    for _ in range(8):  # (wrappers of wrappers)
        inner = getattr(model, "_orig_mod", None)
        if inner is None and not hasattr(model, "config"):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model
