"""Per-layer Gramian rules on randomised shapes, both cost-model branches, against the oracle."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence

import pytest
import torch
from oracle import oracle_gramian, relative_error
from torch import Tensor, nn

from pjd_optim import Call, GramianRule, PartialJDOptimizer, register_gramian_rule
from pjd_optim.gramian._registry import rule_for
from pjd_optim.gramian.conv import ConvRule
from pjd_optim.gramian.embedding import EmbeddingRule
from pjd_optim.gramian.linear import LinearRule, Mode, use_ghost


def losses_of(module: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample losses ``sum(tanh(module(x_i))²)`` and the module's output."""
    out = module(inputs)
    return torch.tanh(out).pow(2).flatten(start_dim=1).sum(dim=1), out


def call_of(inputs: Tensor, losses: Tensor, out: Tensor) -> Call:
    """The record a rule receives: the input and ``∂loss_i/∂y_i`` in row ``i``."""
    (grad,) = torch.autograd.grad(losses.sum(), out, retain_graph=True)
    return Call(args=(inputs,), kwargs={}, output_grads=(grad,))


def rule_gramian(rule: GramianRule, module: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """(the rule's, the oracle's) Gramians over ``module``'s trainable parameters."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    losses, out = losses_of(module, inputs)
    ours = rule.gramian(module, [call_of(inputs, losses, out)], params)
    expected = oracle_gramian(losses, list(params.values()))
    return ours, expected


def gramian_of(model: nn.Module, considered: nn.Module, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """(ours, oracle) Gramians of a step with ``considered`` (the registered rules)."""
    optimizer = PartialJDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, considered=considered
    )
    optimizer.backward(losses_of(model, inputs)[0])
    assert optimizer.last_step is not None
    params = [p for p in considered.parameters() if p.requires_grad]
    expected = oracle_gramian(losses_of(model, inputs)[0], params)
    optimizer.close()
    return optimizer.last_step.gramian, expected


MODES: list[Mode] = ["ghost", "materialize"]
DTYPES = [torch.float64, torch.float32]


def tolerance(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_linear_random_shapes(seed: int, dtype: torch.dtype, mode: Mode) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    b, t = rng.choice([1, 2, 7, 33]), rng.randint(1, 17)
    d, p = rng.randint(1, 9), rng.randint(1, 9)
    layer = nn.Linear(d, p, bias=rng.random() < 0.7).to(dtype)
    shape = (b, d) if rng.random() < 0.3 else (b, t, d)
    ours, expected = rule_gramian(LinearRule(mode), layer, torch.randn(*shape, dtype=dtype))
    assert relative_error(ours, expected) < tolerance(dtype)


CONVS = [
    (
        nn.Conv1d,
        dict(
            in_channels=4, out_channels=6, kernel_size=3, stride=2, dilation=2, groups=2, padding=1
        ),
    ),
    (
        nn.Conv1d,
        dict(in_channels=3, out_channels=3, kernel_size=5, padding="same", groups=3, bias=False),
    ),
    (
        nn.Conv2d,
        dict(
            in_channels=4,
            out_channels=2,
            kernel_size=(3, 2),
            stride=(2, 3),
            padding=(1, 0),
            groups=2,
        ),
    ),
    (
        nn.Conv2d,
        dict(
            in_channels=2,
            out_channels=4,
            kernel_size=3,
            dilation=(1, 2),
            padding=2,
            padding_mode="replicate",
        ),
    ),
    (
        nn.Conv2d,
        dict(in_channels=6, out_channels=6, kernel_size=1, groups=3, padding_mode="circular"),
    ),
    (
        nn.Conv3d,
        dict(
            in_channels=2,
            out_channels=4,
            kernel_size=(1, 2, 3),
            stride=(1, 2, 1),
            groups=2,
            padding=1,
        ),
    ),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("index", range(len(CONVS)))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_conv_stride_padding_dilation_groups(index: int, dtype: torch.dtype, mode: Mode) -> None:
    torch.manual_seed(index)
    kind, kwargs = CONVS[index]
    layer = kind(**kwargs).to(dtype)  # type: ignore[arg-type]
    spatial = {nn.Conv1d: (9,), nn.Conv2d: (7, 8), nn.Conv3d: (3, 5, 6)}[kind]
    x = torch.randn(5, layer.in_channels, *spatial, dtype=dtype)
    ours, expected = rule_gramian(ConvRule(mode), layer, x)
    assert relative_error(ours, expected) < tolerance(dtype)


@pytest.mark.parametrize("padding_idx", [None, 0, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_embedding_repeated_and_padding_ids(padding_idx: int | None, dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    embed = nn.Embedding(6, 5, padding_idx=padding_idx).to(dtype)
    with torch.no_grad():  # a nonzero padding row: the losses depend on it, its gradient is 0
        embed.weight.copy_(torch.randn(6, 5, dtype=dtype))
    ids = torch.randint(0, 6, (9, 7))
    ids[0] = 3  # every position the same id (a padding hit when padding_idx == 3)
    ids[1, :3] = 0
    ours, expected = rule_gramian(EmbeddingRule(), embed, ids)
    assert relative_error(ours, expected) < tolerance(dtype)


def test_cost_model_follows_its_formula() -> None:
    """Ghost iff ``(BT)²(d+p) < 2(BTpd + B²pd)`` (kernels under the memory cap): checked on
    shapes on both sides of the formula, all well under the cap."""
    rng = random.Random(0)
    seen = set()
    for _ in range(200):
        b, t, d, p = (
            rng.randint(1, 64),
            rng.randint(1, 64),
            rng.randint(1, 256),
            rng.randint(1, 256),
        )
        a, gy = torch.zeros(b, t, 1, d), torch.zeros(b, t, 1, p)
        ghost = (b * t) ** 2 * (d + p) < 2 * (b * t * p * d + b * b * p * d)
        assert use_ghost(a, gy, "auto") == ghost, (b, t, d, p)
        seen.add(ghost)
    assert seen == {True, False}
    assert not use_ghost(torch.zeros(1, 9000, 1, 2048), torch.zeros(1, 9000, 1, 2048), "auto")


class Affine(nn.Module):
    """y = x ⊙ scale, a custom layer for which a user registers a closed-form rule."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


USED: list[int] = []


@register_gramian_rule(Affine)
class AffineRule(GramianRule):
    def per_sample_grads(
        self, module: nn.Module, calls: Sequence[Call], params: Mapping[str, nn.Parameter]
    ) -> dict[str, Tensor]:
        USED.append(len(calls))
        total = sum(
            (c.args[0] * c.output_grads[0]).flatten(1, -2).sum(1)
            if c.args[0].ndim > 2
            else c.args[0] * c.output_grads[0]
            for c in calls
        )
        assert isinstance(total, Tensor)
        return {"scale": total}


def test_registering_a_second_rule_for_a_type_warns() -> None:
    class Layer(nn.Linear):
        pass

    @register_gramian_rule(Layer)
    class First(GramianRule):
        pass

    with pytest.warns(UserWarning, match="already had the rule First"):

        @register_gramian_rule(Layer)
        class Second(GramianRule):
            pass

    assert type(rule_for(Layer(1, 1))) is Second


def test_user_registered_rule_is_used_and_exact() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Affine(4), nn.Linear(4, 2)).double()
    ours, expected = gramian_of(model, model[1], torch.randn(6, 3, dtype=torch.float64))
    assert USED and relative_error(ours, expected) < 1e-10


class Override(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).flip(0)  # mixes samples: the Linear rule must not be used


def test_timm_norms_get_closed_form_rules_by_name() -> None:
    layers = pytest.importorskip("timm.layers")
    names = [
        type(rule_for(m)).__name__
        for m in (layers.LayerNorm(3), layers.LayerNorm2d(3), layers.GroupNorm(3, num_groups=1))
    ]
    assert names == ["LayerNormRule", "ChannelLayerNormRule", "GroupNormRule"]


def test_subclass_overriding_forward_falls_back_to_the_generic_rule() -> None:
    assert type(rule_for(Override(2, 2))).__name__ == "GenericRule"
    assert (
        type(rule_for(nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2))).__name__
        == "LinearRule"
    )


def test_materialised_gradients_in_slices_give_the_same_gramian(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-sample gradients are formed a few output channels at a time (bounded memory)."""
    from pjd_optim.gramian import linear

    torch.manual_seed(0)
    layer = nn.Linear(7, 9).double()
    x = torch.randn(5, 6, 7, dtype=torch.float64)
    whole, expected = rule_gramian(LinearRule("materialize"), layer, x)
    monkeypatch.setattr(linear, "MATERIALIZE_LIMIT", 5 * 7 * 2)  # two channels per slice
    sliced, _ = rule_gramian(LinearRule("materialize"), layer, x)
    assert relative_error(sliced, expected) < 1e-12 and relative_error(whole, expected) < 1e-12


class Gate(nn.Module):
    """``y = x ⊙ σ(g) + b`` over the last dim (a layer the package has no rule for)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(width))
        self.shift = nn.Parameter(torch.randn(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.gate) + self.shift


def test_a_rule_written_from_the_public_kit_alone_is_exact_in_every_part() -> None:
    """A closed form for ``shift`` and ``torch.func`` per-sample VJPs for the rest, with only
    the names ``pjd_optim.gramian`` exports; against the oracle, on per-token losses too."""
    from pjd_optim import gramian as kit

    @kit.register_gramian_rule(Gate)
    class GateRule(kit.GramianRule):
        def positionwise(self, module: nn.Module) -> tuple[int, int] | None:
            return 1, 1

        def per_sample_grads(
            self, module: nn.Module, calls: Sequence[kit.Call], params: Mapping[str, nn.Parameter]
        ) -> dict[str, Tensor]:
            def one(call: kit.Call) -> dict[str, Tensor]:
                grads = {}
                gy = kit.wide(call.output_grads[0])
                if "shift" in params:  # ∂y/∂b = 1: the output gradient summed over positions
                    grads["shift"] = gy.reshape(gy.shape[0], -1, gy.shape[-1]).sum(dim=1)
                if "gate" in params:
                    grads |= kit.per_sample_vjp(module, call, {"gate": params["gate"]})
                return grads

            return kit.summed_over_calls(calls, one)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Gate(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    for per_token in (False, True):
        optimizer = PartialJDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model, considered=[model[1]]
        )

        def losses(m: nn.Module, per_token: bool = per_token) -> Tensor:
            out: Tensor = m(x).pow(2).sum(dim=-1)
            return out if per_token else out.mean(dim=1)

        optimizer.backward(losses(model))
        assert optimizer.last_step is not None
        expected = oracle_gramian(losses(model), list(model[1].parameters()))
        assert relative_error(optimizer.last_step.gramian, expected) < 1e-10
        assert kit.compute_dtype(x.float()) == torch.float32
        optimizer.close()
        model.zero_grad()


def test_a_copy_reference_that_cannot_be_imported_is_passed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reference of ``register_copies_of`` whose module raises on import (transformers 5 under
    torch < 2.6 raises a ``NameError``) gives no rule: modules without one take the generic
    rule instead of failing the step."""
    import importlib

    from pjd_optim.gramian import _registry
    from pjd_optim.gramian.generic import GenericRule

    def broken(name: str) -> object:
        raise NameError(name)

    monkeypatch.setattr(
        _registry, "_COPIES", [("torch.somewhere.Norm", ("forward",), LinearRule())]
    )
    monkeypatch.setattr(_registry, "_COPIED", {})
    monkeypatch.setattr(importlib, "import_module", broken)
    assert type(rule_for(Tanh())) is GenericRule


@pytest.mark.parametrize("layer", ["linear", "layernorm", "wrapped"])
def test_a_forward_replaced_on_the_instance_takes_the_generic_rule(layer: str) -> None:
    """A considered module whose ``forward`` is replaced on the instance (here scaling its
    weight; or wrapped around the class's, as accelerate's hooks do) is re-run as it runs:
    exact against the oracle (the class's closed-form rule was silently wrong, by 62% here)."""
    import functools

    from pjd_optim.gramian.generic import GenericRule

    torch.manual_seed(0)
    module: nn.Module = nn.LayerNorm(4) if layer == "layernorm" else nn.Linear(4, 4)

    def param(name: str) -> Tensor:  # (functional_call swaps the attributes: read them late)
        value = getattr(module, name)
        assert isinstance(value, Tensor)
        return value

    def replaced(x: Tensor) -> Tensor:
        if layer == "linear":
            return nn.functional.linear(x, 2 * param("weight"), param("bias"))
        return nn.functional.layer_norm(x, (4,), 3 * param("weight"), param("bias"))

    original = type(module).forward

    def hooked(self: nn.Module, x: Tensor) -> Tensor:
        out: Tensor = original(self, x.clone())
        return out

    forward = functools.partial(hooked, module) if layer == "wrapped" else replaced
    module.forward = forward
    assert type(rule_for(module)) is GenericRule
    randomise(module)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), module, nn.Linear(4, 2))
    assert_gramian_exact(model, module)


def randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()


def assert_gramian_exact(
    model: nn.Module, module: nn.Module, forward: Callable[[Tensor], Tensor] | None = None
) -> None:
    """One step's Gramian over ``module`` against the oracle; losses: the squared outputs of
    ``forward`` (default ``model``) on a batch of 6 inputs of 5 features."""
    run = forward or model
    optimizer = PartialJDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model,
                                   considered=module)  # fmt: skip
    x = torch.randn(6, 5)
    optimizer.backward(run(x).pow(2).sum(dim=1))
    assert optimizer.last_step is not None
    expected = oracle_gramian(run(x).pow(2).sum(dim=1), list(module.parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-5


class Tanh(nn.Module):
    """A module without a rule (the generic rule re-runs it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.weight)


@pytest.mark.parametrize("layer", ["linear", "conv", "layernorm", "generic"])
def test_a_forward_hook_that_returns_another_output_is_outside_the_rule(layer: str) -> None:
    """A forward hook of the user's (registered before the optimizer) returning ``2·out``: a
    closed-form rule's maths is the bare forward's, so the call is tapped before the hook
    (the Gramian was 75% off for a Linear); the generic rule re-runs the module with its hooks,
    so its call is tapped after them. Exact against the oracle either way."""
    torch.manual_seed(0)
    module: nn.Module = {
        "linear": lambda: nn.Linear(4, 4),
        "conv": lambda: nn.Conv1d(4, 4, 1),
        "layernorm": lambda: nn.LayerNorm(4),
        "generic": Tanh,
    }[layer]()
    randomise(module)
    module.register_forward_hook(lambda _module, _args, out: 2 * out)
    inner: nn.Module = nn.Sequential(nn.Unflatten(1, (4, 1)), module, nn.Flatten())
    body = inner if layer == "conv" else module
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), body, nn.Linear(4, 2))
    assert_gramian_exact(model, module)


class DoubledConv(nn.Conv1d):
    """A Conv1d whose ``_conv_forward`` (which ``Conv1d.forward`` calls) doubles the weight."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return doubled(self, input, weight, bias)


def doubled(conv: nn.Conv1d, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out: Tensor = nn.Conv1d._conv_forward(conv, input, 2 * weight, bias)
    return out


@pytest.mark.parametrize("where", ["subclass", "instance"])
def test_a_conv_whose_conv_forward_is_overridden_takes_the_generic_rule(where: str) -> None:
    """``forward`` kept but ``_conv_forward`` overridden (in a subclass or on the instance): the
    conv rule's maths is not the module's (the Gramian was 64% off), the generic rule re-runs it:
    exact against the oracle."""
    import functools

    from pjd_optim.gramian.generic import GenericRule

    torch.manual_seed(0)
    conv = DoubledConv(4, 4, 1) if where == "subclass" else nn.Conv1d(4, 4, 1)
    if where == "instance":
        conv._conv_forward = functools.partial(doubled, conv)  # type: ignore[method-assign]
    assert type(rule_for(conv)) is GenericRule
    model = nn.Sequential(
        nn.Linear(5, 4), nn.Tanh(), nn.Unflatten(1, (4, 1)), conv, nn.Flatten(), nn.Linear(4, 2)
    )
    assert_gramian_exact(model, conv)


@pytest.mark.parametrize("layer", ["linear", "layernorm", "embedding"])
def test_a_layer_called_by_keyword(layer: str) -> None:
    """``Linear(input=x)``: recorded as ``Linear(x)`` (the rules read their inputs by position:
    a raw IndexError before), exact against the oracle."""
    torch.manual_seed(0)
    builds: dict[str, Callable[[], nn.Module]] = {
        "linear": lambda: nn.Linear(4, 4),
        "layernorm": lambda: nn.LayerNorm(4),
        "embedding": lambda: nn.Embedding(7, 4),
    }
    module = builds[layer]()
    randomise(module)
    first, head = nn.Linear(5, 4), nn.Linear(4, 2)
    ids = torch.randint(0, 7, (6,))

    def forward(x: Tensor) -> Tensor:
        h = module(input=ids) if layer == "embedding" else module(input=torch.tanh(first(x)))
        out: Tensor = head(h)
        return out

    model = nn.ModuleList([first, module, head])
    assert_gramian_exact(model, module, forward)
