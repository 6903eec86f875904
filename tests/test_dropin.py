"""Drop-in in real scripts: checkpoints both ways, schedulers, copies, delegation, traps."""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from oracle import (
    assert_same_parameters,
    assert_unchanged,
    lightning_fit,
    oracle_backward,
    relative_error,
    snapshot,
    trainable,
)
from torch import Tensor, nn
from torch.optim import SGD, Adam, Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, LRScheduler, StepLR

from pjd_optim import PartialJDOptimizer


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def adam(model: nn.Module) -> Adam:
    """Two groups, as with weight-decay exclusion (the wrapper must keep them)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups: list[dict[str, Any]] = [
        {"params": weights, "weight_decay": 0.01},
        {"params": biases, "weight_decay": 0.0},
    ]
    return Adam(groups, lr=1e-2)


def batch(seed: int) -> Tensor:
    return torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def losses_of(model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    out: Tensor = (model(x) - 1.0).pow(2).sum(dim=1)
    return out


def oracle_step(model: nn.Sequential, optimizer: Optimizer, x: Tensor) -> None:
    """A step of the plain ``optimizer`` on UPGrad's weighted gradient (the oracle's), with the
    last layer considered."""
    oracle_backward(losses_of(model, x), list(model[2].parameters()), trainable(model))
    optimizer.step()
    optimizer.zero_grad()


def assert_same_state(a: Optimizer, b: Optimizer, tolerance: float = 0.0) -> None:
    """Same groups (but for a ``"considered"`` flag) and the same state, to ``tolerance``."""

    def groups(o: Optimizer) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in g.items() if k != "considered"}
            for g in o.state_dict()["param_groups"]
        ]

    assert groups(a) == groups(b)
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        for name, value in sa[key].items():
            other = torch.as_tensor(sb[key][name])
            assert relative_error(torch.as_tensor(value), other) <= tolerance, (key, name)


# -- checkpoints ------------------------------------------------------------------------------


def test_a_plain_checkpoint_loads_into_the_wrapper_and_training_continues_from_it() -> None:
    model = mlp()
    plain = adam(model)
    for seed in range(2):  # an ordinary run, then its checkpoint
        torch.autograd.backward(losses_of(model, batch(seed)).mean())
        plain.step()
        plain.zero_grad()
    checkpoint = copy.deepcopy((model.state_dict(), plain.state_dict()))

    resumed, reference = mlp(1), mlp(2)
    for m in (resumed, reference):
        m.load_state_dict(checkpoint[0])
    wrapper = PartialJDOptimizer(adam(resumed), resumed, considered=resumed[2])
    wrapper.load_state_dict(copy.deepcopy(checkpoint[1]))
    ref_optimizer = adam(reference)
    ref_optimizer.load_state_dict(copy.deepcopy(checkpoint[1]))
    assert_same_state(wrapper, ref_optimizer)
    for seed in (2, 3):  # JD steps from the loaded Adam state
        wrapper.step(losses_of(resumed, batch(seed)))
        wrapper.zero_grad()
        oracle_step(reference, ref_optimizer, batch(seed))
    assert_same_parameters(resumed, reference)
    assert_same_state(wrapper, ref_optimizer, tolerance=1e-10)


def test_the_wrappers_checkpoint_loads_into_the_plain_optimizer() -> None:
    model = mlp()
    wrapper = PartialJDOptimizer(adam(model), model, considered=model[2])
    for seed in range(2):
        wrapper.step(losses_of(model, batch(seed)))
        wrapper.zero_grad()
    checkpoint = copy.deepcopy(wrapper.state_dict())
    plain_model = copy.deepcopy(model)
    plain = adam(plain_model)
    plain.load_state_dict(checkpoint)
    assert_same_state(plain, wrapper)
    for m, o in ((model, wrapper.base), (plain_model, plain)):  # the same plain step from there
        torch.autograd.backward(losses_of(m, batch(5)).mean())
        o.step()
    assert_same_parameters(model, plain_model)


# -- schedulers -------------------------------------------------------------------------------

SCHEDULERS = {
    "LambdaLR": lambda o: LambdaLR(o, [lambda e: 0.9**e, lambda e: 1.0 / (e + 1)]),
    "StepLR": lambda o: StepLR(o, step_size=1, gamma=0.5),
    "CosineAnnealingLR": lambda o: CosineAnnealingLR(o, T_max=4),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=6),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_scheduler_built_on_the_base_before_wrapping_keeps_working(name: str) -> None:
    make: Any = SCHEDULERS[name]
    model, twin = mlp(), mlp()
    base = adam(model)
    scheduler: LRScheduler = make(base)  # built before the wrap, as in existing scripts
    wrapper = PartialJDOptimizer(base, model, considered=model[2])
    twin_base = adam(twin)
    twin_scheduler: LRScheduler = make(twin_base)
    for seed in range(3):
        wrapper.step(losses_of(model, batch(seed)))
        wrapper.zero_grad()
        scheduler.step()
        twin_base.step()
        twin_scheduler.step()
        assert [g["lr"] for g in wrapper.param_groups] == [g["lr"] for g in twin_base.param_groups]


# -- copies and pickles -----------------------------------------------------------------------


def test_deepcopy_of_the_optimizer_is_an_independent_working_optimizer() -> None:
    model = mlp()
    optimizer = PartialJDOptimizer(adam(model), model, considered=model[2])
    optimizer.step(losses_of(model, batch(0)))
    optimizer.zero_grad()
    clone = copy.deepcopy(optimizer)
    assert clone.model is not model and clone.base is not optimizer.base
    assert all(
        p is q for p, q in zip(clone.model.parameters(), trainable(clone.model), strict=True)
    )
    reference = cast(nn.Sequential, copy.deepcopy(clone.model))
    ref_optimizer = adam(reference)
    ref_optimizer.load_state_dict(copy.deepcopy(clone.base.state_dict()))
    before = [p.detach().clone() for p in model.parameters()]
    clone.step(losses_of(clone.model, batch(1)))  # the copy steps its own model, exactly
    oracle_step(reference, ref_optimizer, batch(1))
    assert_same_parameters(clone.model, reference)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    optimizer.zero_grad()
    optimizer.step(losses_of(model, batch(1)))  # and the original still works
    assert optimizer.last_step is not None


def test_pickle_of_the_optimizer_and_of_the_hooked_model() -> None:
    model = mlp()
    optimizer = PartialJDOptimizer(adam(model), model, considered=model[2])
    optimizer.step(losses_of(model, batch(0)))
    restored = pickle.loads(pickle.dumps(optimizer))
    assert isinstance(restored, PartialJDOptimizer)
    restored.zero_grad()
    restored.step(losses_of(restored.model, batch(1)))
    assert restored.last_step is not None and restored.last_step.weights.shape == (5,)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # a whole hooked model pickles too (its hooks come back inert)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with pytest.raises(ValueError, match=r"copy"):
        optimizer.step(losses_of(loaded, batch(2)))


def test_losses_from_a_deepcopy_of_the_model_are_a_clear_error_and_change_nothing() -> None:
    model = mlp()
    optimizer = PartialJDOptimizer(adam(model), model, considered=model[2])
    optimizer.step(losses_of(model, batch(0)))
    optimizer.zero_grad()
    before = snapshot(model, optimizer)
    ema = copy.deepcopy(model)  # e.g. timm's ModelEmaV3
    with pytest.raises(ValueError, match=r"copy\.deepcopy"):
        optimizer.step(losses_of(ema, batch(1)))
    assert_unchanged(before, snapshot(model, optimizer))


# -- delegation ---------------------------------------------------------------------------------


class SecondOrder(SGD):
    is_second_order = True

    def curvature(self) -> str:
        return "hessian"


def test_attributes_the_wrapper_does_not_define_are_the_base_optimizers() -> None:
    model = mlp()
    optimizer = PartialJDOptimizer(SecondOrder(model.parameters(), lr=0.1), model, considered=model)
    assert optimizer.is_second_order is True and optimizer.curvature() == "hessian"
    plain = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model)
    assert not hasattr(plain, "is_second_order")  # timm's train.py test
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = plain.no_such_thing


def test_timm_lookahead_sync_through_the_wrapper() -> None:
    timm_optim = pytest.importorskip("timm.optim")
    model = mlp()
    optimizer = PartialJDOptimizer(
        timm_optim.create_optimizer_v2(model, "lookahead_sgd", lr=0.1), model, considered=model[2]
    )
    for seed in range(2):  # timm's train.py syncs at the end of every epoch
        optimizer.step(losses_of(model, batch(seed)))
        fast = [p.detach().clone() for p in model.parameters()]
        optimizer.sync_lookahead()
    slow = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


# -- traps --------------------------------------------------------------------------------------


def test_after_close_a_jacobian_descent_step_is_a_clear_error_and_changes_nothing() -> None:
    model = mlp()
    optimizer = PartialJDOptimizer(adam(model), model, considered=model[2])
    optimizer.step(losses_of(model, batch(0)))
    optimizer.zero_grad()
    optimizer.close()
    before = snapshot(model, optimizer)
    for call in (optimizer.step, optimizer.backward):
        with pytest.raises(ValueError, match="closed"):
            call(losses_of(model, batch(1)))
    assert_unchanged(before, snapshot(model, optimizer))


def test_torchjd_upgrad_aggregator_as_weighting_gives_its_weights() -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    model = mlp()
    twin = copy.deepcopy(model)
    ours = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    theirs = PartialJDOptimizer(
        SGD(twin.parameters(), lr=0.1), twin, considered=twin[2], weighting=aggregation.UPGrad()
    )
    w_ours = ours.backward(losses_of(model, batch(0)))
    w_theirs = theirs.backward(losses_of(twin, batch(0)))
    assert relative_error(w_theirs, w_ours) < 1e-8
    with pytest.raises(TypeError, match="Jacobian"):
        PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, weighting=aggregation.Mean())


# -- frameworks ---------------------------------------------------------------------------------


def test_whole_model_torch_compile_is_exact() -> None:
    """``torch.compile(model)`` (timm's ``--torchcompile``): the considered modules run behind
    graph breaks, their taps eagerly; the step matches the oracle."""
    model = mlp()
    reference = copy.deepcopy(model)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=model[2])
    ref_optimizer = SGD(reference.parameters(), lr=0.1)
    compiled = torch.compile(model)
    for seed in range(2):
        optimizer.step(losses_of(compiled, batch(seed)))
        optimizer.zero_grad()
        oracle_step(reference, ref_optimizer, batch(seed))
    assert_same_parameters(model, reference)


class _Twice(nn.Module):
    """A class of its own: the compiled code of its instances is shared by this test only."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.n, self.b, self.h = (
            nn.Linear(4, 6),
            nn.LayerNorm(6),
            nn.Linear(6, 6),
            nn.Linear(6, 3),
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.h(torch.relu(self.b(self.n(torch.tanh(self.a(x))))))
        return out


def test_compiled_code_without_the_hooks_of_a_later_optimizer_is_refused() -> None:
    """Two instances of a class, each with its optimizer, compiled after wrapping: the second's
    considered ``n`` runs in code compiled for the first (``b`` tapped behind a graph break,
    ``n`` inside the compiled graph), without its hook. Its Gramian was silently 3 % off (``n``
    left out); the step is refused with nothing changed (or exact, where dynamo recompiles for
    the hooks, as torch 2.4 does), and the first stays exact."""
    from oracle import assert_unchanged, oracle_gramian, snapshot

    x = batch(0).float()
    first, second = _Twice(), _Twice()
    ours = PartialJDOptimizer(SGD(first.parameters(), lr=0.1), first, considered=[first.b])
    ours.backward(losses_of(torch.compile(first), x))
    assert ours.last_step is not None
    expected = oracle_gramian(losses_of(first, x), list(first.b.parameters()))
    assert relative_error(ours.last_step.gramian, expected) < 1e-5
    considered = [second.b, second.n]
    late = PartialJDOptimizer(SGD(second.parameters(), lr=0.1), second, considered=considered)
    before = snapshot(second, late)
    losses = losses_of(torch.compile(second), x)
    params = [p for module in considered for p in module.parameters()]
    expected = oracle_gramian(losses_of(second, x), params)
    try:
        late.backward(losses)
    except ValueError as error:  # (torch 2.14: refused)
        assert "compile" in str(error)
        assert_unchanged(before, snapshot(second, late))
    else:  # (torch 2.4 recompiles for the hooks: exact)
        assert late.last_step is not None
        assert relative_error(late.last_step.gramian, expected) < 1e-5


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = x + self.fc(self.norm(x))
        return out


@pytest.mark.parametrize("guards", [True, False])
def test_compiled_blocks_with_only_the_last_considered(
    guards: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Identical blocks, the last one considered, the optimizer built before compiling: dynamo
    reuses the graph compiled for the first block (no hook) for the last one unless it guards on
    module hooks. Without the guards the step is refused, naming the setting; with them, exact."""
    import torch._dynamo
    from oracle import oracle_gramian

    torch._dynamo.reset()  # (this test's own compilations only)
    if not hasattr(torch._dynamo.config, "skip_nnmodule_hook_guards"):  # (torch < 2.5)
        pytest.skip("this torch has no setting for dynamo's guards on module hooks")
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", not guards)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Block(), _Block(), nn.Linear(4, 2))
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model[2]])
    compiled = torch.compile(model)
    x = torch.randn(5, 3)
    if not guards:
        with pytest.raises(ValueError, match="skip_nnmodule_hook_guards"):
            optimizer.backward(losses_of(compiled, x))
        return
    optimizer.backward(losses_of(compiled, x))
    assert optimizer.last_step is not None
    expected = oracle_gramian(losses_of(model, x), list(model[2].parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-5


@pytest.mark.parametrize("through", ["lightning_optimizer", "optimizer"])
def test_lightning_manual_optimisation_is_exact(through: str) -> None:
    """``self.optimizers()`` is Lightning's proxy of the optimizer; ``backward`` may be called on
    it or on ``.optimizer``, and ``step()`` passes a closure that returns ``None``."""
    pytest.importorskip("lightning")
    from lightning.pytorch import LightningModule

    data = [(batch(seed), None) for seed in range(3)]

    class Module(LightningModule):
        def __init__(self, model: nn.Sequential) -> None:
            super().__init__()
            self.model = model
            self.automatic_optimization = False

        def configure_optimizers(self) -> PartialJDOptimizer:
            return PartialJDOptimizer(
                SGD(self.model.parameters(), lr=0.1), self.model, considered=self.model[2]
            )

        def training_step(self, batch: tuple[Tensor, None], index: int) -> None:
            optimizer = self.optimizers()
            assert not isinstance(optimizer, list)
            optimizer.zero_grad()
            target: Any = optimizer if through == "lightning_optimizer" else optimizer.optimizer
            target.backward(losses_of(self.model, batch[0]))
            optimizer.step()

    model = mlp()
    reference = copy.deepcopy(model)
    messages = lightning_fit(Module(model), data)
    assert not [m for m in messages if "Jacobian descent" in m]
    ref_optimizer = SGD(reference.parameters(), lr=0.1)
    for x, _ in data:
        oracle_step(reference, ref_optimizer, x)
    assert_same_parameters(model, reference)
