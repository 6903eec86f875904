"""``PartialJDOptimizer``: partial Jacobian descent around any ``torch.optim`` optimizer."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._autograd import AutogradGramian, ClosedGramian
from ._checks import (
    as_weighting,
    check_base_step,
    check_ddp,
    check_losses,
    check_modes,
    check_task_losses,
)
from ._distributed import refuse, step_ranks
from ._engine import GramianSource, HookedGramian
from ._groups import check_disjoint, check_optimized, considered_names, considered_of
from ._info import Status, StepInfo
from ._pass import Pass, WeightedMean, full_precision
from ._plain import PlainSteps
from ._wrapper import WrappedOptimizer
from .weightings import UPGrad, Weighting

Losses = Tensor | Sequence[Tensor]  # per-instance losses, or task losses (one scalar each)
GramianMode = Literal["hooks", "autograd"]
Distributed = Literal["local", "global", "none"]
NonFinite = Literal["raise", "skip"]


class PartialJDOptimizer(PlainSteps, WrappedOptimizer):
    r"""Partial Jacobian descent: resolves conflicts between per-instance losses, then lets
    ``base`` update the parameters.

    With ``ℓ = (ℓ_1, …, ℓ_m)`` the losses and ``J`` their Jacobian w.r.t. the *considered*
    parameters, one step is

    .. math::
        G = J J^\top, \qquad w = \mathrm{weighting}(G), \qquad
        \theta.\mathrm{grad} \mathrel{+}= \textstyle\sum_i w_i \nabla_\theta \ell_i
        \ \text{for every trainable } \theta, \qquad \texttt{base.step()}.

    ``G`` is computed from module hooks (the considered modules' inputs and output gradients)
    without per-sample gradients where a closed form exists. Where the graph makes it exact
    (``last_step.resumed``), the weighted gradient is book-kept from the same factors and the
    trunk's backward resumes at the considered part's boundary; elsewhere the step runs
    ``losses.backward(w)``. The wrapper leaves ``base`` as it was built: ``param_groups``,
    ``state``, ``defaults`` and checkpoints are the base's, schedulers built on either keep
    working, and attributes the wrapper does not define are the base's.

    Args:
        base: any ``torch.optim.Optimizer`` over the model's trainable parameters.
        model: the module whose forward produces the losses; its modules that own considered
            parameters are hooked.
        weighting: maps the ``[m, m]`` Gramian to ``[m]`` weights (default :class:`UPGrad`).
        considered: modules or parameters whose Jacobian gives the Gramian (usually the last
            layers), in addition to those of groups flagged ``"considered": True``.
        gramian_mode: ``"hooks"`` (default, fast) or ``"autograd"``: one backward per loss, exact
            even for models that mix samples (BatchNorm in train mode), and slow.
        distributed: with ``torch.distributed`` (e.g. ``model`` wrapped in
            ``DistributedDataParallel``), ``"local"`` (default): each rank weights its own samples
            by its own Gramian and DDP averages the ranks' JD directions; ``"global"``: the
            Gramian of the whole global batch is assembled by all-gathering the considered
            layers' inputs and output gradients, every rank solves the same problem and applies
            its slice of the weights (times the world size, for DDP's averaging), so the update
            equals single-process JD on the concatenated batch. ``"global"`` needs 1-D losses
            and equal shapes on every rank. ``"none"``: no collective at all, for a model this
            rank trains alone (the others do not step it) while a process group exists.
        nonfinite: NaN/inf losses or Gramian in ``step(losses)``: ``"raise"`` (default) a
            ``ValueError``, or ``"skip"`` the step (``skipped_steps`` counts them); nothing
            changes either way. ``backward(losses)`` leaves non-finite gradients instead, as
            ``Tensor.backward`` would, so that ``GradScaler`` skips the step and backs off; a
            plain ``step()`` on such gradients raises or skips likewise.

    Example::

        base = SGD(model.parameters(), lr=0.1)
        optimizer = PartialJDOptimizer(base, model, considered=model[2:])
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
        weighting = as_weighting(UPGrad() if weighting is None else weighting)
        check_modes(gramian_mode, distributed, nonfinite)
        check_base_step(base)
        check_ddp(model, distributed)
        check_disjoint(base.param_groups)
        params = considered_of(base.param_groups, [] if considered is None else considered)
        if not params:
            raise ValueError(
                "No parameter is considered: pass considered=[module, ...] (usually the last "
                'layers), or flag groups of the base optimizer with "considered": True.'
            )
        source = _open_source(gramian_mode, model, params)  # (checks the plan, then hooks)
        try:
            check_optimized(base.param_groups, params)
        except ValueError:
            source.close()  # nothing stays changed
            raise
        super().__init__(base)
        self.model = model
        self.weighting = weighting
        self.gramian_mode: GramianMode = gramian_mode
        self.distributed: Distributed = distributed
        self.nonfinite: NonFinite = nonfinite
        self._considered = params
        self._status = Status(source)
        source.finalize_with(self)

    @property
    def last_step(self) -> StepInfo | None:
        """What the last Jacobian-descent backward computed (``None`` before, or after a
        non-finite one)."""
        return self._status.last_step

    @property
    def skipped_steps(self) -> int:
        """Steps skipped on non-finite losses or Gramian (``nonfinite="skip"``)."""
        return self._status.skipped_steps

    def considered_parameters(self) -> list[Tensor]:
        """The parameters whose Jacobian enters the Gramian."""
        return list(self._considered)

    # -- the step ---------------------------------------------------------------------------------
    def backward(self, losses: Losses) -> Tensor:
        """Accumulate ``Σ_i w_i ∇ℓ_i`` into ``.grad`` of every trainable parameter; return ``w``.

        ``losses``: per-instance losses (a tensor), or task losses (a list of scalars; see the
        class docstring). No update. Called several times before :meth:`step`, it accumulates,
        each call weighted by its own Gramian. On an error nothing (parameters, ``.grad``,
        state) has changed. Non-finite losses or Gramian (a ``GradScaler`` overflow) give
        non-finite gradients and ``NaN`` weights, so that ``GradScaler`` skips the step;
        ``step()`` refuses them.
        """
        weights = self._jd_backward(losses, stop_on_nonfinite=False)
        assert weights is not None
        return weights

    def weighted_loss(self, losses: Tensor) -> Tensor:
        """A scalar whose value is ``losses.mean()`` (for logs) and whose gradient is the
        Jacobian-descent direction ``Σ_i w_i ∇ℓ_i`` (the weights detached): for code whose
        backward call must stay as it is (``loss.backward()``, ``scaler.scale(loss).backward()``,
        ``accelerator.backward(loss)``, Lightning's automatic optimisation).

        The Gramian and the weights are computed now (``last_step``), on the graph, which stays
        whole for the caller's backward; then :meth:`step` (with no losses, or with a closure
        returning this scalar) steps without a warning. Where the forward ran in float16 (autocast)
        the Gramian's passes run on scaled losses (as a ``GradScaler`` would), so they do not
        underflow.
        Non-finite losses or Gramian give ``NaN`` weights: the caller's backward then leaves
        non-finite gradients, which ``GradScaler`` skips and :meth:`step` refuses or skips.
        Task losses cannot be one scalar's gradient (their heads take the plain sum): use
        ``step([loss_1, ...])``.
        """
        if isinstance(losses, (list, tuple)):
            raise ValueError(
                "weighted_loss takes per-instance losses (a tensor). Task losses cannot be "
                "weighted into one scalar (the heads after the considered part take the plain sum "
                "of the task gradients): call optimizer.step([loss_1, ...]) instead."
            )
        jd = self._begin(losses, keep_graph=True)
        kind = losses.device.type  # (the forward may also have run in float16 before the call)
        now = torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.float16
        half = losses.dtype == torch.float16 or now or self._status.source.ran_in_half()
        start = time.perf_counter()
        with full_precision(losses):
            gramian, finite = self._scaled_gramian(jd, losses) if half else jd.gramian()
            middle = time.perf_counter()
            weights = self._weigh(gramian, finite, False, jd.ranks)
        assert weights is not None
        info = StepInfo(
            gramian.detach(),
            weights,
            gramian_seconds=middle - start,
            weighting_seconds=time.perf_counter() - middle,
            received_bytes=jd.received_bytes,
            check_seconds=jd.check_seconds,
        )
        status = self._status
        status.last_step = info if finite else None
        status.weighted = True
        status.weighted_nonfinite = status.weighted_nonfinite or not finite
        loss: Tensor = WeightedMean.apply(losses, jd.applied(weights))
        return loss

    def _scaled_gramian(self, jd: Pass, losses: Tensor) -> tuple[Tensor, bool]:
        """``jd``'s Gramian in float16: from losses scaled by ``2^16``, else ``2^8``, else 1 (the
        first that stays finite), divided back (exactly: powers of two), as a GradScaler would."""
        for exponent in (16, 8, 0):
            scaled = self._begin(losses * 2.0**exponent, keep_graph=True)
            gramian, finite = scaled.gramian()
            if finite or exponent == 0:
                jd.check_seconds = scaled.check_seconds
                return gramian / 4.0**exponent, finite
        raise AssertionError("unreachable")

    def _jd_backward(self, losses: Losses, stop_on_nonfinite: bool) -> Tensor | None:
        """The Jacobian-descent backward: Gramian → weights → weighted gradient into ``.grad``.
        Returns this rank's weights, or ``None`` when a non-finite step was skipped."""
        jd = self._begin(losses)  # (a clear error for bad losses; nothing has changed)
        start = time.perf_counter()
        with full_precision(jd.objectives):
            gramian, finite = jd.gramian()  # (refused here if the rows mix losses)
            middle = time.perf_counter()
            weights = self._weigh(gramian, finite, stop_on_nonfinite, jd.ranks)
        if weights is None:
            return None
        end = time.perf_counter()
        taken, nonfinite = self._guarded_backward(jd, weights, finite, stop_on_nonfinite)
        if not taken:
            return None
        info = StepInfo(
            gramian.detach(),
            weights,
            gramian_seconds=middle - start,
            weighting_seconds=end - middle,
            received_bytes=jd.received_bytes,
            resumed=jd.resumed,
            check_seconds=jd.check_seconds,
        )
        self._record(info, finite and nonfinite is None)
        return jd.own(weights)

    def _begin(self, losses: Losses, keep_graph: bool = False) -> Pass:
        """The pass of this backward (per-instance or task losses), after checking them."""
        source = self._status.source
        ranks = step_ranks(self.model, self.distributed)  # (decided once: the pass carries them)
        try:
            if isinstance(losses, (list, tuple)):
                return source.begin_tasks(check_task_losses(losses), self._trainable(), ranks)
            check_ddp(self.model, self.distributed)  # (_set_static_graph() may come later)
            check_losses(losses)
            assert isinstance(losses, Tensor)
            if not any(p.requires_grad for p in self._considered):
                raise ValueError(
                    "Every considered parameter is frozen (requires_grad=False, set after the "
                    "optimizer was built): unfreeze some, build a new PartialJDOptimizer that "
                    "considers trainable parameters, or call loss.backward() and step() for a "
                    "plain step. Nothing was changed."
                )
            return source.begin(losses, ranks, keep_graph)
        except (ValueError, TypeError):  # (the other ranks wait for this one's word: it refuses)
            refuse(self._considered[0].device, ranks)
            raise

    def _refuse_everywhere(self) -> None:
        """This rank refuses the step before opening its pass: the other ranks' agreement hears
        so (they refuse too)."""
        refuse(self._considered[0].device, step_ranks(self.model, self.distributed))

    def _trainable(self) -> list[Tensor]:
        params = {id(p): p for p in (*self.model.parameters(), *self._group_parameters())}
        return [p for p in params.values() if p.requires_grad]

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Tensor | Callable[[], Tensor]) -> Tensor: ...

    @overload
    def step(
        self, closure: Sequence[Tensor] | Callable[[], Sequence[Tensor]]
    ) -> Sequence[Tensor]: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @overload
    def step(self, closure: Callable[[], None]) -> None: ...

    @overload
    def step(self, closure: Callable[[], Tensor | None]) -> Tensor | None: ...

    def step(
        self,
        closure: Losses | Callable[[], Losses | None] | Callable[[], float] | None = None,
    ) -> Losses | float | None:
        """``step(losses)``: one Jacobian-descent step (Gramian → weights → weighted backward →
        ``base.step()``); returns ``losses``. ``step(closure)``: the closure returns the losses;
        a closure that calls :meth:`backward` itself (returning ``None``, as Lightning's, or its
        losses, as torch's closures return theirs) is called, then ``step()``. ``step()``: a
        plain ``base.step()`` on the gradients already in ``.grad`` (e.g. from :meth:`backward`,
        called by ``GradScaler.step``)."""
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            return self._step(closure)

    def _step(
        self, closure: Losses | Callable[[], Losses | None] | Callable[[], float] | None
    ) -> Losses | float | None:
        args = () if closure is None else (closure,)  # (what the step hooks receive)
        if closure is None:
            self._plain_step(args)
            return None
        if isinstance(closure, (Tensor, list, tuple)):
            losses: Losses = closure
        elif callable(closure):
            before = self._status.backwards
            with torch.enable_grad():
                result = closure()
            if result is None or (isinstance(result, Tensor) and self._status.backwards > before):
                self._plain_step(args)  # (the closure ran optimizer.backward(losses) itself)
                return result
            if isinstance(result, Tensor) and result.ndim == 0 and self._status.weighted:
                self._plain_step(args)  # the scalar of a weighted_loss, whose backward ran
                return result
            if not isinstance(result, (Tensor, list, tuple)):
                self._refuse_everywhere()
                raise TypeError(
                    "The closure must return the per-instance losses (a tensor), the task "
                    "losses (a list), the scalar of optimizer.weighted_loss(losses) after its "
                    "backward, or None after calling optimizer.backward(losses) itself; got "
                    f"{type(result).__name__}."
                )
            losses = result
        else:
            self._refuse_everywhere()
            raise TypeError(
                "step() takes the per-instance losses (a Tensor), task losses (a list of scalar "
                f"tensors), a closure returning them, or nothing; got {type(closure).__name__}."
            )
        if self._jd_backward(losses, stop_on_nonfinite=True) is not None:
            self._status.pending = False
            if self._finite_or_refused():  # (an earlier backward(losses) may have overflowed)
                self._base_step(args)
        return losses

    # -- plumbing (the rest is the base optimizer's, see ``WrappedOptimizer``) ---------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base's ``zero_grad``. Between ``backward(losses)`` and ``step()`` it clears the
        Jacobian-descent gradient: that ``step()`` then warns."""
        super().zero_grad(set_to_none=set_to_none)
        status = self._status
        status.read_grads = False
        if status.pending:
            status.cleared = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer. Its parameters are not considered (the considered
        modules are hooked at construction: build a new wrapper to consider more)."""
        if "base" in self.__dict__ and param_group.get("considered"):  # (not in Optimizer.__init__)
            raise ValueError(
                "add_param_group cannot add considered parameters after construction (their "
                "modules are hooked then). Build a new PartialJDOptimizer instead."
            )
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        """As torch's optimizers: picklable and deep-copyable (the copy hooks its own model), an
        LR scheduler attached or not. As ``Optimizer.__getstate__``, torch's per-instance plumbing
        is left out (``Optimizer.__setstate__`` makes it anew, without hooks): a scheduler's patch
        of ``step`` (a closure, not picklable) and its flag, and the step and state-dict hooks."""
        state = self._picklable_state()
        closed = isinstance(self._status.source, ClosedGramian)
        state["_status"] = (closed, self._status.last_step, self._status.skipped_steps)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        closed, last_step, skipped_steps = state.pop("_status")
        super().__setstate__(state)
        if closed:
            source: GramianSource = ClosedGramian()
        else:
            source = _open_source(self.gramian_mode, self.model, self._considered)
            source.finalize_with(self)
        self._status = Status(source, last_step, skipped_steps)

    def close(self) -> None:
        """Remove the hooks from the model. A plain ``step()`` still works; a Jacobian-descent
        step raises."""
        self._status.source.close()
        self._status.source = ClosedGramian()

    def __enter__(self) -> PartialJDOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        """As torch's optimizers (the base's groups and options), with what the wrapper adds:
        the weighting, the modes and the considered modules by name."""
        names = considered_names(self.model, self._considered)
        lines = [
            f"PartialJDOptimizer over {self.base!r}",
            f"  weighting: {self.weighting!r}",
            f"  considered: {', '.join(names)}",
            f"  gramian_mode: {self.gramian_mode!r}, distributed: {self.distributed!r}, "
            f"nonfinite: {self.nonfinite!r}",
        ]
        return "\n".join(lines)


def _open_source(mode: GramianMode, model: nn.Module, considered: list[Tensor]) -> GramianSource:
    """The Gramian source of ``gramian_mode`` (the one place that chooses it)."""
    if mode == "autograd":
        return AutogradGramian(considered)
    return HookedGramian(model, considered)  # (raises if a parameter is not in `model`)
