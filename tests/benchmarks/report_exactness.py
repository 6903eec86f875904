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
    header = f"{'architecture':34s} {'dtype':8s} {'gramian':>9s} {'weights':>9s} {'grads':>9s}"
    print(f"{header}  path")
    for name in CASES:
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            errors = errors_against_oracle(CASES[name](), dtype)
            row = " ".join(f"{errors[k]:9.1e}" for k in ("gramian", "weights", "grads"))
            path = "resumed" if errors["resumed"] else "backward(w)"
            print(f"{name:34s} {str(dtype)[6:]:8s} {row}  {path}")


if __name__ == "__main__":
    main()
