"""Considered parameters and the calls that own them, against the per-sample oracle: used
outside their modules' calls (functional heads, penalties, heads tied by hand, a parent using its
child's bias) the step is refused; registered in a module and its child, counted once; legacy
weight norm, checkpoints (reentrant or not), weights cast once by autocast for several calls, and
recurrent cells starting without a state are exact or refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import SGD

from pjd_optim import PartialJDOptimizer, _resume

_resume_default = _resume.MIN_SAVED_FLOPS  # read at import, before the autouse fixture lifts it


class FunctionalHead(nn.Module):
    """``head``'s parameters are used through ``F.linear``, never by calling ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        return nn.functional.linear(h, self.head.weight, self.head.bias).pow(2).sum(dim=1)


class PenalisedHead(nn.Module):
    """Per-sample losses plus a penalty on a weight (``where``: the considered head's, computed
    before or after the forward, or the body's), or through a head tied by hand to ``emb``."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 2)
        self.emb = nn.Embedding(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        penalty = torch.zeros(())
        if self.where == "head, before the forward":
            penalty = 0.05 * self.head.weight.pow(2).sum()
        h = torch.tanh(self.body(x))
        if self.where == "tied by hand":
            return nn.functional.linear(h, self.emb.weight).pow(2).sum(dim=1)
        out: torch.Tensor = self.head(h).pow(2).sum(dim=1)
        if self.where == "head, after the forward":
            penalty = 0.05 * self.head.weight.pow(2).sum()
        if self.where == "body":
            penalty = 0.05 * self.body.weight.pow(2).sum()
        return out + penalty


OUTSIDE: dict[str, tuple[Callable[[], nn.Module], Callable[[Any], list[nn.Module]]]] = {
    "functional head": (FunctionalHead, lambda m: [m]),
    "penalty before the forward": (
        lambda: PenalisedHead("head, before the forward"),
        lambda m: [m.head],
    ),
    "penalty after the forward": (
        lambda: PenalisedHead("head, after the forward"),
        lambda m: [m.head],
    ),
    "penalty, all considered": (
        lambda: PenalisedHead("head, after the forward"),
        lambda m: [m.body, m.head],
    ),
    "tied by hand": (lambda: PenalisedHead("tied by hand"), lambda m: [m.emb, m.body]),
}


@pytest.mark.parametrize("case", sorted(OUTSIDE))
@pytest.mark.parametrize("flops", [_resume_default, 0])  # (0: the step would resume)
def test_considered_parameters_used_outside_their_modules_are_refused(
    case: str, flops: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A considered parameter the losses reach other than through its module's forward (used
    without calling the module, a penalty added to the losses, a head tied by hand): the hooks
    do not see that use's per-sample gradients, so the step is refused before anything changes
    (it used to return a Gramian 2–99 % off, and on the resumed path a wrong ``.grad``).
    ``gramian_mode="autograd"`` takes the same losses exactly."""
    from oracle import assert_unchanged, oracle_gramian, relative_error, snapshot

    monkeypatch.setattr(_resume, "MIN_SAVED_FLOPS", flops)
    build, considered = OUTSIDE[case]
    torch.manual_seed(0)
    model = build()
    x = torch.randn(5, 3)
    optimizer = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1), model, considered=considered(model)
    )
    before = snapshot(model, optimizer)
    # (a module never called is named as such: its hook may not have run, or it is used by hand)
    message = r"outside its module's forward|without calling their module"
    with pytest.raises(ValueError, match=message):
        optimizer.step(model(x))
    assert_unchanged(before, snapshot(model, optimizer))
    exact = PartialJDOptimizer(
        SGD(model.parameters(), lr=0.1),
        model,
        considered=considered(model),
        gramian_mode="autograd",
    )
    exact.backward(model(x))
    assert exact.last_step is not None
    params = [p for m in considered(model) for p in m.parameters()]
    expected = oracle_gramian(model(x), params)
    assert relative_error(exact.last_step.gramian, expected) < 1e-5


def test_a_penalty_on_a_parameter_not_considered_is_exact() -> None:
    """The control: a penalty on the body's weight, the head considered."""
    from oracle import oracle_gramian, relative_error

    torch.manual_seed(0)
    model = PenalisedHead("body")
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model.head])
    x = torch.randn(5, 3)
    optimizer.backward(model(x))
    assert optimizer.last_step is not None
    expected = oracle_gramian(model(x), list(model.head.parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-5


class TiedBiasHead(nn.Module):
    """Hugging Face's masked-LM head: ``decoder.bias`` is the head's own ``bias`` (registered in
    both); ``direct``: the head also adds it itself, outside the decoder."""

    def __init__(self, direct: bool = False) -> None:
        super().__init__()
        self.direct = direct
        self.transform, self.decoder = nn.Linear(4, 4), nn.Linear(4, 3)
        self.bias = nn.Parameter(torch.randn(3))
        self.decoder.bias = self.bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.decoder(torch.tanh(self.transform(h)))
        return out + self.bias if self.direct else out


@pytest.mark.parametrize("considered", ["decoder", "bias", "head", "decoder.weight"])
def test_a_parameter_registered_in_a_module_and_its_child_is_counted_once(considered: str) -> None:
    """The innermost owner's rule takes it (the head's re-run used to count the decoder's use
    again: a Gramian 4x the oracle's on the bias); the head adding it itself as well reaches the
    losses past every tap: refused."""
    from oracle import oracle_gramian, relative_error

    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    for direct in (False, True):
        model = TiedBiasHead(direct).double()
        choices: dict[str, list[nn.Module | torch.Tensor]] = {
            "decoder": [model.decoder],
            "bias": [model.bias],
            "head": [model],
            "decoder.weight": [model.decoder.weight],
        }
        picked = choices[considered]
        params = [
            p for c in picked for p in ([c] if isinstance(c, torch.Tensor) else c.parameters())
        ]
        optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=picked)
        losses = (model(x) - y).pow(2).mean(dim=1)
        if direct and considered != "decoder.weight":
            with pytest.raises(ValueError, match="outside its module's forward"):
                optimizer.backward(losses)
            continue
        optimizer.backward(losses)
        assert optimizer.last_step is not None
        expected = oracle_gramian((model(x) - y).pow(2).mean(dim=1), params)
        assert relative_error(optimizer.last_step.gramian, expected) < 1e-12


@pytest.mark.parametrize("considered", ["layer", "bias"])
def test_a_legacy_weight_norm_layer_is_refused_or_exact(considered: str) -> None:
    """``torch.nn.utils.weight_norm`` rebuilds ``weight`` from ``weight_g``, ``weight_v`` outside
    the Linear's forward, which the Linear rule reads: considering them is refused when the
    optimizer is built (they were silently left out: the Gramian was the bias's alone); the bias
    alone is exact; ``gramian_mode="autograd"`` takes the whole layer."""
    from oracle import oracle_gramian, relative_error

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    layer = torch.nn.utils.weight_norm(model[2])
    picked: list[nn.Module | torch.Tensor] = [layer] if considered == "layer" else [layer.bias]
    x = torch.randn(5, 3, dtype=torch.float64)
    if considered == "layer":
        with pytest.raises(ValueError, match="weight_g"):
            PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=picked)
        optimizer = PartialJDOptimizer(
            SGD(model.parameters(), lr=0.1), model, considered=picked, gramian_mode="autograd"
        )
        params = list(layer.parameters())
    else:
        optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=picked)
        params = [layer.get_parameter("bias")]
    optimizer.backward(model(x).pow(2).sum(dim=1))
    assert optimizer.last_step is not None
    expected = oracle_gramian(model(x).pow(2).sum(dim=1), params)
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12


class RootTied(nn.Module):
    """A root with a parameter of its own (hooked under the generic rule, ``considered=[root]``)
    and a head tied to the embedding: by hand in the root's forward, or by sharing the
    parameter between modules (``head.weight = emb.weight``, exact)."""

    def __init__(self, by_hand: bool) -> None:
        super().__init__()
        self.by_hand = by_hand
        self.emb, self.mix = nn.Embedding(7, 4), nn.Linear(4, 4)
        self.pos = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(ids) + self.pos))
        logits = nn.functional.linear(h, self.emb.weight) if self.by_hand else self.head(h)
        return logits.logsumexp(dim=1)


class HeadWithReference(nn.Module):
    """A considered head that reads another considered module's weight in its own forward."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.refs = [emb]  # (not registered)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h * self.scale, self.refs[0].weight)


class ParentUsingChildBias(nn.Module):
    """A parent with a parameter of its own that also adds its child's bias itself."""

    def __init__(self) -> None:
        super().__init__()
        self.child, self.scale = nn.Linear(4, 4), nn.Parameter(torch.rand(4) + 0.5)
        self.bias = self.child.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.child(x) * self.scale + 2 * self.bias
        return out


@pytest.mark.parametrize("case", ["reference in a head", "parent's bias"])
def test_a_considered_parameter_used_inside_another_considered_call_is_refused(
    case: str,
) -> None:
    """The use lies below a tap, but of a module that does not own the parameter, whose rule
    does not see it (the Gramian was 17-84 % off): refused, nothing changed."""
    from oracle import assert_unchanged, snapshot

    torch.manual_seed(0)
    x = torch.randint(0, 7, (5,))
    model: nn.Module
    considered: list[nn.Module]
    if case == "reference in a head":
        emb = nn.Embedding(7, 4)
        model = nn.Sequential(emb, nn.Tanh(), HeadWithReference(emb)).double()
        considered = [model[0], model[2]]
    else:
        model = nn.Sequential(nn.Embedding(7, 4), ParentUsingChildBias(), nn.Linear(4, 3))
        model = model.double()
        considered = [model[1]]
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=considered)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="outside its module's forward"):
        optimizer.step(model(x).pow(2).sum(dim=-1) if model(x).ndim > 1 else model(x))
    assert_unchanged(before, snapshot(model, optimizer))


@pytest.mark.parametrize("by_hand", [True, False])
def test_a_root_with_its_own_parameter_and_a_tied_head_is_exact(by_hand: bool) -> None:
    """Every parameter considered. Tied by hand in the root's forward, the root (re-run by the
    generic rule, its code reading ``self.emb.weight``) covers its children's parameters; tied
    by sharing the parameter, both modules own it and each call is seen."""
    from oracle import oracle_gramian, relative_error

    torch.manual_seed(0)
    model = RootTied(by_hand=by_hand).double()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model])
    x = torch.randint(0, 7, (5,))
    optimizer.backward(model(x))
    assert optimizer.last_step is not None
    expected = oracle_gramian(model(x), list(model.parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12


class Checkpointed(nn.Module):
    """``inp`` → ``blk`` (under ``torch.utils.checkpoint``) → ``head``."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.inp, self.blk, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        h = torch.tanh(self.inp(x))
        h = checkpoint(lambda z: torch.tanh(self.blk(z)), h, use_reentrant=self.reentrant)
        out: torch.Tensor = self.head(h).pow(2).sum(dim=1)
        return out


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("part", ["blk", "blk+head", "inp", "head"])
def test_considered_modules_and_checkpoints(reentrant: bool, part: str) -> None:
    """A reentrant checkpoint runs its function without gradients and hides it from the graph:
    a considered module inside it (``blk+head`` used to be 22 % off, silently) or below it is
    refused, nothing changed; above it, and with ``use_reentrant=False`` anywhere, exact."""
    from oracle import assert_unchanged, oracle_gramian, relative_error, snapshot

    torch.manual_seed(0)
    model = Checkpointed(reentrant).double()
    modules = [getattr(model, name) for name in part.split("+")]
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=modules)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    if reentrant and part != "head":
        before = snapshot(model, optimizer)
        with pytest.raises(ValueError, match="use_reentrant"):
            optimizer.step(model(x))
        assert_unchanged(before, snapshot(model, optimizer))
        return
    optimizer.backward(model(x))
    assert optimizer.last_step is not None
    expected = oracle_gramian(model(x), [p for m in modules for p in m.parameters()])
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12


class TwiceUnderAutocast(nn.Module):
    """``lin`` called twice (``tied``: two Linears sharing one weight), after ``a``."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.a, self.lin = nn.Linear(3, 4), nn.Linear(4, 4)
        self.other = nn.Linear(4, 4) if tied else self.lin
        if tied:
            self.other.weight = self.lin.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h: torch.Tensor = self.other(torch.tanh(self.lin(torch.tanh(self.a(x)))))
        return h.float().pow(2).sum(dim=1)


@pytest.mark.parametrize("tied", [False, True])
def test_a_weight_cast_once_by_autocast_for_several_calls_is_not_refused(tied: bool) -> None:
    """Autocast caches a weight's low-precision cast: one node that every call of the module
    (or of the modules sharing it) takes. Each path to it lies inside a call of an owner, so
    the step is not refused (it was: the walk intersected the calls of the paths), and it
    matches the oracle run under the same autocast."""
    from oracle import oracle_gramian, relative_error

    torch.manual_seed(0)
    model = TwiceUnderAutocast(tied)
    considered = [model.a, model.lin, model.other]
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=considered)
    x = torch.randn(6, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        optimizer.backward(model(x))
        losses = model(x)
    assert optimizer.last_step is not None
    params = list({id(p): p for m in considered for p in m.parameters()}.values())
    expected = oracle_gramian(losses, params)
    assert relative_error(optimizer.last_step.gramian, expected) < 2e-2


class CellLoop(nn.Module):
    """A recurrent cell unrolled over 4 steps, its first step without a state (``hx=None``)."""

    def __init__(self, cell: Callable[[int, int], nn.RNNCellBase]) -> None:
        super().__init__()
        self.inp, self.cell, self.out = nn.Linear(3, 5), cell(5, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        state: Any = None
        for t in range(h.shape[1]):
            state = self.cell(h[:, t], state)
        last = state[0] if isinstance(state, tuple) else state
        out: torch.Tensor = self.out(last).pow(2).sum(dim=1)
        return out


@pytest.mark.parametrize("cell", [nn.RNNCell, nn.GRUCell, nn.LSTMCell])
def test_a_cell_loop_starting_without_a_state_is_exact(
    cell: Callable[[int, int], nn.RNNCellBase],
) -> None:
    """The cell makes its zero state inside the per-sample re-run, without a batch dim: it was
    refused ("cannot be re-run per sample"); the re-run now gets the zeros as per-sample
    inputs."""
    from oracle import oracle_gramian, relative_error

    torch.manual_seed(0)
    model = CellLoop(cell).double()
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=[model.cell])
    x = torch.randn(4, 4, 3, dtype=torch.float64)
    optimizer.backward(model(x))
    assert optimizer.last_step is not None
    expected = oracle_gramian(model(x), list(model.cell.parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-12
