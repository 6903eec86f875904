"""A user's typed script passes ``mypy --strict``; a wrong call to ``step`` is flagged."""

from __future__ import annotations

from pathlib import Path

import pytest

GOOD = """
from typing import Any

import torch
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD
from torch.optim.lr_scheduler import StepLR

from pjd_optim import Mean, PartialJDOptimizer, StepInfo, UPGrad

model = Sequential(Linear(10, 8), ReLU(), Linear(8, 5), ReLU(), Linear(5, 1))
groups: list[dict[str, Any]] = [
    {"params": model[0].parameters()},
    {"params": model[2:].parameters(), "considered": True},
]
optimizer = PartialJDOptimizer(SGD(groups, lr=0.1), model, weighting=UPGrad())
base = SGD(model.parameters(), lr=0.1)
other = PartialJDOptimizer(base, model, considered=[model[4]], weighting=Mean())
scheduler = StepLR(optimizer, step_size=2)
loss_fn = MSELoss(reduction="none")
for x, y in zip(torch.randn(4, 16, 10), torch.randn(4, 16)):
    losses = loss_fn(model(x).squeeze(dim=1), y)
    weights: torch.Tensor = optimizer.backward(losses)
    optimizer.step()
    returned: torch.Tensor = optimizer.step(lambda: loss_fn(model(x).squeeze(dim=1), y))
    optimizer.zero_grad()
    scheduler.step()
info: StepInfo | None = optimizer.last_step
state = optimizer.state_dict()
optimizer.load_state_dict(state)
"""

BAD = """
import torch
from torch.nn import Linear
from torch.optim import SGD

from pjd_optim import PartialJDOptimizer

model = Linear(2, 1)
optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model)
optimizer.step("x")
"""


def test_typed_user_script_passes_and_step_with_a_string_is_flagged(tmp_path: Path) -> None:
    api = pytest.importorskip("mypy.api")
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "bad.py").write_text(BAD)
    args = [
        "--strict",
        "--cache-dir",
        str(root / ".mypy_cache"),
        "--config-file",
        str(root / "pyproject.toml"),
    ]
    out, err, status = api.run([*args, str(tmp_path / "good.py")])
    assert status == 0, out + err
    out, err, status = api.run([*args, str(tmp_path / "bad.py")])
    assert status == 1
    assert "bad.py:10" in out and '"step"' in out
