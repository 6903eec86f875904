r"""Weightings: callables mapping a Gramian ``G = J Jᵀ`` (``[m, m]``) to weights ``w`` (``[m]``).

The optimizer updates with ``Jᵀw``. Reference for UPGrad, DualProj and the dual-cone maths:
"Jacobian Descent for Multi-Objective Optimization", Quinton & Rey, arXiv:2406.16232.

Any callable with the signature ``(Tensor) -> Tensor`` is a :data:`Weighting`, including
TorchJD's weighting objects. Weights have the Gramian's dtype and device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from .solver import SolverOptions, compiled, plan, project_dual_cone, solve_lcp
from .solver._common import HOST_PATHS

_DEFAULT_OPTIONS = SolverOptions()
_NOT_FINITE = "The Gramian contains NaN or infinite values (non-finite losses?)."

__all__ = ["MGDA", "DualProj", "Mean", "UPGrad", "Weighting"]


Array = NDArray[np.float64]
# The DAQP path's weights from (G, shift, preference, options) on G + shift·I, or None.
HostWeights = Callable[[Array, float, Array, SolverOptions], Array | None]


@functools.lru_cache(maxsize=64)
def _uniform_on_host(options: SolverOptions, m: int) -> Array | None:
    """The uniform preference ``1/m`` (read-only, shared by the calls) if CPU problems of size
    ``m`` take the DAQP path under ``options``, else ``None``; kept per options and size, as
    planning costs about a tenth of a small solve."""
    if options.dtype != torch.float64:
        return None
    if plan(torch.device("cpu"), torch.float64, m, options) not in HOST_PATHS:
        return None
    uniform = np.full(m, 1.0 / m)
    uniform.flags.writeable = False
    return uniform


@runtime_checkable
class Weighting(Protocol):
    """``Callable[[Tensor], Tensor]``: a ``[m, m]`` Gramian to ``[m]`` weights."""

    def __call__(self, gramian: Tensor, /) -> Tensor: ...


class Mean:
    """``w = 1/m``: the gradient of the mean loss (plain gradient descent)."""

    def __call__(self, gramian: Tensor, /) -> Tensor:
        m = _check_gramian(gramian, check_finite=False)
        return torch.full((m,), 1.0 / max(m, 1), dtype=gramian.dtype, device=gramian.device)

    def __repr__(self) -> str:
        return "Mean()"


class _Projecting:
    """Shared parameters: preference vector, TorchJD's normalisation/regularisation, and the
    solver's options (``pjd_optim.solver.SolverOptions``; its defaults suit every device)."""

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
        *,
        solver: SolverOptions | None = None,
    ) -> None:
        if pref_vector is not None and pref_vector.ndim != 1:
            raise ValueError(
                f"pref_vector must be a 1-D tensor, got shape {tuple(pref_vector.shape)}."
            )
        if not norm_eps >= 0.0 or not reg_eps >= 0.0:
            raise ValueError(f"norm_eps and reg_eps must be >= 0, got {norm_eps}, {reg_eps}.")
        self.pref_vector = pref_vector
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)
        self.solver = solver

    def _pref(self, G: Tensor) -> Tensor:
        m = G.shape[0]
        if self.pref_vector is None:
            return torch.full((m,), 1.0 / max(m, 1), dtype=G.dtype, device=G.device)
        if self.pref_vector.shape != (m,):
            raise ValueError(
                f"pref_vector has shape {tuple(self.pref_vector.shape)} but the Gramian is "
                f"[{m}, {m}]: it must have shape [{m}]."
            )
        return self.pref_vector.detach().to(dtype=G.dtype, device=G.device)

    @property
    def _options(self) -> SolverOptions:
        return self.solver or _DEFAULT_OPTIONS

    def _on_host(self, gramian: Tensor, weights: HostWeights) -> Tensor | None:
        """Small CPU problems that the DAQP path takes, in NumPy end to end (after compiled
        code a torch operation costs 10–25 µs, the solve 100 µs at ``m = 16``): ``weights``
        (:func:`pjd_optim.solver.compiled.upgrad` or ``dualproj``) on ``G + reg_eps·tr(G)·I``,
        proportional to the normalised and regularised Gramian. ``None`` where this does not
        apply (also ``tr(G) < norm_eps``, or DAQP declines): the caller's general path."""
        if not (isinstance(gramian, Tensor) and gramian.is_cpu and gramian.is_floating_point()):
            return None
        shape = gramian.shape
        if len(shape) != 2 or shape[0] != shape[1] or shape[0] == 0:
            return None
        uniform = _uniform_on_host(self._options, shape[0])
        if uniform is None:
            return None
        G = gramian.detach() if gramian.requires_grad else gramian
        G_np: Array = (G if G.dtype == torch.float64 else G.to(torch.float64)).numpy()
        if not np.isfinite(G_np).all():
            raise ValueError(_NOT_FINITE)
        trace = float(G_np.trace())
        if not (trace >= self.norm_eps and trace > 0.0):
            return None
        pref = uniform if self.pref_vector is None else self._pref(torch.from_numpy(G_np)).numpy()
        w = weights(G_np, self.reg_eps * trace, pref, self._options)
        if w is None:
            return None
        out = torch.from_numpy(w)
        return out if gramian.dtype == torch.float64 else out.to(gramian.dtype)

    def _regularised(self, gramian: Tensor) -> Tensor:
        return normalise_and_regularise(gramian.detach(), self.norm_eps, self.reg_eps)

    def __repr__(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return (
            f"{type(self).__name__}(pref_vector={pref}, norm_eps={self.norm_eps}, "
            f"reg_eps={self.reg_eps})"
        )


class UPGrad(_Projecting):
    r"""Unconflicting projection of gradients (arXiv:2406.16232, Algorithm 1 / Proposition 1).

    With ``G̃ = G / tr(G) + reg_eps·I`` (zeros instead of ``G / tr(G)`` when
    ``tr(G) < norm_eps``) and ``p`` the preference vector (default ``1/m``)::

        v⁽ⁱ⁾ = argmin_v vᵀ G̃ v  s.t.  v ≥ p_i e_i,        w = Σ_i v⁽ⁱ⁾.

    All ``m`` QPs are solved together, exactly, by :func:`pjd_optim.solver.project_dual_cone`;
    numbers match TorchJD's ``UPGradWeighting`` (same normalisation and defaults).
    """

    def __call__(self, gramian: Tensor, /) -> Tensor:
        w = self._on_host(gramian, compiled.upgrad)
        if w is not None:
            return w
        _check_gramian(gramian)
        G = self._regularised(gramian.to(torch.float64))
        pref = self._pref(G)
        return project_dual_cone(G, torch.diag(pref), self.solver).sum(dim=0).to(gramian.dtype)


class DualProj(_Projecting):
    r"""Projection of the preferred direction onto the dual cone (arXiv:2406.16232, §5).

    ``w = argmin_v vᵀ G̃ v  s.t.  v ≥ p`` with ``G̃`` and ``p`` as in :class:`UPGrad`.
    """

    def __call__(self, gramian: Tensor, /) -> Tensor:
        v = self._on_host(gramian, compiled.dualproj)
        if v is not None:
            return v
        _check_gramian(gramian)
        G = self._regularised(gramian.to(torch.float64))
        pref = self._pref(G)
        return project_dual_cone(G, pref.unsqueeze(0), self.solver)[0].to(gramian.dtype)


class MGDA:
    r"""Minimum-norm point of the convex hull of the gradients (Désidéri 2012; MGDA).

    ``w = argmin_{w ≥ 0, Σw = 1} wᵀ G̃ w`` with ``G̃`` as in :class:`UPGrad`. Solved exactly:
    the KKT conditions ``G̃w = μ1 + λ``, ``λ ≥ 0``, ``λ ⊙ w = 0`` become, with ``z = w / μ``, the
    LCP ``z ≥ 0``, ``G̃z − 1 ≥ 0``, ``zᵀ(G̃z − 1) = 0``; then ``w = z / Σz``.
    ``reg_eps > 0`` keeps ``G̃`` positive definite.
    """

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> None:
        if not norm_eps >= 0.0 or not reg_eps > 0.0:
            raise ValueError(
                f"MGDA needs norm_eps >= 0 and reg_eps > 0, got {norm_eps}, {reg_eps}."
            )
        self.norm_eps = float(norm_eps)
        self.reg_eps = float(reg_eps)

    def __call__(self, gramian: Tensor, /) -> Tensor:
        m = _check_gramian(gramian)
        G = normalise_and_regularise(
            gramian.detach().to(torch.float64), self.norm_eps, self.reg_eps
        )
        z = solve_lcp(G, torch.full((1, m), -1.0, dtype=G.dtype, device=G.device))[0]
        return (z / z.sum()).to(gramian.dtype)

    def __repr__(self) -> str:
        return f"MGDA(norm_eps={self.norm_eps}, reg_eps={self.reg_eps})"


def normalise_and_regularise(gramian: Tensor, norm_eps: float, reg_eps: float) -> Tensor:
    """``G / tr(G) + reg_eps·I``, with zeros for ``G / tr(G)`` when ``tr(G) < norm_eps`` or
    ``tr(G) = 0``.

    Same as TorchJD's ``regularize(normalize(G, norm_eps), reg_eps)``, except a zero Gramian with
    ``norm_eps=0`` (``0/0``: TorchJD's weights are NaN); no host sync.
    """
    trace = gramian.diagonal().sum()
    small = (trace < norm_eps) | (trace == 0)
    scaled = torch.where(small, torch.zeros_like(gramian), gramian / trace)
    eye = torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)
    return scaled + reg_eps * eye


def _check_gramian(gramian: Tensor, *, check_finite: bool = True) -> int:
    """Validate a ``[m, m]`` floating Gramian; returns ``m``. One sync for the finiteness check."""
    if not isinstance(gramian, Tensor):
        raise TypeError(f"The Gramian must be a torch.Tensor, got {type(gramian).__name__}.")
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"The Gramian must be a square [m, m] matrix, got {tuple(gramian.shape)}.")
    if not gramian.is_floating_point():
        raise ValueError(f"The Gramian must be a floating-point tensor, got {gramian.dtype}.")
    if check_finite and not bool(torch.isfinite(gramian).all()):
        raise ValueError(_NOT_FINITE)
    return gramian.shape[0]
