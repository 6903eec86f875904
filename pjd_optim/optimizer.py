"""``PartialJDOptimizer``: partial Jacobian descent around any ``torch.optim`` optimizer."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._distributed import CallGatherer, world
from ._engine import HookedGramian, autograd_gramian
from ._groups import (
    ParamGroup,
    check_disjoint,
    considered_parameters,
    parameters_of,
    split_considered,
)
from ._hooks import finalize_with
from .weightings import UPGrad, Weighting

GramianMode = Literal["hooks", "autograd"]
Distributed = Literal["local", "global"]
NonFinite = Literal["raise", "skip"]


@dataclass(frozen=True)
class StepInfo:
    """What the last :meth:`PartialJDOptimizer.backward` computed (detached).

    ``conflict`` is the fraction of pairs ``i < j`` with a negative cosine ``G_ij < 0`` and
    ``min_cosine`` the smallest ``G_ij / √(G_ii G_jj)`` (both over the considered parameters).
    ``gramian_seconds`` and ``weighting_seconds`` are host wall-clock times of the two stages
    (on CUDA, without synchronisation: they measure launch, not kernel, time). ``resumed``: the
    weighted gradient was book-kept and the trunk's backward resumed at the boundary.
    """

    gramian: Tensor
    weights: Tensor
    gramian_seconds: float = 0.0
    weighting_seconds: float = 0.0
    received_bytes: int = 0
    resumed: bool = False

    @property
    def cosines(self) -> Tensor:
        norms = self.gramian.diagonal().clamp_min(torch.finfo(self.gramian.dtype).tiny).sqrt()
        return self.gramian / norms.unsqueeze(0) / norms.unsqueeze(1)

    @property
    def conflict(self) -> float:
        m = self.gramian.shape[0]
        if m < 2:
            return 0.0
        upper = torch.triu(torch.ones(m, m, dtype=torch.bool, device=self.gramian.device), 1)
        return float((self.gramian[upper] < 0).float().mean())

    @property
    def min_cosine(self) -> float:
        return float(self.cosines.min())


class PartialJDOptimizer(Optimizer):
    r"""Partial Jacobian descent: resolves conflicts between per-instance losses, then lets
    ``base`` update the parameters.

    With ``ℓ = (ℓ_1, …, ℓ_m)`` the losses and ``J`` their Jacobian w.r.t. the *considered*
    parameters (groups flagged ``"considered": True``), one step is

    .. math::
        G = J J^\top, \qquad w = \mathrm{weighting}(G), \qquad
        \theta.\mathrm{grad} \mathrel{+}= \textstyle\sum_i w_i \nabla_\theta \ell_i
        \ \text{for every trainable } \theta, \qquad \texttt{base.step()}.

    ``G`` is computed from module hooks (the considered modules' inputs and output gradients,
    DESIGN.md §3) without per-sample gradients where a closed form exists. Where the graph
    makes it exact (``pjd_optim._resume``; ``last_step.resumed``), the weighted gradient is
    book-kept from the same factors and the trunk's backward resumes at the considered part's
    boundary; elsewhere the step runs ``losses.backward(w)``. The wrapper shares
    ``param_groups`` and ``state`` with ``base``, so schedulers, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` act on the base optimizer.

    Args:
        base: any ``torch.optim.Optimizer`` over the model's trainable parameters.
        model: the module whose forward produces the losses; its modules that own considered
            parameters are hooked.
        weighting: maps the ``[m, m]`` Gramian to ``[m]`` weights (default :class:`UPGrad`).
        considered: modules or parameters to consider, as an alternative to group flags: the base's
            groups are split so these sit in groups flagged ``"considered": True``, every
            hyper-parameter kept.
        gramian_mode: ``"hooks"`` (default, fast) or ``"autograd"``: one backward per loss, exact
            even for models that mix samples (BatchNorm in train mode), and slow.
        distributed: with ``torch.distributed`` (e.g. ``model`` wrapped in
            ``DistributedDataParallel``), ``"local"`` (default): each rank weights its own samples
            by its own Gramian and DDP averages the ranks' JD directions; ``"global"``: the
            Gramian of the whole global batch is assembled by all-gathering the considered
            layers' inputs and output gradients, every rank solves the same problem and applies
            its slice of the weights (times the world size, for DDP's averaging), so the update
            equals single-process JD on the concatenated batch. ``"global"`` needs 1-D losses
            and equal shapes on every rank.
        nonfinite: NaN/inf losses or Gramian: ``"raise"`` (default) a ``ValueError``, or
            ``"skip"`` the step like ``GradScaler`` does (nothing changes; ``skipped_steps``
            counts them).

    Example::

        base = SGD([{"params": model[0].parameters()},
                    {"params": model[2:].parameters(), "considered": True}], lr=0.1)
        optimizer = PartialJDOptimizer(base, model)
        losses = MSELoss(reduction="none")(model(x).squeeze(1), y)  # shape [B]
        optimizer.step(losses)
        optimizer.zero_grad()

    .. warning::
        With ``gramian_mode="hooks"``, ``losses[i]`` must depend only on row ``i`` (dim 0) of every
        considered module's inputs and outputs. BatchNorm in train mode between the considered
        modules and the losses is detected and refused; other cross-sample operations are not.
        Modules without a closed-form rule are re-run per sample by ``torch.func`` and must be
        deterministic (no active dropout inside them).
    """

    def __init__(
        self,
        base: Optimizer,
        model: nn.Module,
        *,
        weighting: Weighting | None = None,
        considered: Iterable[nn.Module | Tensor] | nn.Module | Tensor | None = None,
        gramian_mode: GramianMode = "hooks",
        distributed: Distributed = "local",
        nonfinite: NonFinite = "raise",
    ) -> None:
        if not isinstance(base, Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}.")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
        weighting = UPGrad() if weighting is None else weighting
        if not callable(weighting):
            raise TypeError(
                "weighting must be a callable mapping an [m, m] Gramian to [m] weights."
            )
        if gramian_mode not in ("hooks", "autograd"):
            raise ValueError(f"gramian_mode must be 'hooks' or 'autograd', got {gramian_mode!r}.")
        if distributed not in ("local", "global"):
            raise ValueError(f"distributed must be 'local' or 'global', got {distributed!r}.")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}.")
        if distributed == "global" and gramian_mode != "hooks":
            raise ValueError("distributed='global' needs gramian_mode='hooks'.")
        check_disjoint(base.param_groups)
        groups = split_considered(
            base.param_groups, parameters_of([] if considered is None else considered)
        )
        params = considered_parameters(groups)
        if not params:
            raise ValueError(
                "No parameter is considered: flag the groups of the last layers with "
                '{"params": ..., "considered": True}, or pass considered=[module, ...].'
            )
        engine = HookedGramian(model, params) if gramian_mode == "hooks" else None
        # Nothing above changed `base`; from here on the construction cannot fail.
        base.param_groups[:] = groups
        self.base = base
        self.model = model
        self.weighting = weighting
        self.gramian_mode: GramianMode = gramian_mode
        self.distributed: Distributed = distributed
        self.nonfinite: NonFinite = nonfinite
        self.skipped_steps = 0
        self._engine = engine
        self.last_step: StepInfo | None = None
        if engine is not None:
            finalize_with(self, engine.hooks)
        # torch.optim.Optimizer plumbing (hooks, profiler patching) without copying the groups.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # -- shared state: the base optimizer's groups, state and defaults --------------------------
    @property
    def param_groups(self) -> list[ParamGroup]:
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[ParamGroup]) -> None:
        self.base.param_groups = value

    @property
    def state(self) -> Any:
        return self.base.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base.defaults = value

    def considered_parameters(self) -> list[nn.Parameter]:
        """The parameters whose Jacobian enters the Gramian."""
        return considered_parameters(self.param_groups)

    # -- the step ---------------------------------------------------------------------------------
    def backward(self, losses: Tensor) -> Tensor:
        """Accumulate ``Σ_i w_i ∇ℓ_i`` into ``.grad`` of every trainable parameter; return ``w``.

        No update. Called several times before :meth:`step`, it accumulates, each call weighted
        by its own Gramian. On any error nothing (parameters, ``.grad``, state) has changed.
        """
        flat = _check_losses(losses)
        size, rank = world() if self.distributed == "global" else (1, 0)
        if size > 1 and losses.ndim != 1:
            raise ValueError("distributed='global' needs 1-D losses (one per sample).")
        gather = CallGatherer() if size > 1 else None
        start = time.perf_counter()
        # Resume the trunk's backward at the considered part's boundary where that is exact.
        resume = self._engine.resume_point(losses) if self._engine is not None else None
        if self._engine is not None:
            gramian = self._engine.gramian(losses, gather, resume)
        else:
            gramian = autograd_gramian(losses, self.considered_parameters())
        if not _is_finite(gramian, flat):
            if self.nonfinite == "skip":
                self.skipped_steps += 1
                self.last_step = None
                return torch.zeros_like(flat)
            raise ValueError(
                "Non-finite losses or Gramian (NaN or inf): nothing was changed. Check the data "
                "and the learning rate, skip this batch, or pass nonfinite='skip'."
            )
        middle = time.perf_counter()
        all_weights = _check_weights(self.weighting(gramian.detach()), gramian.shape[0], flat)
        end = time.perf_counter()
        m = flat.numel()
        weights = all_weights[rank * m : (rank + 1) * m]  # this rank's samples (all when size = 1)
        applied = (weights * size).to(flat.dtype)  # DDP averages the ranks' gradients
        with _restore_grads_on_error(self.model, self.param_groups):
            if resume is not None and self._engine is not None:
                self._engine.weighted_backward(resume, applied)
            else:
                torch.autograd.backward(flat, applied)
        self.last_step = StepInfo(
            gramian.detach(),
            all_weights.detach(),
            middle - start,
            end - middle,
            0 if gather is None else gather.received_bytes,
            resume is not None,
        )
        return weights

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Tensor | Callable[[], Tensor]) -> Tensor: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(
        self, closure: Tensor | Callable[[], Tensor] | Callable[[], float] | None = None
    ) -> Tensor | float | None:
        """``step(losses)``: one Jacobian-descent step (Gramian → weights → weighted backward →
        ``base.step()``); returns ``losses``. ``step(closure)``: the closure returns the losses.
        ``step()``: a plain ``base.step()`` on gradients already in ``.grad``."""
        if closure is None:
            self.base.step()
            return None
        if isinstance(closure, Tensor):
            losses = closure
        elif callable(closure):
            with torch.enable_grad():
                result = closure()
            if not isinstance(result, Tensor):
                raise TypeError(
                    "The closure must return the tensor of per-instance losses, "
                    f"got {type(result).__name__}."
                )
            losses = result
        else:
            raise TypeError(
                "step() takes the per-instance losses (a Tensor), a closure returning them, or "
                f"nothing; got {type(closure).__name__}."
            )
        skipped = self.skipped_steps
        self.backward(losses)
        if self.skipped_steps == skipped:
            self.base.step()
        return losses

    # -- torch.optim plumbing delegated to the base ----------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (so checkpoints are interchangeable with it)."""
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the base optimizer; ``param_groups`` stay the base's groups."""
        self.base.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer. A group flagged ``"considered"`` must use modules
        hooked at construction; add such groups by building a new wrapper."""
        if param_group.get("considered"):
            raise ValueError(
                "add_param_group cannot add considered parameters after construction (their "
                "modules are hooked then). Build a new PartialJDOptimizer instead."
            )
        self.base.add_param_group(param_group)

    def close(self) -> None:
        """Remove the hooks from the model. The optimizer can still do plain ``step()``."""
        if self._engine is not None:
            self._engine.hooks.remove()
            self._engine = None

    def __enter__(self) -> PartialJDOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"PartialJDOptimizer(base={type(self.base).__name__}, weighting={self.weighting!r}, "
            f"considered={len(self.considered_parameters())} tensors, "
            f"gramian_mode={self.gramian_mode!r})"
        )


def _check_losses(losses: object) -> Tensor:
    """The flattened losses, or a clear error for what cannot be per-instance losses."""
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"losses must be a Tensor of per-instance losses, got {type(losses).__name__}."
        )
    if losses.ndim == 0:
        raise ValueError(
            "losses is a scalar: pass the per-instance losses (e.g. a loss function with "
            "reduction='none', shape [batch]) instead of their mean."
        )
    if losses.numel() == 0:
        raise ValueError("losses is empty: the batch has no sample.")
    if not losses.requires_grad:
        raise ValueError(
            "losses do not require grad: compute them from a forward of the model with "
            "gradients enabled (not under torch.no_grad())."
        )
    if not losses.is_floating_point():
        raise TypeError(f"losses must be floating point, got {losses.dtype}.")
    return losses.flatten()


def _is_finite(gramian: Tensor, losses: Tensor) -> bool:
    # One host-device synchronisation for both checks.
    return bool(torch.isfinite(gramian).all() & torch.isfinite(losses.detach()).all())


def _check_weights(weights: object, m: int, losses: Tensor) -> Tensor:
    if not isinstance(weights, Tensor) or weights.shape != (m,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"The weighting returned {shape}; it must return a tensor of shape ({m},) "
            "(one weight per loss)."
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("The weighting returned non-finite weights: nothing was changed.")
    return weights.to(losses.device)


class _restore_grads_on_error:
    """Snapshot ``.grad`` of the model's and the groups' parameters; restore it on an exception."""

    def __init__(self, model: nn.Module, groups: list[ParamGroup]) -> None:
        params = {id(p): p for p in model.parameters()}
        params.update((id(p), p) for group in groups for p in group["params"])
        self.params = list(params.values())
        self.saved: list[Tensor | None] = []

    def __enter__(self) -> None:
        self.saved = [None if p.grad is None else p.grad.clone() for p in self.params]

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is not None:
            for p, grad in zip(self.params, self.saved, strict=True):
                p.grad = grad
