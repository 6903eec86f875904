"""Rates of the kernels that bound the solver at large m (docs/solver.md, "Large m").

Run: ``python tests/benchmarks/bench_kernels.py [--threads 1 2]``. Prints GFlop/s (float64,
medians of 5) of the batched Cholesky factorisation and triangular solve of one pivoting step's
dual systems (``m`` rows of size ``m/3``, in batches as the solver chunks them) and of a GEMM of
size ``m``, for m = 256 and 1024. No assertion on time.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch


def rate(fn: Callable[[], object], flops: float, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    args = parser.parse_args()
    f64 = torch.float64
    for threads in args.threads:
        torch.set_num_threads(threads)  # this script's own process only
        for m, batch in ((256, 256), (1024, 64)):
            s = m // 3
            A = torch.randn(batch, s, 2 * s, dtype=f64)
            K = A @ A.mT + s * torch.eye(s, dtype=f64)
            L = torch.linalg.cholesky(K)
            R = torch.randn(batch, s, 1, dtype=f64)
            X = torch.randn(m, m, dtype=f64)
            chol = rate(functools.partial(torch.linalg.cholesky_ex, K), batch * s**3 / 3)
            solve = functools.partial(torch.linalg.solve_triangular, L, R, upper=False)
            trsv = rate(solve, batch * s * s)
            gemm = rate(functools.partial(torch.matmul, X, X), 2 * m**3)
            print(
                f"threads={threads} m={m}: cholesky [{batch}, {s}, {s}] {chol:.1f} GFlop/s, "
                f"triangular solve [{batch}, {s}] {trsv:.2f} GFlop/s, GEMM {m}³ {gemm:.1f} GFlop/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
