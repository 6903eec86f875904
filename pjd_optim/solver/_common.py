"""What the solver's paths share: options, constants, tolerances, errors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MURTY_PATIENCE = 3  # pivoting steps without progress before a row uses Murty's single pivot
BPP_STEPS = 12  # pivoting steps before the remaining rows go to the primal active-set method


@dataclass(frozen=True)
class SolverOptions:
    """Options of the dual-cone / LCP solver (all have working defaults).

    Args:
        dtype: computation dtype of :func:`project_dual_cone` (``float64``; ``float32`` is faster
            and looser).
        rtol: relative KKT tolerance (default ``100 · eps(dtype)``).
        max_iter: bound on pivoting steps (default ``100 + 10 m``); exceeding it raises.
        warm_start_iter: FISTA iterations that guess the active sets (default: none below 32
            rows; else 200 on the pivoting path, which freezes rows whose guess settled, and 100
            on the lock-step path).
        mixed_precision: factorise large float64 systems in float32 and refine (default: from a
            free-set size of 192).
        max_chunk_bytes: memory bound of one batch of ``[chunk, s, s]`` systems.
        numpy_max_m: float64 problems on the CPU up to this size use the NumPy path.
        host_max_m: problems on an accelerator up to this size are copied to the host and solved
            there (one copy each way) instead of by the lock-step path.
        lockstep: ``None``: the lock-step path on accelerators only; ``True``/``False`` force it
            on or off on any device.
        checks: lock-step path: convergence checks (host synchronisations) at most, after which
            the rows left are finished by the exact pivoting path.
        steps_per_check: lock-step path: pivoting steps between two checks.
    """

    dtype: torch.dtype = torch.float64
    rtol: float | None = None
    max_iter: int | None = None
    warm_start_iter: int | None = None
    mixed_precision: bool | None = None
    max_chunk_bytes: int | None = None
    numpy_max_m: int = 160
    host_max_m: int = 64
    lockstep: bool | None = None
    checks: int = 3
    steps_per_check: int = 8

    def tolerance(self, dtype: torch.dtype) -> float:
        return 100 * torch.finfo(dtype).eps if self.rtol is None else self.rtol

    def iterations(self, m: int) -> int:
        return 100 + 10 * m if self.max_iter is None else self.max_iter

    def warm_start(self, m: int, lockstep: bool) -> int:
        if self.warm_start_iter is not None:
            return self.warm_start_iter
        return 0 if m < 32 else 100 if lockstep else 200


def not_positive_definite() -> ValueError:
    return ValueError(
        "The matrix is not numerically positive definite (a Cholesky factorisation failed); "
        "regularise it, e.g. with reg_eps > 0."
    )


def no_convergence(iters: int, rows: int, total: int) -> RuntimeError:
    return RuntimeError(
        f"Dual-cone projection did not converge in {iters} steps for {rows} of {total} rows; "
        "the matrix is probably not positive definite."
    )
