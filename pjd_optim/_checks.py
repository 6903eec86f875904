"""Input checks of the step: each raises a clear error before anything changes."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .gramian._sharded import is_sharded
from .weightings import Weighting


def check_modes(gramian_mode: str, distributed: str, nonfinite: str) -> None:
    """The wrapper's string options, each one of its values, and the combination allowed."""
    if gramian_mode not in ("hooks", "autograd"):
        raise ValueError(f"gramian_mode must be 'hooks' or 'autograd', got {gramian_mode!r}.")
    if distributed not in ("local", "global", "none"):
        raise ValueError(f"distributed must be 'local', 'global' or 'none', got {distributed!r}.")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}.")
    if distributed == "global" and gramian_mode != "hooks":
        raise ValueError("distributed='global' needs gramian_mode='hooks'.")


def check_ddp(model: nn.Module, distributed: str) -> None:
    """``DistributedDataParallel(static_graph=True)`` is refused: its delayed all-reduce runs at
    the end of every backward through the model, the step's collection passes included, and
    reduces gradients the step did not make (silently wrong by 10x and more). So is
    ``distributed="none"`` (no agreement between ranks) on a DDP model, whose backward every rank
    must join."""
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    if distributed == "none":
        raise ValueError(
            "distributed='none' is for a model that one rank trains alone; this model is "
            "wrapped in DistributedDataParallel, whose backward every rank joins: use "
            "distributed='local' or 'global'. Nothing was changed."
        )
    if getattr(model, "static_graph", False):
        raise ValueError(
            "DistributedDataParallel(static_graph=True) is not supported: its delayed "
            "all-reduce runs after every backward through the model, the step's own passes "
            "included. Build DistributedDataParallel without static_graph. Nothing was changed."
        )


def check_base_step(base: torch.optim.Optimizer) -> None:
    """A base optimizer whose ``step`` needs a closure (LBFGS re-evaluates the loss within a
    step) cannot take one weighted gradient: refused."""
    try:
        closure = inspect.signature(base.step).parameters.get("closure")
    except (TypeError, ValueError):  # (no signature to read)
        return
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(
            f"{type(base).__name__}.step needs a closure: it re-evaluates the loss within a "
            "step (as LBFGS does), while a Jacobian-descent step weights one set of per-loss "
            "gradients. Wrap an optimizer that steps from .grad (SGD, Adam, ...)."
        )


def check_losses(losses: object) -> Tensor:
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


def check_task_losses(losses: Sequence[object]) -> list[Tensor]:
    """The task losses, or a clear error for what cannot be ``k`` scalar objectives."""
    if not losses:
        raise ValueError("The list of task losses is empty: pass one scalar loss per task.")
    checked: list[Tensor] = []
    for j, loss in enumerate(losses):
        if not isinstance(loss, Tensor):
            raise TypeError(f"Task losses are tensors; task loss {j} is a {type(loss).__name__}.")
        if loss.ndim != 0:
            raise ValueError(
                f"Task loss {j} has shape {tuple(loss.shape)}: task objectives are scalars (e.g. a "
                "mean over the batch). Per-instance losses go in one tensor: step(losses)."
            )
        if not loss.requires_grad:
            raise ValueError(f"Task loss {j} does not require grad: compute it with gradients on.")
        if not loss.is_floating_point():
            raise TypeError(f"Task loss {j} must be floating point, got {loss.dtype}.")
        checked.append(loss)
    return checked


def is_finite(gramian: Tensor, losses: Tensor) -> bool:
    # One host-device synchronisation for both checks.
    return bool(is_finite_tensor(gramian, losses))


def is_finite_tensor(gramian: Tensor, losses: Tensor) -> Tensor:
    """Whether both are finite, as a 0-d tensor (no synchronisation)."""
    return torch.isfinite(gramian).all() & torch.isfinite(losses.detach()).all()


def check_weights(weights: object, m: int, losses: Tensor) -> Tensor:
    if not isinstance(weights, Tensor) or weights.shape != (m,):
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(
            f"The weighting returned {shape}; it must return a tensor of shape ({m},) "
            "(one weight per loss)."
        )
    if not bool(torch.isfinite(weights).all()):
        raise ValueError("The weighting returned non-finite weights: nothing was changed.")
    return weights.to(losses.device)


def as_weighting(weighting: Any) -> Weighting:
    """``weighting`` as a Gramian → weights callable.

    TorchJD's Gramian-based aggregators (``UPGrad``, ``DualProj``, ...) map a *Jacobian* to a
    vector: they are replaced by their Gramian weighting, i.e. the weights they would apply.
    TorchJD's weightings and aggregators of the Jacobian itself cannot work from a Gramian and are
    refused; TorchJD's Gramian weightings are used as they are. A class (``UPGrad`` for
    ``UPGrad()``) is refused: calling it on the Gramian would build an object, not weights.
    """
    if isinstance(weighting, type):
        name = weighting.__name__
        raise TypeError(f"weighting={name} is a class: pass an instance, {name}().")
    names = {k.__name__ for k in type(weighting).__mro__}
    if type(weighting).__module__.startswith("torchjd."):
        if "GramianWeightedAggregator" in names:
            weighting = weighting.gramian_weighting
        elif "_GramianWeighting" not in names:
            raise TypeError(
                f"TorchJD's {type(weighting).__name__} works on the Jacobian, not on its Gramian: "
                "pass a Gramian weighting (e.g. pjd_optim.UPGrad() or "
                "torchjd.aggregation.UPGradWeighting(); for the mean, pjd_optim.Mean())."
            )
    if not callable(weighting):
        raise TypeError("weighting must be a callable mapping an [m, m] Gramian to [m] weights.")
    checked: Weighting = weighting
    return checked


def nonfinite_gradient(params: Iterable[Tensor]) -> tuple[Tensor, Tensor] | None:
    """A parameter whose ``.grad`` holds NaN or inf on this process (a sharded gradient: in its
    local shard), with that gradient (``None`` if every one is finite): fused 2-norms (one host
    read), then, only for those not finite (NaN or inf entries, or an overflow of the norm), an
    exact check."""
    owners: list[tuple[Tensor, Tensor]] = []
    values: list[Tensor] = []
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        local = grad.to_local() if is_sharded(grad) else grad  # type: ignore[attr-defined]
        local = local.coalesce().values() if local.is_sparse else local
        if local.numel():
            owners.append((p, grad))
            values.append(local)
    if not values:
        return None
    norms = torch._foreach_norm(values)
    device = norms[0].device
    finite = torch.stack([x.to(device, non_blocking=True) for x in norms]).isfinite()
    if bool(finite.all()):
        return None
    suspects: list[int] = (~finite).nonzero()[:, 0].tolist()
    for k in suspects:
        if not bool(values[k].isfinite().all()):
            return owners[k]
    return None


class RestoreGradsOnError:
    """Snapshot ``.grad`` of ``params``; restore it if the block raises."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        self.params = list({id(p): p for p in params}.values())
        self.saved: list[Tensor | None] = []

    def __enter__(self) -> None:
        self.saved = [None if p.grad is None else p.grad.clone() for p in self.params]

    def __exit__(self, kind: object, *rest: object) -> None:
        if kind is not None:
            for p, grad in zip(self.params, self.saved, strict=True):
                p.grad = grad


def check_hookable(plan: Mapping[nn.Module, object], names: Mapping[int, str]) -> None:
    """The planned modules take forward hooks (TorchScript modules do not)."""
    scripted = [names[id(m)] for m in plan if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise ValueError(
            f"Considered modules {scripted} are TorchScript modules, which take no forward "
            "hooks: consider the eager modules (before torch.jit.script), or pass "
            "gramian_mode='autograd'."
        )


def check_planned(
    plan: Mapping[nn.Module, Mapping[str, Tensor]], param_names: Mapping[int, str]
) -> None:
    """The planned parameters are still their modules' own, without gradient hooks."""
    replaced, hooked = [], []
    for module, own in plan.items():
        for name, p in own.items():
            try:
                current = module.get_parameter(name)
            except AttributeError:  # (a parametrization added since: no Parameter there)
                current = None
            # (FSDP2 registers a sharded parameter's unsharded tensor while it is unsharded:
            # after a forward with reshard_after_forward=False, as its root module does)
            swapped = (
                current is not None
                and is_sharded(p)
                and not is_sharded(current)
                and current.shape == p.shape
            )
            if current is not p and not swapped:
                replaced.append(param_names[id(p)])
            elif p.requires_grad and p._backward_hooks:
                hooked.append(param_names[id(p)])
    if replaced:
        raise ValueError(
            f"Considered parameters {replaced} were replaced after the optimizer was built "
            "(a new Parameter, or a parametrization added): the optimizers hold the old "
            "ones. Build a new PartialJDOptimizer, with its base optimizer, over the new "
            "parameters. Nothing was changed."
        )
    if hooked:
        raise ValueError(
            f"Considered parameters {hooked} have gradient hooks (Tensor.register_hook): "
            "autograd applies them to .grad, but the Gramian comes from the modules' inputs "
            "and output gradients and cannot see them. Remove the hooks (to train part of a "
            "weight, mask its update after step()) or pass gramian_mode='autograd'. Nothing "
            "was changed."
        )
