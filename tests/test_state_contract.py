"""State round-trips as properties, and the optimizer-state behaviours the option audit found
unpinned: every attribute of ``PartialJDOptimizer`` and of ``JDScaler`` through ``deepcopy`` and
``pickle``; ``state_dict``/``load_state_dict`` in the base optimizer's format (plain and wrapped
checkpoints cross both ways, every state tensor and group option); ``JDScaler``'s state in full; a
``None``-returning closure after a non-finite backward; the plain-loop warning after a JD step;
task objectives with a parameter tied between a considered module and another one."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import relative_error
from torch import Tensor, nn
from torch.optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop

from pjd_optim import (
    MGDA,
    DualProj,
    JDScaler,
    Mean,
    PartialJDOptimizer,
    StepInfo,
    UPGrad,
    Weighting,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def batch(seed: int) -> Tensor:
    return torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(seed))


def losses_of(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out: Tensor = (model(x) - 1.0).pow(2).sum(dim=1)
    return out


def parameters_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_tensors(a: list[Tensor], b: list[Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- deep comparison -------------------------------------------------------------------------------


def assert_same(a: Any, b: Any, path: str = "", rtol: float = 0.0) -> None:
    """``a`` and ``b`` hold the same values (tensors by value, modules by state, optimizers by
    state dict, dataclasses and plain objects field by field)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        if rtol and a.is_floating_point():
            assert torch.allclose(a, b, rtol=rtol, atol=rtol * 1e-3), path
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, nn.Module):
        assert_same(a.state_dict(), b.state_dict(), f"{path}.state_dict()", rtol)
        assert a.training == b.training, path
    elif isinstance(a, Optimizer):
        assert_same(a.state_dict(), b.state_dict(), f"{path}.state_dict()", rtol)
        assert_same(a.defaults, b.defaults, f"{path}.defaults", rtol)
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        for field in dataclasses.fields(a):
            assert_same(
                getattr(a, field.name), getattr(b, field.name), f"{path}.{field.name}", rtol
            )
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]", rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for n, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{n}]", rtol)
    elif isinstance(a, (int, float, str, bool, type(None), torch.dtype, torch.device)):
        assert a == b or (a != a and b != b), f"{path}: {a!r} vs {b!r}"
    else:  # a weighting, a scaler: every attribute
        assert_same(vars(a), vars(b), path, rtol)


def assert_same_wrapper(a: PartialJDOptimizer, b: PartialJDOptimizer, timings: bool = True) -> None:
    """Every attribute of the wrapper: its own (weighting and options, mode, distributed,
    nonfinite, model, considered parameters), what the steps changed (skipped steps, the last
    step's tensors), the base optimizer's state dict, whether it is closed."""
    skipped = {
        "state",
        "param_groups",
        "_status",
        "_considered",
        "model",
        "base",
        "_zero_grad_profile_name",
    }
    assert set(vars(a)) - {"_zero_grad_profile_name"} == set(vars(b)) - {"_zero_grad_profile_name"}
    for key, value in vars(a).items():
        if key not in skipped:
            assert_same(value, vars(b)[key], key)
    assert_same(a.model, b.model, "model")
    assert_same(a.base, b.base, "base")
    assert a.param_groups is a.base.param_groups and b.param_groups is b.base.param_groups
    assert a.state is a.base.state and b.state is b.base.state
    index = {id(p): n for n, p in a.model.named_parameters()}
    names = [index[id(p)] for p in a.considered_parameters()]
    restored = dict(b.model.named_parameters())
    assert [restored[n] for n in names] == b.considered_parameters()  # b's own parameters
    assert_same(a.considered_parameters(), b.considered_parameters(), "considered")
    assert a.skipped_steps == b.skipped_steps
    if timings or a.last_step is None or b.last_step is None:
        assert_same(a.last_step, b.last_step, "last_step")
    else:  # two steps that ran: the same tensors, their own wall-clock times
        assert_same(untimed(a.last_step), untimed(b.last_step), "last_step")
    assert type(a._status.source) is type(b._status.source)  # closed or not, hooks or autograd
    # (What only concerns the gradients of a backward pending in .grad, pending/cleared/
    # nonfinite_grad, is not carried: a copy's parameters have no .grad, as torch's optimizers.)


def untimed(step: StepInfo) -> StepInfo:
    return dataclasses.replace(step, gramian_seconds=0.0, weighting_seconds=0.0, check_seconds=0.0)


ROUNDTRIPS: dict[str, Callable[[Any], Any]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda x: pickle.loads(pickle.dumps(x)),
}

# -- the wrapper's attributes through deepcopy and pickle ------------------------------------------


BASES: dict[str, Callable[[Any, Any], Optimizer]] = {
    "sgd_nesterov": lambda p, d: SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=d),
    "sgd_dampening": lambda p, d: SGD(p, lr=0.05, momentum=0.5, dampening=0.2),
    "adam_amsgrad": lambda p, d: Adam(p, lr=0.01, betas=(0.8, 0.95), amsgrad=True, weight_decay=d),
    "adamw": lambda p, d: AdamW(p, lr=0.01, weight_decay=d + 0.1, eps=1e-6),
    "rmsprop_centered": lambda p, d: RMSprop(p, lr=0.01, centered=True, momentum=0.3),
    "adagrad": lambda p, d: Adagrad(p, lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1),
}


@st.composite
def weightings(draw: st.DrawFn) -> Weighting:
    kind = draw(st.sampled_from(["UPGrad", "DualProj", "MGDA", "Mean"]))
    norm_eps = draw(st.sampled_from([0.0, 1e-3, 0.2]))
    reg_eps = draw(st.sampled_from([1e-5, 1e-2]))
    pref = torch.linspace(0.5, 1.5, 5, dtype=F64) if draw(st.booleans()) else None
    if kind == "UPGrad":
        return UPGrad(pref, norm_eps, reg_eps)
    if kind == "DualProj":
        return DualProj(pref, norm_eps, reg_eps)
    return MGDA(norm_eps, reg_eps) if kind == "MGDA" else Mean()


@dataclasses.dataclass
class Config:
    base: str
    weighting: Weighting
    gramian_mode: str
    distributed: str
    nonfinite: str
    steps: int
    skips: int
    weight_decay: float
    grouped: bool
    after: str  # what happened last: "step", "backward", "zero_grad", "close"


@st.composite
def configs(draw: st.DrawFn) -> Config:
    mode = draw(st.sampled_from(["hooks", "autograd"]))
    nonfinite = draw(st.sampled_from(["raise", "skip"]))
    return Config(
        base=draw(st.sampled_from(sorted(BASES))),
        weighting=draw(weightings()),
        gramian_mode=mode,
        distributed=draw(st.sampled_from(["local", "global"])) if mode == "hooks" else "local",
        nonfinite=nonfinite,
        steps=draw(st.integers(0, 2)),
        skips=draw(st.integers(0, 2)) if nonfinite == "skip" else 0,
        weight_decay=draw(st.sampled_from([0.0, 0.01])),
        grouped=draw(st.booleans()),
        after=draw(st.sampled_from(["step", "backward", "zero_grad", "close"])),
    )


def built(config: Config, seed: int = 0) -> tuple[nn.Sequential, PartialJDOptimizer]:
    model = mlp(seed)
    params: Any = model.parameters()
    if config.grouped:  # two groups: a considered one with its own options, flagged
        params = [
            {"params": model[0].parameters(), "lr": 0.02, "note": "trunk"},
            {"params": model[2].parameters(), "considered": True},
        ]
    base = BASES[config.base](params, config.weight_decay)
    optimizer = PartialJDOptimizer(
        base,
        model,
        weighting=config.weighting,
        considered=None if config.grouped else model[2],
        gramian_mode=config.gramian_mode,  # type: ignore[arg-type]
        distributed=config.distributed,  # type: ignore[arg-type]
        nonfinite=config.nonfinite,  # type: ignore[arg-type]
    )
    return model, optimizer


def trained(config: Config) -> tuple[nn.Sequential, PartialJDOptimizer]:
    model, optimizer = built(config)
    for n in range(config.steps):
        optimizer.step(losses_of(model, batch(n)))
        optimizer.zero_grad()
    for n in range(config.skips):
        optimizer.step(losses_of(model, batch(10 + n)) * float("nan"))
    if config.after == "backward":
        optimizer.backward(losses_of(model, batch(20)))
    elif config.after == "zero_grad":
        optimizer.backward(losses_of(model, batch(20)))
        optimizer.zero_grad()
    elif config.after == "close":
        optimizer.close()
    return model, optimizer


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(configs(), st.sampled_from(sorted(ROUNDTRIPS)))
def test_every_attribute_of_the_wrapper_survives_deepcopy_and_pickle(
    config: Config, roundtrip: str
) -> None:
    model, optimizer = trained(config)
    assert optimizer.skipped_steps == config.skips
    restored = ROUNDTRIPS[roundtrip](optimizer)
    assert isinstance(restored, PartialJDOptimizer)
    assert restored.model is not model and restored.base is not optimizer.base
    assert_same_wrapper(optimizer, restored)
    if config.after == "close":
        with pytest.raises(ValueError):
            restored.step(losses_of(restored.model, batch(30)))
        return
    # The copy steps as the original does, and independently of it. (A copy's parameters have no
    # .grad, as with torch's optimizers: a pending backward is not carried, so clear it here.)
    before = parameters_of(model)
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the "cleared" case's warning is pinned elsewhere)
        optimizer.step(losses_of(model, batch(30)))
        restored.step(losses_of(restored.model, batch(30)))
    assert_same_wrapper(optimizer, restored, timings=False)
    assert not same_tensors(before, parameters_of(model))


def test_skipped_steps_and_last_step_survive_deepcopy_and_pickle_with_their_values() -> None:
    """Counts that differ from every default (3 skips after 2 steps), and the last step's tensors
    themselves (the pickled copy of a wrapper holds them, not empty ones)."""
    model = mlp()
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=model[2], nonfinite="skip"
    )
    for n in range(2):
        optimizer.step(losses_of(model, batch(n)))
    for n in range(3):
        optimizer.step(losses_of(model, batch(n)) * float("inf"))
    assert optimizer.skipped_steps == 3 and optimizer.last_step is None
    optimizer.backward(losses_of(model, batch(5)))
    step = optimizer.last_step
    assert step is not None and step.gramian.shape == (5, 5)
    for roundtrip in ROUNDTRIPS.values():
        restored = roundtrip(optimizer)
        assert restored.skipped_steps == 3
        assert_same(restored.last_step, step, "last_step")
        assert float(restored.last_step.gramian.abs().sum()) > 0
        restored.step(losses_of(restored.model, batch(6)) * float("nan"))
        assert restored.skipped_steps == 4 and optimizer.skipped_steps == 3


# -- checkpoints in the base optimizer's format ----------------------------------------------------


def grouped_params(model: nn.Sequential) -> list[dict[str, Any]]:
    return [
        {"params": model[0].parameters(), "lr": 0.02, "note": "trunk"},
        {"params": model[2].parameters(), "considered": True, "weight_decay": 0.05},
    ]


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(st.sampled_from(sorted(BASES)), st.integers(1, 3))
def test_plain_and_wrapped_checkpoints_cross_both_ways_with_every_state_tensor(
    base: str, steps: int
) -> None:
    """A wrapped optimizer's checkpoint is the base's: it loads into a plain optimizer of the same
    class (every state tensor, every group option, custom keys included) and back into a new
    wrapper, and training goes on from it as from the original."""
    model = mlp()
    wrapped = PartialJDOptimizer(BASES[base](grouped_params(model), 0.01), model)
    for n in range(steps):
        wrapped.step(losses_of(model, batch(n)))
        wrapped.zero_grad()
    checkpoint = copy.deepcopy(wrapped.state_dict())
    assert_same(checkpoint, wrapped.base.state_dict(), "state_dict")
    assert set(checkpoint) == {"state", "param_groups"}
    assert len(checkpoint["state"]) == 4 and checkpoint["state"][0]  # state for every parameter

    plain_model = copy.deepcopy(model)
    plain = BASES[base](grouped_params(plain_model), 0.01)
    assert set(plain.state_dict()["param_groups"][0]) == set(checkpoint["param_groups"][0])
    plain.load_state_dict(copy.deepcopy(checkpoint))
    assert_same(plain.state_dict(), checkpoint, "plain")
    assert plain.param_groups[0]["note"] == "trunk" and plain.param_groups[1]["considered"]

    back_model = copy.deepcopy(plain_model)
    back = PartialJDOptimizer(BASES[base](grouped_params(back_model), 0.0), back_model)
    back.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert_same(back.state_dict(), checkpoint, "wrapped again")
    assert back.param_groups is back.base.param_groups and back.state is back.base.state
    assert back.param_groups[1]["weight_decay"] == 0.05  # the checkpoint's, not the builder's

    # Training goes on identically from the checkpoint, wrapped and plain (same gradients).
    for optimizer, m in ((wrapped, model), (back, back_model)):
        optimizer.step(losses_of(m, batch(9)))
    assert_same(back.state_dict(), wrapped.state_dict(), "after a step")  # (the same program)
    assert same_tensors(parameters_of(back_model), parameters_of(model))
    plain_model.zero_grad()
    weights = back.last_step.weights if back.last_step is not None else None
    assert weights is not None
    torch.autograd.backward(losses_of(plain_model, batch(9)), weights)
    plain.step()
    assert_same(plain.state_dict(), wrapped.state_dict(), "plain after a step", rtol=1e-10)


# -- JDScaler --------------------------------------------------------------------------------------


def scaler_loop(scaler: JDScaler, steps: list[bool], seed: int = 0) -> PartialJDOptimizer:
    """``steps``: overflow or not, one scaler call each (the scale backs off or grows)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    for n, overflow in enumerate(steps):
        losses = losses_of(model, batch(n).float()) * (float("inf") if overflow else 1.0)
        scaler(losses, optimizer)
        optimizer.zero_grad()
    return optimizer


SCALER_OPTIONS = st.fixed_dictionaries(
    {
        "init_scale": st.sampled_from([2.0**4, 2.0**10, 3.0]),
        "growth_factor": st.sampled_from([2.0, 3.0]),
        "backoff_factor": st.sampled_from([0.5, 0.25]),
        "growth_interval": st.integers(1, 3),
    }
)


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(SCALER_OPTIONS, st.lists(st.booleans(), max_size=5), st.sampled_from(sorted(ROUNDTRIPS)))
def test_jd_scaler_state_round_trips_in_full(
    options: dict[str, Any], steps: list[bool], roundtrip: str
) -> None:
    """Scale, growth tracker, growth/backoff factors and interval: through ``state_dict`` into a
    scaler built with other options, and through deepcopy/pickle; the copies then scale and
    update as the original does."""
    scaler = JDScaler("cpu", **options)
    scaler_loop(scaler, steps)
    state = scaler.state_dict()
    expected_keys = {"scale", "growth_factor", "backoff_factor", "growth_interval"}
    assert expected_keys | {"_growth_tracker"} == set(state)
    loaded = JDScaler(
        "cpu", init_scale=7.0, growth_factor=5.0, backoff_factor=0.9, growth_interval=99
    )
    loaded.load_state_dict(copy.deepcopy(state))
    copied = ROUNDTRIPS[roundtrip](scaler)
    for other in (loaded, copied):
        assert_same(other.state_dict(), state, "state_dict")
    # (GradScaler pickles its scale and tracker as numbers, made tensors again on first use: their
    # values are in the state dict; every other attribute is compared as it is.)
    lazy = {"_scale", "_growth_tracker", "_init_scale", "_init_growth_tracker"}
    mine, theirs = vars(scaler._scaler), vars(copied._scaler)
    assert set(mine) == set(theirs)
    for key in set(mine) - lazy - {"_per_optimizer_states"}:
        assert_same(theirs[key], mine[key], key)
    assert set(vars(copied)) == set(vars(scaler)) == {"_scaler"}
    # They go on identically: the same next scales and trackers, overflow or not.
    for other in (scaler, loaded, copied):
        scaler_loop(other, [False, True, False, False], seed=1)
    assert_same(loaded.state_dict(), scaler.state_dict(), "loaded, then stepped")
    assert_same(copied.state_dict(), scaler.state_dict(), "copied, then stepped")


def test_jd_scaler_load_state_dict_restores_the_scale_used_by_the_next_backward() -> None:
    scaler = JDScaler("cpu", init_scale=2.0**6, growth_interval=1)
    scaler_loop(scaler, [True, False, False])  # 64 -> 32 -> 64 -> 128
    assert scaler.state_dict()["scale"] == 128.0
    fresh = JDScaler("cpu", init_scale=2.0**16)
    fresh.load_state_dict(scaler.state_dict())
    losses = torch.ones(3, requires_grad=True)
    assert torch.equal(fresh._scaler.scale(losses), 128.0 * losses)
    after_use = JDScaler("cpu", init_scale=2.0**16)  # a scaler whose scale tensor exists already
    scaler_loop(after_use, [False])
    after_use.load_state_dict(scaler.state_dict())
    assert after_use.state_dict() == scaler.state_dict()
    assert torch.equal(after_use._scaler.scale(losses), 128.0 * losses)


# -- a None-returning closure after a non-finite backward ------------------------------------------


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_none_returning_closure_after_a_non_finite_backward_raises_or_skips(
    nonfinite: str,
) -> None:
    """Lightning's order: the closure runs ``zero_grad`` and ``backward(losses)`` itself and
    returns ``None``; on non-finite losses that step raises or is skipped (counted), never taken
    on the non-finite gradients, and nothing (parameters, base state) changes."""
    model = mlp()
    optimizer = PartialJDOptimizer(
        Adam(model.parameters(), lr=0.1),
        model,
        considered=model[2],
        nonfinite=nonfinite,  # type: ignore[arg-type]
    )
    optimizer.step(losses_of(model, batch(0)))  # some Adam state
    before = parameters_of(model), copy.deepcopy(optimizer.state_dict())

    def none_closure() -> None:
        optimizer.zero_grad()
        optimizer.backward(losses_of(model, batch(1)) * float("inf"))

    if nonfinite == "raise":
        with pytest.raises(ValueError, match="not finite"):
            optimizer.step(none_closure)
    else:
        assert optimizer.step(none_closure) is None
        assert optimizer.skipped_steps == 1
    assert same_tensors(parameters_of(model), before[0])
    assert_same(optimizer.state_dict(), before[1], "state")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    optimizer.zero_grad()  # and training goes on
    optimizer.step(lambda: losses_of(model, batch(2)))
    assert not same_tensors(parameters_of(model), before[0])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_jd_step_after_a_non_finite_backward_never_steps_on_inf(nonfinite: str) -> None:
    """Gradient accumulation whose last micro-batch goes through ``step(losses)``: an earlier
    micro-batch overflowed, so the accumulated gradient is not finite; the step must raise or
    skip as ``nonfinite`` says, as a plain ``step()`` does."""
    model = mlp()
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1),
        model,
        considered=model[2],
        nonfinite=nonfinite,  # type: ignore[arg-type]
    )
    optimizer.backward(losses_of(model, batch(0)) * float("inf"))
    with contextlib.suppress(ValueError):
        optimizer.step(losses_of(model, batch(1)))
    assert all(torch.isfinite(p).all() for p in model.parameters())


class AbsTrunk(nn.Module):
    """``b(|a(x)|)`` with ``|h| = sqrt(h·h)``: two units of ``a`` exactly 0, where the backward
    of ``sqrt`` is ``0·inf = NaN``; the losses and the Gramian (``b`` considered) are finite."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def zero_units(self) -> None:
        with torch.no_grad():
            self.a.weight[:2], self.a.bias[:2] = 0.0, 0.0

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.b(torch.sqrt(self.a(x) * self.a(x)))
        return out


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("how", ["step(losses)", "backward, step()", "resumed"])
def test_nan_gradients_below_the_considered_part_never_reach_the_parameters(
    nonfinite: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finite losses and Gramian, NaN in the trunk's backward: ``step(losses)`` raises or skips
    with nothing changed (gradients restored); ``backward(losses)`` leaves them, as for
    non-finite losses, and the ``step()`` after it raises or skips. NaN used to reach the
    trunk's weights either way."""
    if how == "resumed":
        from pjd_optim import _resume

        monkeypatch.setattr(_resume, "MIN_SAVED_FLOPS", 0)
    torch.manual_seed(0)
    model = AbsTrunk()
    optimizer = PartialJDOptimizer(
        Adam(model.parameters(), lr=0.1),
        model,
        considered=[model.b],
        nonfinite=nonfinite,  # type: ignore[arg-type]
    )
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    optimizer.step((model(x) - y).pow(2).mean(dim=1))  # some Adam state (finite)
    optimizer.zero_grad()
    model.zero_units()
    before = parameters_of(model), copy.deepcopy(optimizer.state_dict())
    losses = (model(x) - y).pow(2).mean(dim=1)
    assert torch.isfinite(losses).all()
    if how == "backward, step()":
        optimizer.backward(losses)
        assert not torch.isfinite(model.a.weight.grad).all()  # type: ignore[arg-type]
        act: Callable[[], object] = optimizer.step
    else:
        act = lambda: optimizer.step(losses)  # noqa: E731
    if nonfinite == "raise":
        with pytest.raises(ValueError, match=r"not finite|non-finite"):
            act()
    else:
        act()
        assert optimizer.skipped_steps == 1
    if how != "backward, step()":
        assert all(p.grad is None for p in model.parameters())
    assert same_tensors(parameters_of(model), before[0])
    assert_same(optimizer.state_dict(), before[1], "state")


# -- the plain-loop warning after a JD step --------------------------------------------------------


def caught_messages(action: Callable[[], object]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught]


def test_the_plain_loop_warning_comes_once_after_jd_steps() -> None:
    """JD steps, then the plain loop (``loss.backward()``, ``step()``): the first plain step warns
    that it was plain; later ones do not; JD steps (``step(losses)``, ``backward`` + ``step()``)
    never warn."""
    model = mlp()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])

    def jd_steps() -> None:
        optimizer.step(losses_of(model, batch(0)))
        optimizer.zero_grad()
        optimizer.backward(losses_of(model, batch(1)))
        optimizer.step()
        optimizer.zero_grad()

    def plain_step(n: int) -> Callable[[], None]:
        def run() -> None:
            torch.autograd.backward(losses_of(model, batch(n)).mean())
            optimizer.step()
            optimizer.zero_grad()

        return run

    assert caught_messages(jd_steps) == []
    first = caught_messages(plain_step(2))
    assert len(first) == 1 and "without Jacobian descent" in first[0]
    assert caught_messages(plain_step(3)) == []
    assert caught_messages(jd_steps) == []


def test_a_plain_step_right_after_a_jd_step_without_zero_grad_warns() -> None:
    """``step(losses)`` consumed its backward: a following ``step()`` re-applies the gradient left
    in ``.grad`` without Jacobian descent, and says so."""
    model = mlp()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    assert caught_messages(lambda: optimizer.step(losses_of(model, batch(0)))) == []
    messages = caught_messages(optimizer.step)
    assert len(messages) == 1 and "without Jacobian descent" in messages[0]


# -- task objectives with a parameter tied across modules ------------------------------------------


class TiedLM(nn.Module):
    """An embedding tied to the output projection, a mixing layer between them, two task heads
    reading the logits (a language-model loss and an auxiliary one)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 5)
        self.mix = nn.Linear(5, 5)
        self.out = nn.Linear(5, 9, bias=True)
        self.out.weight = self.embed.weight
        self.aux = nn.Linear(9, 1)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.out(torch.tanh(self.mix(self.embed(ids))))
        return logits, self.aux(logits).squeeze(-1)


def task_losses(model: TiedLM, ids: Tensor, targets: Tensor) -> list[Tensor]:
    logits, aux = model(ids)
    lm = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return [lm, aux.pow(2).mean()]


@pytest.mark.parametrize("considered", ["embed", "out", "embed_and_mix"])
def test_task_objectives_with_a_weight_tied_across_modules_match_the_oracle(
    considered: str,
) -> None:
    """The tied weight is considered through either module: its Jacobian sums both uses (the
    embedding's and the output layer's), and every ``.grad`` is the oracle's (one
    ``autograd.grad`` per task loss): the considered parameters and those below any of their
    uses get ``Σ w_j ∇ℓ_j`` (``mix`` feeds the output layer's use of the tied weight), the heads
    after the considered part the plain sum."""
    torch.manual_seed(0)
    model = TiedLM().double()
    reference = copy.deepcopy(model)
    modules: dict[str, list[nn.Module]] = {
        "embed": [model.embed],
        "out": [model.out],
        "embed_and_mix": [model.embed, model.mix],
    }
    names = {
        "embed": ["embed.weight"],
        "out": ["embed.weight", "out.bias"],
        "embed_and_mix": ["embed.weight", "mix.weight", "mix.bias"],
    }[considered]
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=modules[considered]
    )
    ids = torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 9, (4, 6), generator=torch.Generator().manual_seed(2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step(task_losses(model, ids, targets))
    assert optimizer.last_step is not None
    check_task_step(
        optimizer, model, reference, before, names, task_losses(reference, ids, targets)
    )


def check_task_step(
    optimizer: PartialJDOptimizer,
    model: nn.Module,
    reference: nn.Module,
    before: dict[str, Tensor],
    considered: list[str],
    losses: list[Tensor],
) -> None:
    """Gramian, weights and the SGD update of every parameter against the oracle: the heads
    (parameters used after every use of a considered one) move by the plain sum, the rest by the
    weighted sum."""
    assert optimizer.last_step is not None
    ref = dict(reference.named_parameters())
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, [ref[n] for n in considered], retain_graph=True)
        rows.append(torch.cat([g.flatten() for g in grads]))
    jacobian = torch.stack(rows)
    gramian = jacobian @ jacobian.T
    w = UPGrad()(gramian)
    assert relative_error(optimizer.last_step.gramian, gramian) < 1e-10
    assert relative_error(optimizer.last_step.weights, w) < 1e-9
    heads = {"out.bias", "aux.weight", "aux.bias", "head1.weight", "head1.bias", "head2.weight",
             "head2.bias"} - set(considered)  # fmt: skip
    after = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        coefficients = torch.ones_like(w) if name in heads else w
        total = sum(c * loss for c, loss in zip(coefficients, losses, strict=True))
        assert isinstance(total, Tensor)
        (expected,) = torch.autograd.grad(total, p, retain_graph=True)
        moved = (before[name] - after[name].detach()) / 0.1  # SGD: p ← p − lr · grad
        assert relative_error(moved, expected) < 1e-9, name


class TwoHeads(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.mid = nn.Linear(4, 4, bias=bias)
        self.head1, self.head2 = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = torch.tanh(self.mid(torch.tanh(self.trunk(x))))
        return [self.head1(features).pow(2).mean(), self.head2(features).exp().mean()]


@pytest.mark.parametrize("bias", [True, False])
def test_task_objectives_below_a_considered_linear_with_or_without_bias(bias: bool) -> None:
    """The trunk below the considered layer gets the weighted sum, whether that layer has a bias
    (its weight and bias used by one node) or not (its weight reached through a transposition)."""
    torch.manual_seed(0)
    model = TwoHeads(bias).double()
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model.mid)
    x = torch.randn(6, 3, dtype=F64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step(model(x))
    names = ["mid.weight", "mid.bias"] if bias else ["mid.weight"]
    check_task_step(optimizer, model, reference, before, names, reference(x))


def test_the_non_finite_check_is_exact_where_a_norm_overflows() -> None:
    """Finite gradients whose 2-norm overflows (float16 above 256, float32 above 1e19) are
    finite: the step is not refused; a NaN entry in any of them is found."""
    from pjd_optim._checks import nonfinite_gradient

    big = torch.zeros(3, requires_grad=True)
    half = torch.zeros(2, dtype=torch.float16, requires_grad=True)
    small = torch.zeros(2, requires_grad=True)
    big.grad = torch.tensor([3e19, 3e19, 1.0])
    half.grad = torch.tensor([300.0, 300.0], dtype=torch.float16)
    small.grad = torch.tensor([1.0, 2.0])
    assert nonfinite_gradient([big, half, small]) is None
    for p in (big, half, small):
        saved = p.grad
        assert saved is not None
        p.grad = saved.clone()
        p.grad[-1] = float("nan")
        found = nonfinite_gradient([big, half, small])
        assert found is not None and found[0] is p and found[1] is p.grad
        p.grad = saved
