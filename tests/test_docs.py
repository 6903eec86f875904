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
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
