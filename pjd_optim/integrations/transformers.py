"""Hugging Face ``Trainer`` with partial Jacobian descent: :class:`JDTrainer`.

Everything of ``Trainer`` is kept (its optimizer and weight-decay groups, ``optim=``, scheduler,
clipping, gradient accumulation, mixed precision, ``accelerator.backward``); the optimizer it
builds is wrapped in a :class:`~pjd_optim.PartialJDOptimizer`, and the loss it backwards is
:meth:`~pjd_optim.PartialJDOptimizer.weighted_loss` of per-objective losses:

- ``objectives="sequence"``: each sequence's loss, the mean over its valid tokens (labels shifted
  for causal language models, ``-100`` ignored; sequences without a valid token are left out).
  Sequences packed into one row (``DataCollatorWithFlattening``) are told apart by their
  ``position_ids``, which restart at 0 for each (or by ``cu_seq_lens_q``);
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
losses) or another form is refused with a clear error. A model that computes no loss needs
``shift_labels=``.

With gradient accumulation, each micro-batch has its own Gramian, and its weighted loss is divided
by the accumulation steps: every micro-batch counts equally. (``Trainer``, for models that take
``num_items_in_batch``, divides the window's summed token losses by its token count instead, so
that micro-batches count by their tokens: with ``weighting=Mean()`` the two differ where the
micro-batches have different numbers of valid tokens.)
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
        shift_labels: whether token ``t``'s logits predict label ``t + 1`` (causal language
            models). Default: decided by the model's own loss, which the objectives must
            reproduce; needed for a model that computes no loss. Where the model computes one,
            a value that does not reproduce it is refused.
        The other arguments are ``Trainer``'s.
    """

    def __init__(
        self,
        *args: Any,
        considered: Iterable[nn.Module | Tensor] | nn.Module | Tensor,
        objectives: Objectives = "sequence",
        weighting: Weighting | None = None,
        shift_labels: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if objectives not in ("sequence", "token"):
            raise ValueError(f"objectives must be 'sequence' or 'token', got {objectives!r}.")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "JDTrainer computes per-objective losses itself; compute_loss_func returns one "
                "scalar, from which no Gramian can come. Override compute_loss to return "
                "self.jd_loss(losses), with one loss per objective, instead."
            )
        super().__init__(*args, **kwargs)
        self.considered = considered
        self.objectives: Objectives = objectives
        self.weighting = weighting
        self.shift_labels = shift_labels
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
        if "labels" not in inputs:
            raise ValueError(
                "JDTrainer reads each batch's 'labels' (language modelling, sequence and token "
                f"classification); this batch has {sorted(inputs)}. For other heads (question "
                "answering's start_positions/end_positions) override compute_loss to return "
                "self.jd_loss(losses) with one loss per example."
            )
        smoothing = float(self.args.label_smoothing_factor)
        labels = inputs.pop("labels") if smoothing else inputs["labels"]  # (as Trainer)
        outputs = model(**inputs)
        problem = _problem_type(model)
        if smoothing:  # Trainer's label smoother shifts the labels of the causal LM classes
            causal = _trainer_shifts(model)
        else:
            own = outputs.get("loss")
            causal = self._shift(model, outputs.logits, labels, own, problem)
            if own is not None:  # (frees the graph of the model's own loss)
                outputs["loss"] = own.detach()
        losses = objective_losses(
            outputs.logits,
            labels,
            self.objectives,
            causal,
            label_smoothing=smoothing,
            problem_type=problem,
            segments=_segments(model, inputs, labels),
        )
        loss = self.jd_loss(losses)
        return (loss, outputs) if return_outputs else loss

    def jd_loss(self, losses: Tensor) -> Tensor:
        """What ``compute_loss`` returns for per-objective ``losses``: in training, the
        optimizer's :meth:`~pjd_optim.PartialJDOptimizer.weighted_loss` (built first if needed);
        in evaluation, their mean. For an override of ``compute_loss`` with losses of its own."""
        model = self.model
        training = isinstance(model, nn.Module) and model.training and torch.is_grad_enabled()
        if training and self.jd_optimizer is None:
            self.create_optimizer()
        if training and self.jd_optimizer is not None:
            return self.jd_optimizer.weighted_loss(losses)
        return losses.mean()

    def _shift(
        self,
        model: nn.Module,
        logits: Tensor,
        labels: Tensor,
        own: Tensor | None,
        problem: str | None,
    ) -> bool:
        """Whether token ``t``'s logits predict label ``t + 1``: the alignment whose token mean
        reproduces the model's own loss ``own``, decided once; where both do (uniform logits),
        the one whose gradient w.r.t. the logits is the loss's. :func:`_causal`'s guess where the
        model computes no loss, and for a tie without that gradient (logits returned as a copy
        of those the loss read, as mixed precision's float32 outputs): the next batch decides.
        A clear error where no alignment reproduces the loss."""
        given = self.shift_labels
        guess = _causal(model) if given is None else given
        if self.shifted is not None:
            return self.shifted
        if own is None:
            if given is None and logits.ndim == 3:
                raise ValueError(
                    f"{type(_unwrapped(model)).__name__} returned no loss, so JDTrainer cannot "
                    "check whether its labels are shifted: pass shift_labels=True (token t "
                    "predicts label t + 1, causal language models) or shift_labels=False, or "
                    "return the loss from the model's forward."
                )
            return guess
        means: dict[bool, float] = {}
        with torch.no_grad():
            for shifted in (guess, not guess) if logits.ndim == 3 else (guess,):
                mean = objective_losses(logits, labels, "token", shifted, problem_type=problem)
                means[shifted] = float(mean.mean())
        value = float(own.detach())
        found = [a for a, m in means.items() if math.isclose(m, value, rel_tol=_LOSS_RTOL)]
        if len(found) > 1:
            by_gradient = _same_gradients(own, logits, labels, problem, found)
            if by_gradient is None:
                return guess
            found = by_gradient
        if given is not None and found and given not in found:
            raise ValueError(
                f"shift_labels={given} does not reproduce {type(_unwrapped(model)).__name__}'s "
                f"own loss ({value:.6g}), shift_labels={not given} does: pass that, or "
                "leave shift_labels out (the model's loss decides)."
            )
        if found:
            self.shifted = found[0]
            return found[0]
        name = type(_unwrapped(model)).__name__
        values = " or ".join(f"{m:.6g}" for m in means.values())
        raise ValueError(
            f"JDTrainer's objectives do not reproduce {name}'s own loss ({value:.6g}; "
            f"the mean of the objectives' losses is {values}, "
            "labels shifted or not): its loss has other terms (MoE router losses with "
            "output_router_logits=True?) or another form, which the objectives would leave "
            "out. Turn those terms off, or override compute_loss to return "
            "self.jd_loss(losses) with one loss per objective."
        )


def _same_gradients(
    own: Tensor, logits: Tensor, labels: Tensor, problem: str | None, alignments: list[bool]
) -> list[bool] | None:
    """The ``alignments`` whose token mean has the gradient of ``own`` w.r.t. ``logits``, or
    ``None`` where ``own`` has none (no graph, or ``logits`` a copy of what it read)."""
    if not (own.requires_grad and logits.requires_grad):
        return None
    expected = torch.autograd.grad(own, logits, retain_graph=True, allow_unused=True)[0]
    if expected is None:
        return None
    tolerance = _GRAD_RTOL * float(expected.abs().max())
    found = []
    for shifted in alignments:
        with torch.enable_grad():
            mean = objective_losses(logits, labels, "token", shifted, problem_type=problem)
        grad = torch.autograd.grad(mean.mean(), logits, retain_graph=True)[0]
        if float((grad - expected).abs().max()) <= tolerance:
            found.append(shifted)
    return found


def objective_losses(
    logits: Tensor,
    labels: Tensor,
    objectives: Objectives,
    causal: bool,
    label_smoothing: float = 0.0,
    problem_type: str | None = None,
    segments: Tensor | None = None,
) -> Tensor:
    """Per-objective losses of a batch (see the module docstring); ``label_smoothing``: as
    ``TrainingArguments.label_smoothing_factor`` (``(1 − ε)·NLL + ε·mean_k(−log p_k)``);
    ``problem_type``: as a classifier's ``config.problem_type`` (``None``: inferred as
    Hugging Face's classifiers do, from the outputs' count and the labels' dtype);
    ``segments``: ``[B, T]``, which sequence of its row each token belongs to (packed rows;
    ``None``: one sequence per row), for ``"sequence"`` objectives."""
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
    if segments is None:
        counts = valid.sum(dim=1)
        keep = counts > 0
        return (tokens * valid).sum(dim=1)[keep] / counts[keep]
    seg = segments[:, 1:] if causal else segments  # (each label's sequence)
    rows = torch.arange(seg.shape[0], device=seg.device).unsqueeze(1)
    ids = (rows * (int(seg.max()) + 1) + seg)[valid]
    keys, index = torch.unique(ids, return_inverse=True)  # (by row, then sequence)
    sums = tokens.new_zeros(len(keys)).index_add_(0, index, tokens[valid])
    counts = torch.bincount(index, minlength=len(keys))
    return sums / counts


def _segments(model: nn.Module, inputs: dict[str, Any], labels: Tensor) -> Tensor | None:
    """``[B, T]`` sequence ids of packed rows: from ``position_ids`` (a sequence starts where
    they restart at 0), else from ``cu_seq_lens_q`` (the flattened batch's boundaries); none
    for encoder-decoders (their inputs' positions are not their labels')."""
    if getattr(getattr(_unwrapped(model), "config", None), "is_encoder_decoder", False):
        return None
    positions = inputs.get("position_ids")
    if isinstance(positions, Tensor) and positions.shape == labels.shape:
        return (positions == 0).cumsum(dim=1)
    bounds = inputs.get("cu_seq_lens_q")
    if isinstance(bounds, Tensor) and labels.ndim == 2:
        flat = torch.arange(labels.numel(), device=labels.device)
        return torch.bucketize(flat, bounds.to(labels.device)[1:], right=True).view_as(labels)
    return None


_PROBLEMS = ("regression", "single_label_classification", "multi_label_classification")
# The model's own loss against the objectives' mean, and their gradients w.r.t. the logits
# (the same float32 maths; gradients in the logits' dtype, 16-bit ones rounded: 2e-2).
_LOSS_RTOL = 1e-5
_GRAD_RTOL = 2e-2


def _trainer_shifts(model: nn.Module) -> bool:
    """Whether ``Trainer``'s label smoother shifts the labels: the causal LM classes by name."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # (another layout of transformers)
        return _causal(model)
    return type(_unwrapped(model)).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


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
