"""State round-trips as properties, and the optimizer-state behaviours the option audit found
unpinned: every attribute of ``PartialJDOptimizer`` and of ``JDScaler`` through ``deepcopy`` and
``pickle``; ``state_dict``/``load_state_dict`` in the base optimizer's format (plain and wrapped
checkpoints cross both ways, every state tensor and group option); ``JDScaler``'s state in full; a
``None``-returning closure after a non-finite backward; the plain-loop warning after a JD step;
task objectives with a parameter tied between a considered module and another one."""

import copy
import dataclasses
import pickle
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from statecase import assert_same, batch, losses_of, mlp, parameters_of, same_tensors
from torch import nn
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
    # read_grads, is not carried: a copy's parameters have no .grad, as torch's optimizers.)


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
