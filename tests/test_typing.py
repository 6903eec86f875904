"""A user's typed script, in a folder of its own, passes ``mypy --strict`` against the package
(with the package's own imports checked against the real torch, timm and numpy types, not this
repository's stubs); a wrong call to ``step`` is flagged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # mypy checks torch's stubs: about a minute

# mypy --strict reads torch's own annotations, which older releases leave incomplete (measured):
# with torch 2.4.1 it flags the script's `from torch.optim import SGD`; with 2.4.1 and 2.6.0,
# 21 and 17 of this package's calls into torch (untyped `enable_grad`, `Function.apply`,
# `torch.func` names not re-exported). The sources are kept clean against CI's torch (2.14.1).
TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])

GOOD = """
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import Linear, MSELoss, ReLU, Sequential
from torch.optim import SGD
from torch.optim.lr_scheduler import StepLR

from pjd_optim import (
    Call, GramianRule, JDScaler, Mean, PartialJDOptimizer, StepInfo, UPGrad,
    register_gramian_rule,
)
from pjd_optim.solver import SolverOptions

model = Sequential(Linear(10, 8), ReLU(), Linear(8, 5), ReLU(), Linear(5, 1))
groups: list[dict[str, Any]] = [
    {"params": model[0].parameters()},
    {"params": model[2:].parameters(), "considered": True},
]
optimizer = PartialJDOptimizer(SGD(groups, lr=0.1), model, weighting=UPGrad())
base = SGD(model.parameters(), lr=0.1)
other = PartialJDOptimizer(base, model, considered=[model[4]], weighting=Mean())
fast = UPGrad(solver=SolverOptions(host_max_m=128))
scheduler = StepLR(optimizer, step_size=2)
scaler = JDScaler("cpu")
loss_fn = MSELoss(reduction="none")
for x, y in zip(torch.randn(4, 16, 10), torch.randn(4, 16)):
    losses = loss_fn(model(x).squeeze(dim=1), y)
    weights: Tensor = optimizer.backward(losses)
    optimizer.step()
    returned: Tensor = optimizer.step(lambda: loss_fn(model(x).squeeze(dim=1), y))

    def backward_itself() -> None:  # as Lightning's closures: the backward ran, nothing returned
        optimizer.backward(loss_fn(model(x).squeeze(dim=1), y))

    def maybe(skip: bool = False) -> Tensor | None:  # a training_step may return None to skip
        return None if skip else loss_fn(model(x).squeeze(dim=1), y)

    nothing: None = optimizer.step(backward_itself)
    optional: Tensor | None = optimizer.step(maybe)
    tasks = [losses[:8].mean(), losses[8:].mean()]
    task_weights: Tensor = optimizer.backward(tasks)
    optimizer.zero_grad()
    scheduler.step()
info: StepInfo | None = optimizer.last_step
state = optimizer.state_dict()
optimizer.load_state_dict(state)


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


@register_gramian_rule(Scale)
class ScaleRule(GramianRule):
    def per_sample_grads(
        self, module: nn.Module, calls: Any, params: Any
    ) -> dict[str, Tensor]:
        first: Call = calls[0]
        return {"scale": sum(c.args[0] * c.output_grads[0] for c in calls) + 0 * first.args[0]}
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


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for this module's runs (torch's stubs are checked once)."""
    return tmp_path_factory.mktemp("mypy_cache")


def mypy(
    folder: Path, script: str, mypypath: Path | None, cache: Path
) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` as a user runs it: from the script's folder, no config of this repo."""
    (folder / "script.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    if mypypath is not None:
        env["MYPYPATH"] = str(mypypath)
    command = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), "script.py"]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, check=False)


@pytest.mark.skipif(TORCH < (2, 14), reason="torch < 2.14: its annotations are incomplete")
def test_a_typed_script_against_the_package_sources(tmp_path: Path, cache: Path) -> None:
    """The package on ``MYPYPATH``: mypy checks its modules too, and finds nothing to report."""
    pytest.importorskip("mypy")
    result = mypy(tmp_path, GOOD, ROOT, cache)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(TORCH < (2, 6), reason="torch < 2.6: its annotations are incomplete")
def test_a_typed_script_against_the_installed_package(tmp_path: Path, cache: Path) -> None:
    """As installed by the README's commands (``pip install ".[...]"``)."""
    pytest.importorskip("mypy")
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import pjd_optim, sysconfig; print(pjd_optim.__file__); "
            "print(sysconfig.get_paths()['purelib'])",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if not where[0].startswith(where[1]):
        pytest.skip(
            "pjd_optim is not installed in site-packages but reached through an editable install "
            f"({where[0]}); setuptools' import-hook editable mode is invisible to type checkers "
            "(install with pip install . as the README does)"
        )
    result = mypy(tmp_path, GOOD, None, cache / "installed")
    assert result.returncode == 0, result.stdout + result.stderr


def test_step_with_a_string_is_flagged(tmp_path: Path, cache: Path) -> None:
    pytest.importorskip("mypy")
    result = mypy(tmp_path, BAD, ROOT, cache)
    assert result.returncode == 1
    assert "script.py:10" in result.stdout and '"step"' in result.stdout
