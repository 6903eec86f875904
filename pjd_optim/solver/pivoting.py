r"""The solver's exact loop: block principal pivoting of every row at once (any device).

Each row is an LCP ``x ≥ 0``, ``y = Mx + q ≥ 0``, ``xᵀy = 0`` (``M`` Jacobi-scaled, SPD). For a
free set F (``y_F = 0``) and active set A (``x_A = 0``) the candidate is ``x_F = −M_FF⁻¹ q_F``
(or, with ``H = M⁻¹`` and ``p = −Hq``, ``x = p + H_{:A} z_A`` with ``H_AA z_A = −p_A``: the dual
systems, used when they are the smaller). Block principal pivoting (Júdice & Pires 1994; Kim &
Park 2011) swaps every infeasible index (``x_F < 0`` or ``y_A < 0``) between F and A. A row
whose count of infeasible indices has not decreased for ``patience`` steps takes Murty's single
pivot (the largest infeasible index) until it decreases below its best again: finite for
positive definite ``M`` (the best count decreases finitely often, and Murty's rule terminates
from any basis). Rows not done after ``STALL_STEPS`` steps (round-off can make single pivots
cycle on ill-conditioned problems) finish with the monotone active-set method
(:mod:`.active_set`). A row is done when its candidate meets the KKT conditions to the
round-off bound of its free block; it then leaves the batch.

The start (one policy): the sign guess (free where ``q < 0``) if no row has more than ``m/4``
indices active in it (UPGrad's rows on Gramians of real losses: the dual systems are then
small, and the guess is often right), else the free sets of a FISTA warm start; a sign guess
whose first step swaps more than ``m/8`` indices per row proves far off, and the rows left
restart from FISTA's free sets.

The loop synchronises with the device once per round: a round is one step on the host (rows
leave as soon as they are done, each chunk is padded to its own size), and ``steps_per_check``
steps for the first ``checks`` rounds in lock-step, as accelerators run it (fixed-shape tensors,
every row padded to the largest system plus slack; at most ``2 + checks`` syncs), after which
the rows left continue a round per step.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from ._common import (
    FAR_OFF_SWAPS,
    FISTA_ITERS,
    FISTA_MIN_M,
    FREEZE_EVERY,
    SIGN_GUESS_ACTIVE,
    SLACK,
    STALL_STEPS,
    Inverse,
    SolverOptions,
    infeasible,
    low_dtype,
    no_convergence,
    not_finite,
    not_positive_definite,
    pivots,
    too_ill_conditioned,
    use_mixed,
)
from .active_set import active_set
from .first_order import fista, free_guess, max_eigenvalue
from .systems import Systems

Array = NDArray[np.float64]
Mask = NDArray[np.bool_]


def solve(
    M: Tensor,
    Q: Tensor,
    P: Tensor | None,
    options: SolverOptions,
    free: Tensor | None = None,
    lockstep: bool = False,
) -> Tensor:
    """Rows of LCP(``Q``, ``M``) (``M`` SPD, taken as its symmetric part; ``P``: ``−M⁻¹Q`` if
    known exactly, as for UPGrad), after a Jacobi scaling ``M̃ = DMD``, ``q̃ = Dq``,
    ``x = Dx̃`` (``D = diag(M)^-½``).
    ``free``: the first free sets (default: the start policy above); ``lockstep``: a bounded
    number of host syncs before the rows left continue one sync per step. Returns ``X``,
    exactly zero on the active sets; raises if a factorisation fails on the host or the rows
    need more than ``options.iterations(m)`` steps."""
    if Q.shape[0] == 0 or Q.shape[1] == 0:
        return torch.zeros_like(Q)
    diag = M.diagonal()
    d = torch.where(diag > 0, diag.rsqrt(), 1.0)
    M, Q = M * d.unsqueeze(1) * d.unsqueeze(0), Q * d
    M = 0.5 * (M + M.mT)  # the symmetric part: the systems read rows, y = Mx reads columns
    P = None if P is None else P / d
    return _Loop(M, Q, P, options).run(free, lockstep) * d


def solve_on_host(
    M: Array, Q: Array, P: Array | None, options: SolverOptions, active: Mask | None = None
) -> Array:
    """:func:`solve` on float64 NumPy arrays, from the active sets ``active`` if given."""
    free = None if active is None else torch.from_numpy(~active)
    P_t = None if P is None else torch.from_numpy(P)
    X = solve(torch.from_numpy(M), torch.from_numpy(Q), P_t, options, free)
    out: Array = X.numpy()
    return out


class _Loop:
    """The rows still in the batch (compacted at each sync), their pivoting state, and the
    loop."""

    def __init__(self, M: Tensor, Q: Tensor, P: Tensor | None, options: SolverOptions) -> None:
        b, m = Q.shape
        self.M, self.options, self.m = M, options, m
        self.tol = options.tolerance(M.dtype)
        self.inverse = Inverse(M, self.tol)
        self.X = torch.zeros_like(Q)
        self.rows = torch.arange(b, device=M.device)
        self.Q, self.R = Q, P  # R: the dual right-hand sides −M⁻¹q of the rows, once needed
        self.q_scale = Q.abs().amax(dim=1, keepdim=True)
        self.X_rows = torch.zeros_like(Q)
        self.x = torch.zeros_like(Q)  # the rows' last candidates, clipped (feasible)
        self.done = ~(Q + self.tol * self.q_scale < 0).any(dim=1)  # q ≥ 0: x = 0
        self.free = Q < 0  # the sign guess
        self.position = torch.arange(1, m + 1, device=M.device)
        self.systems: dict[tuple[bool, bool], Systems] = {}
        self.precise = False  # set once a float32 factorisation fell short: float64 from then
        self.left = self.largest_free = self.largest_active = 0
        self.first_swaps = torch.zeros((), dtype=torch.long, device=M.device)
        self.undecided = torch.zeros((), dtype=torch.long, device=M.device)

    def run(self, free: Tensor | None, lockstep: bool) -> Tensor:
        options, m = self.options, self.m
        self.free = self.free if free is None else free
        self.reset()
        finite = torch.isfinite(self.M).all() & torch.isfinite(self.Q).all()
        flags = self.sync([self.inverse.trusted, finite])
        if not flags[1]:
            raise not_finite()
        trusted = bool(flags[0])
        n_conflict = self.left
        n_fista = FISTA_ITERS if m >= FISTA_MIN_M else 0
        restart = False
        if free is None and self.left:  # the start policy
            if options.warm_start_iter is not None:
                n_fista, restart = options.warm_start_iter, False
            else:
                restart = self.largest_active * SIGN_GUESS_ACTIVE <= m and n_fista > 0
            if n_fista and not restart:
                self.warm_start(n_fista, freeze=not lockstep)
        checks, step, iters = options.checks if lockstep else 0, 0, options.iterations(m)
        while self.left:
            if step >= iters:
                raise no_convergence(iters, self.left, self.X.shape[0])
            if step >= STALL_STEPS and not checks:  # the rows left: the active-set method
                systems = Systems(self.M, None, options.max_chunk_bytes)
                x = active_set(self.M, self.Q, self.x, self.tol, iters - step, systems)
                return self.X.index_copy_(0, self.rows, x)
            use_dual = trusted and self.largest_active < self.largest_free
            largest = self.largest_active if use_dual else self.largest_free
            s = min(m, max(largest, 1) + max(8, m // SLACK)) if checks else None
            systems = self.systems_for(use_dual, largest)
            for _ in range(options.steps_per_check if checks else 1):
                self.step(systems, use_dual, s, first=step == 0)
                step += 1
            stats = [self.failed.sum(), self.inexact.sum(), self.first_swaps, self.undecided]
            n_failed, n_inexact, n_swaps, n_undecided = self.sync(stats)
            if n_failed and s is None:  # a float64 factorisation failed
                raise not_positive_definite()
            if n_undecided:
                raise too_ill_conditioned(self.M.dtype, self.tol)
            self.precise = self.precise or n_inexact > 0
            if restart and self.left and n_swaps * FAR_OFF_SWAPS > n_conflict * m:
                self.warm_start(n_fista, freeze=not checks)  # the sign guess was far off
            restart, checks = False, max(checks - 1, 0)
        return self.X

    @functools.cached_property
    def lam(self) -> Tensor:
        """An upper estimate of ``λ_max(M)`` (FISTA's step, the refined solutions' bound)."""
        return max_eigenvalue(self.M)

    def reset(self) -> None:
        """Block pivoting from the current free sets, with full patience."""
        self.best = torch.full_like(self.rows, self.m + 1)
        self.patience = torch.full_like(self.rows, self.options.patience)

    def warm_start(self, iters: int, freeze: bool) -> None:
        """The free sets a FISTA warm start (in the low dtype) identifies (one sync for their
        sizes; with ``freeze``, FISTA syncs to freeze the rows whose guess settled)."""
        M, Q, lam, low = self.M, self.Q, self.lam, low_dtype(self.M.dtype)
        x = fista(M.to(low), Q.to(low), lam.to(low), iters, FREEZE_EVERY if freeze else 0)
        self.free = free_guess(M, Q, x.to(M.dtype), lam)
        self.reset()
        self.sync([])

    def sync(self, extra: list[Tensor]) -> list[int]:
        """The one host sync of a round: the rows left and their largest free and active sets,
        with ``extra``; then the rows done leave the batch."""
        n_free = torch.where(self.done, -1, self.free.sum(dim=1))
        stats = [
            (~self.done).sum(),
            n_free.amax(),
            self.m - torch.where(self.done, self.m, n_free).amin(),
        ]
        left, self.largest_free, self.largest_active, *values = torch.stack(stats + extra).tolist()
        self.X.index_copy_(0, self.rows, self.X_rows)
        if left < self.rows.numel():  # the `left` first after a stable sort
            keep = torch.argsort(self.done.to(torch.int8), stable=True)[:left]
            names = ("rows", "Q", "q_scale", "X_rows", "x", "done", "free", "best", "patience")
            for name in names:
                setattr(self, name, getattr(self, name)[keep])
            self.R = None if self.R is None else self.R[keep]
        self.left = left
        return values

    def systems_for(self, dual: bool, size: int) -> Systems:
        """The batched solves of the primal (``M``) or dual (``H``) systems, factorised in
        float32 where :func:`use_mixed` says so (until one falls short)."""
        low = use_mixed(self.M, size, self.options) and not self.precise
        if (dual, low) not in self.systems:
            K = self.inverse.H if dual else self.M
            dtype = low_dtype(K.dtype) if low else None
            self.systems[dual, low] = Systems(K, dtype, self.options.max_chunk_bytes)
        return self.systems[dual, low]

    def step(self, systems: Systems, use_dual: bool, s: int | None, first: bool) -> None:
        """One block-pivoting step of every row left (rows done, or whose system did not fit
        ``s`` or fell short in float32, wait unchanged)."""
        M, Q, free = self.M, self.Q, self.free
        if use_dual:
            if self.R is None:
                self.R = self.inverse.rhs(Q)
            z, ok, cond = systems.solve(-self.R, ~free, s)
            x, cond = self.inverse.candidate(self.R, z, free, cond)
        else:
            x, ok, cond = systems.solve(-Q, free, s)
        y = x @ M + Q  # rows of (M x + q), M symmetric
        self.x = torch.where(self.done.unsqueeze(1), self.x, x.clamp_min(0.0))  # feasible
        wrong, scale, undecided = infeasible(x, y, free, self.q_scale, cond, self.tol)
        waiting = ~ok & ~self.done
        if systems.low is not None:  # a refined float32 solution must be float64-accurate
            res_tol = 1e3 * torch.finfo(M.dtype).eps * self.lam.clamp_min(1.0)
            ok = ok & (~free | (y.abs() <= res_tol * scale)).all(dim=1)
            self.failed, self.inexact = torch.zeros_like(ok), ~ok & ~self.done
        else:
            self.failed, self.inexact = waiting, torch.zeros_like(ok)
        n_wrong = wrong.sum(dim=1)
        active = ~self.done & ok
        self.undecided = (undecided & active).sum()
        now = active & (n_wrong == 0)
        self.X_rows = torch.where(now.unsqueeze(1), x.clamp_min(0.0), self.X_rows)
        self.done = self.done | now
        active = active & ~now
        # Block pivoting with Murty's backup rule (Júdice & Pires), vectorised over rows.
        better = (n_wrong < self.best) & active
        self.best = torch.where(better, n_wrong, self.best)
        full = better | (self.patience > 0)
        spent = (full & active).long()
        self.patience = torch.where(better, self.options.patience, self.patience - spent)
        swaps = pivots(wrong, full, self.position) & active.unsqueeze(1)
        self.free = free ^ swaps
        if first:
            self.first_swaps = swaps.sum()
