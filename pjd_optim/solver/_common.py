"""What the solver's paths share: options, the tuned constants, tolerances, the pivoting rule,
the dual systems' inverse, errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The tuned numbers of the solver, each with why (measurements: docs/benchmarks.md).
PATIENCE = 3  # block-pivoting steps without fewer infeasible indices before Murty's single pivot
STALL_STEPS = 12  # pivoting steps after which the rows left finish by the active-set method
REFINE_STEPS = 3  # refinement steps of a float32 factorisation (to float64 accuracy)
CHUNK_BYTES_CPU = 1 << 22  # one batch of blocks on the CPU: stays in the caches
CHUNK_BYTES_DEVICE = 1 << 30  # ... on accelerators: large batches keep the device busy
SLACK = 16  # lock-step: systems padded to the largest plus max(8, m/16), room to grow
MIXED_MIN_SIZE = 192  # accelerators: from this system size float64 blocks factorise in float32
MAX_KAPPA = 1e7  # 1-norm condition number above which an explicit inverse is not trusted
DAQP_MAX_M = 96  # float64 host problems up to this m: DAQP (measured crossover)
FISTA_ITERS = 100  # warm-start iterations: 100 and 200 give the same steps at m = 256, 1024
FISTA_MIN_M = 32  # below, pivoting from the sign guess is cheaper than any warm start
FREEZE_EVERY = 20  # host loop: FISTA freezes rows whose guess settled, every that many steps
SIGN_GUESS_ACTIVE = 4  # the sign guess is close if no row has more than m/4 active indices
FAR_OFF_SWAPS = 8  # ... and proves far off if the first step swaps more than m/8 per row
PATHS = ("daqp", "pivoting", "lockstep")
HOST_PATHS = ("daqp",)  # float64 NumPy arrays on the host


@dataclass(frozen=True)
class SolverOptions:
    """Options of the dual-cone / LCP solver (all have working defaults).

    Args:
        dtype: computation dtype of :func:`project_dual_cone` (``float64``; ``float32`` is faster
            and looser).
        rtol: relative KKT tolerance (default ``100 · eps(dtype)``).
        max_iter: bound on pivoting steps (default ``100 + 10 m``); exceeding it raises.
        warm_start_iter: FISTA iterations that guess the first free sets (default: none when
            the sign guess is close, i.e. leaves at most ``m/4`` indices active per row, or
            below 32 rows; else 100). Setting it always runs FISTA (``0``: the sign guess).
        patience: pivoting steps a row may take without fewer infeasible indices before it
            takes Murty's single pivots (finite), until it improves again.
        mixed_precision: factorise large float64 systems in float32 and refine (default: on
            accelerators, from a system size of 192; off on the CPU).
        max_chunk_bytes: memory bound of one batch of ``[chunk, s, s]`` systems.
        path: the path, on any device (default ``None``: :func:`pjd_optim.solver.plan` picks
            by size, dtype and device). ``"daqp"``: DAQP's answers, verified per row, the
            others finished by the pivoting loop from DAQP's active sets (float64 on the host;
            other dtypes take ``"pivoting"``); ``"pivoting"``: block pivoting, synchronising
            with the device at every step; ``"lockstep"``: the same loop with a bounded number
            of host syncs (accelerators).
        host_max_m: by default, problems on an accelerator up to this size are copied to the
            host and solved there (one copy each way) instead of by the lock-step path.
        checks: lock-step path: convergence checks (host synchronisations) at most, after which
            the rows left continue on the pivoting path.
        steps_per_check: lock-step path: pivoting steps between two checks.
    """

    dtype: torch.dtype = torch.float64
    rtol: float | None = None
    max_iter: int | None = None
    warm_start_iter: int | None = None
    patience: int = PATIENCE
    mixed_precision: bool | None = None
    max_chunk_bytes: int | None = None
    path: str | None = None
    host_max_m: int = 64
    checks: int = 3
    steps_per_check: int = 3

    def __post_init__(self) -> None:
        counts = (
            ("patience", self.patience, 0),
            ("host_max_m", self.host_max_m, 0),
            ("checks", self.checks, 0),
            ("steps_per_check", self.steps_per_check, 1),
            ("max_iter", self.max_iter, 1),
            ("warm_start_iter", self.warm_start_iter, 0),
            ("max_chunk_bytes", self.max_chunk_bytes, 0),
        )
        bad = [
            f"{name}={value} (an integer >= {least})"
            for name, value, least in counts
            if value is not None and not (isinstance(value, int) and value >= least)
        ]
        if self.dtype not in (torch.float32, torch.float64):
            bad.append(f"dtype={self.dtype} (float32 or float64)")
        if self.rtol is not None and not 0.0 < self.rtol < 1.0:
            bad.append(f"rtol={self.rtol} (in (0, 1))")
        if self.path is not None and self.path not in PATHS:
            bad.append(f"path={self.path!r} (Unknown solver path: one of {PATHS})")
        if bad:
            raise ValueError("Invalid SolverOptions: " + ", ".join(bad) + ".")

    def tolerance(self, dtype: torch.dtype) -> float:
        return 100 * torch.finfo(dtype).eps if self.rtol is None else self.rtol

    def iterations(self, m: int) -> int:
        return 100 + 10 * m if self.max_iter is None else self.max_iter


def low_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the warm start and of mixed-precision factorisations."""
    return torch.float32 if dtype == torch.float64 else dtype


def use_mixed(M: Tensor, size: int, options: SolverOptions) -> bool:
    """Whether systems of ``size`` from ``M`` are factorised in :func:`low_dtype` (by default
    on accelerators only: on the CPU the refinement costs what the factorisation saves)."""
    mixed = options.mixed_precision
    if mixed is None:
        mixed = size >= MIXED_MIN_SIZE and M.device.type != "cpu"
    return low_dtype(M.dtype) != M.dtype and mixed


def largest_bound(dtype: torch.dtype, tol: float) -> float:
    """The loosest relative round-off bound an answer may be accepted under (``10·√eps``, or the
    tolerance if looser): beyond it a free block is too ill-conditioned for ``dtype`` to tell a
    right answer from a wrong one (a KKT residual ``δ`` can move the weights by ``δ·κ``)."""
    return max(10 * math.sqrt(torch.finfo(dtype).eps), tol)


def infeasible(
    x: Tensor, y: Tensor, free: Tensor, q_scale: Tensor, cond: Tensor, tol: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The indices that break the KKT conditions (``x_F < 0`` or ``y_A < 0``) beyond the per-row
    round-off bound (``x_F``'s round-off grows like ``eps·κ(M_FF)``, capped at
    :func:`largest_bound`), each row's scale, and the rows it cannot decide: breaking the
    capped bound, within the uncapped one."""
    eps = torch.finfo(x.dtype).eps
    scale = x.abs().amax(dim=1, keepdim=True) + q_scale
    rel = torch.clamp(eps * cond, min=tol).unsqueeze(1)
    bound = scale * rel.clamp(max=largest_bound(x.dtype, tol))
    wrong = torch.where(free, x < -bound, y < -bound)
    within = ~torch.where(free, x < -scale * rel, y < -scale * rel).any(dim=1)
    return wrong, scale, wrong.any(dim=1) & within


def too_ill_conditioned(dtype: torch.dtype, tol: float) -> ValueError:
    return ValueError(
        f"The solver cannot verify its answer in {dtype}: a free block is so ill-conditioned "
        f"that round-off exceeds {largest_bound(dtype, tol):.1e} of the row's scale, where a "
        "right and a wrong answer look alike. Regularise the Gramian more (a larger reg_eps)"
        + (
            ", or solve in float64 (SolverOptions(dtype=torch.float64))."
            if dtype != torch.float64
            else "."
        )
    )


def pivots(infeasible: Tensor, full: Tensor, position: Tensor) -> Tensor:
    """The indices to swap between free and active sets: every infeasible one (block pivoting)
    on rows ``full``, else the last infeasible one (Murty's single pivot). ``position`` is
    ``1 … m``."""
    last = (infeasible * position).argmax(dim=1, keepdim=True)
    single = torch.zeros_like(infeasible).scatter_(1, last, True) & infeasible
    return torch.where(full.unsqueeze(1), infeasible, single)


def inverse_from_cholesky(factor: Tensor, sync_free: bool) -> Tensor:
    """``(L Lᵀ)⁻¹`` from the lower factor ``L``: LAPACK's ``cholesky_inverse`` (faster on the
    CPU, exactly symmetric), or with ``sync_free`` ``L⁻ᵀ L⁻¹`` by triangular solves, which check
    no error and so never synchronise with an accelerator (symmetrised)."""
    if not sync_free:
        try:
            lapack: Tensor = torch.cholesky_inverse(factor)
        except RuntimeError:  # a singular factor (torch < 2.5 raises LinAlgError, later: inf)
            return torch.full_like(factor, torch.nan)
        return lapack
    eye = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    inverse: Tensor = torch.linalg.solve_triangular(factor, eye, upper=False)
    H = inverse.mT @ inverse
    return 0.5 * (H + H.mT)


class Inverse:
    """``H = M⁻¹`` for the dual systems of a free set F (active set A): with ``p = −Hq``,
    ``x = p + H_{:A} z_A`` where ``H_AA z_A = −p_A`` has ``x_A = 0`` and ``(Mx + q)_F = 0``
    (``y_A = z_A``), a system of size ``|A|`` instead of ``|F|``. UPGrad's rows on Gramians of
    real losses keep most indices free, so these are far smaller. One Cholesky factorisation
    of ``M`` and :func:`inverse_from_cholesky` (no sync on accelerators); ``trusted`` (a device
    bool): factorised and ``κ₁(M) ≤ MAX_KAPPA``."""

    def __init__(self, M: Tensor, tol: float) -> None:
        factor, info = torch.linalg.cholesky_ex(M)
        self.H = inverse_from_cholesky(factor, sync_free=M.device.type != "cpu")
        self.kappa = M.abs().sum(dim=0).amax() * self.H.abs().sum(dim=0).amax()
        # (its candidates' bound 10·eps·κ₁ must stay within the largest one: float32 needs κ₁ ≲ 3e3)
        loosest = largest_bound(M.dtype, tol) / (10 * torch.finfo(M.dtype).eps)
        self.trusted = (info == 0) & (self.kappa <= min(MAX_KAPPA, loosest))

    def rhs(self, Q: Tensor) -> Tensor:
        """``p = −M⁻¹q`` per row of ``Q``."""
        return -(Q @ self.H)

    def candidate(self, P: Tensor, z: Tensor, free: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``x = p + H_{:A} z_A`` (exactly zero on A) from the dual solutions ``z``, and the
        condition estimate with ``10 κ₁(M)`` (the round-off of ``H``)."""
        x = torch.where(free, torch.addmm(P, z, self.H), 0.0)
        return x, torch.clamp(cond, min=10 * self.kappa)


def not_positive_definite() -> ValueError:
    return ValueError(
        "The matrix is not numerically positive definite (a Cholesky factorisation failed); "
        "regularise it, e.g. with reg_eps > 0."
    )


def no_convergence(iters: int, rows: int, total: int) -> RuntimeError:
    return RuntimeError(
        f"Dual-cone projection did not converge in {iters} steps for {rows} of {total} rows: "
        "raise SolverOptions(max_iter=...) if it was set low; otherwise the matrix is probably "
        "not numerically positive definite (regularise it, e.g. with reg_eps > 0)."
    )


def not_finite() -> ValueError:
    return ValueError("The solver's inputs contain NaN or infinite values.")
