"""Relative errors of one ``backward`` against the per-sample oracle, per architecture of the zoo.

Run: ``python tests/benchmarks/report_exactness.py`` (prints a table; the tests assert the bounds).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from oracle import errors_against_oracle
from zoo import CASES


def main() -> None:
    print(f"{'architecture':34s} {'dtype':8s} {'gramian':>9s} {'weights':>9s} {'grads':>9s}")
    for name in CASES:
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            errors = errors_against_oracle(CASES[name](), dtype)
            row = " ".join(f"{errors[k]:9.1e}" for k in ("gramian", "weights", "grads"))
            print(f"{name:34s} {str(dtype)[6:]:8s} {row}")


if __name__ == "__main__":
    main()
