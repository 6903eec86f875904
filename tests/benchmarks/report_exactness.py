"""Relative errors of one ``backward`` against the per-sample oracle, per architecture of the zoo.

Run: ``python tests/benchmarks/report_exactness.py`` (prints a table; the tests assert the bounds).
As in the tests, the resume threshold is lifted so that every architecture where resuming the
trunk's backward is exact takes that path (column ``path``); ``grads`` is the error of ``.grad``
relative to ``Σ|w_i||∇ℓ_i|``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oracle import errors_against_oracle
from zoo import CASES

from pjd_optim import _resume


def main() -> None:
    _resume.MIN_SAVED_FLOPS = 0
    print("| architecture | Gramian f32 / f64 | weights f32 / f64 | grads f32 / f64 | path |")
    print("| --- | --- | --- | --- | --- |")
    for name in CASES:
        errors = {}
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            errors[dtype] = errors_against_oracle(CASES[name](), dtype)
        cells = [
            " / ".join(f"{errors[dtype][k]:.1e}" for dtype in (torch.float32, torch.float64))
            for k in ("gramian", "weights", "grads")
        ]
        path = "resumed" if errors[torch.float64]["resumed"] else "backward(w)"
        print(f"| {name} | {' | '.join(cells)} | {path} |")


if __name__ == "__main__":
    main()
