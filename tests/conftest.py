"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from pjd_optim import _resume


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Tiny batched ops; one thread avoids OpenMP stalls on a busy machine (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def always_resume(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test models are tiny: lift the cost threshold so every test exercises the resumed backward
    wherever it is exact (``test_resume_threshold`` checks the default)."""
    monkeypatch.setattr(_resume, "MIN_SAVED_FLOPS", 0)
