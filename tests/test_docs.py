"""The API reference names every public name, and its examples run."""

from __future__ import annotations

import re
from pathlib import Path

import pjd_optim
import pjd_optim.gramian

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_public_name_is_in_the_api_reference() -> None:
    text = (DOCS / "api.md").read_text()
    names = {*pjd_optim.__all__, *pjd_optim.gramian.__all__, "JDTrainer", "objective_losses"}
    missing = sorted(name for name in names if f"`{name}" not in text and name not in text)
    assert not missing, f"docs/api.md does not document {missing}"


def test_the_api_reference_examples_run_in_order() -> None:
    """Every ```python block of docs/api.md, in one namespace, as a reader would run them."""
    text = (DOCS / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 10
    namespace: dict[str, object] = {}
    try:
        for block in blocks:
            exec(compile(block, "docs/api.md", "exec"), namespace)
    finally:  # the example's rule is registered globally: take it back, and its namespace
        from pjd_optim.gramian._registry import _RULES

        _RULES.pop(namespace.get("Scale"), None)  # type: ignore[call-overload]
        namespace.clear()


def test_the_optimizer_repr_shows_the_base_groups_the_options_and_the_considered_modules() -> None:
    import torch
    from torch import nn

    from pjd_optim import MGDA, PartialJDOptimizer

    model = nn.Sequential(
        nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    )
    base = torch.optim.AdamW(model.parameters(), lr=0.003, weight_decay=0.05)
    optimizer = PartialJDOptimizer(
        base, model, considered=[model[2], model[0].bias], weighting=MGDA(reg_eps=0.01)
    )
    text = repr(optimizer)
    assert repr(base) in text  # torch's own listing of every group's options
    assert "lr: 0.003" in text and "weight_decay: 0.05" in text
    assert "considered: 2, 0.bias" in text
    assert "MGDA(norm_eps=0.0001, reg_eps=0.01)" in text
    assert "gramian_mode: 'hooks'" in text and "nonfinite: 'raise'" in text


def test_step_info_prints_a_summary_not_the_gramian() -> None:
    import torch
    from torch import nn

    from pjd_optim import PartialJDOptimizer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = PartialJDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, considered=model[2]
    )
    optimizer.step(model(torch.randn(40, 3)).pow(2).sum(dim=1))
    info = optimizer.last_step
    assert info is not None
    text = repr(info)
    assert text.startswith("StepInfo(m=40, weights sum ")
    assert f"{info.conflict:.1%}" in text and "resumed=" in text
    assert "tensor" not in text and len(text) < 250
