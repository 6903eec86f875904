"""Shared fixtures: devices, the CUDA-like backward thread, thread counts, the resume threshold."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import torch

from pjd_optim import _resume

CUDA = torch.cuda.is_available()
ACCELERATORS = [
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device")),
]
DEVICES = [pytest.param("cpu"), *ACCELERATORS]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Every device present: the test runs on the CPU, and on CUDA where there is one (on a
    CPU-only machine the CUDA case is reported as skipped, with the reason)."""
    name: str = request.param
    return name


@pytest.fixture(params=ACCELERATORS)
def accelerator(request: pytest.FixtureRequest) -> str:
    """Every accelerator present, for tests that compare it with the CPU (skipped, with the
    reason, where there is none)."""
    name: str = request.param
    return name


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


_F = TypeVar("_F", bound=Callable[..., Any])


def in_a_fresh_thread(fn: _F) -> _F:
    """``fn`` run in a new thread (the caller waits), as autograd runs a CUDA graph's backward on
    a device thread: hooks and custom ``Function.backward``s then run outside the caller's thread.
    Calls made inside ``torch.func`` transforms stay in place (their state is per thread, and the
    engine carries it over to device threads)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return fn(*args, **kwargs)
        result: list[Any] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                result.append(fn(*args, **kwargs))
            except BaseException as e:  # re-raised in the caller
                error.append(e)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    return wrapper  # type: ignore[return-value]


@pytest.fixture
def backward_in_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``torch.autograd.grad`` / ``torch.autograd.backward`` (hence ``Tensor.backward``)
    executes its graph in a fresh thread, the CPU stand-in for CUDA's device threads."""
    monkeypatch.setattr(torch.autograd, "grad", in_a_fresh_thread(torch.autograd.grad))
    monkeypatch.setattr(torch.autograd, "backward", in_a_fresh_thread(torch.autograd.backward))
