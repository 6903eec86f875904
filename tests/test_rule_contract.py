"""The rule contract: every registered layer rule, over non-default hyperparameters (the table of
``rule_table.py`` and hypothesis draws), against the per-sample oracle (one ``autograd.grad``
per loss): per-sample gradients, Gramian and summed gradients of the rule called directly (one
call and a reused layer's two calls), and the whole step (Gramian, weights, ``.grad``).

A registered type without an entry in the table fails
:func:`test_every_registered_type_has_settings`:
a new rule gets the harness by registering and adding its settings.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from case import Case, mse
from hypothesis import HealthCheck, given, settings
from oracle import errors_against_oracle, oracle_jacobian
from rule_settings import F64, B, Setting
from rule_table import (
    SETTINGS,
    attention_settings,
    conv_settings,
    embedding_settings,
    norm_settings,
    recurrent_settings,
)
from torch import Tensor, nn
from torch.optim import SGD
from torch.utils._pytree import tree_flatten, tree_unflatten

from pjd_optim import Call, GramianRule, PartialJDOptimizer
from pjd_optim.gramian._registry import _RULES, _RULES_BY_NAME, batch_dim, rule_for
from pjd_optim.gramian.conv import ConvRule
from pjd_optim.gramian.generic import GenericRule
from pjd_optim.gramian.linear import GroupedLinearRule, LinearRule, Mode, TransposedLinearRule

pytestmark = pytest.mark.usefixtures("single_thread")

MODES: list[Mode] = ["ghost", "materialize"]
IDS = [s.name for s in SETTINGS]


def registry_key(key: type[nn.Module] | str) -> GramianRule:
    return _RULES[key] if isinstance(key, type) else _RULES_BY_NAME[key]


def module_of(setting: Setting) -> nn.Module:
    if setting.needs is not None:
        try:
            importlib.import_module(setting.needs)
        except Exception as error:  # absent, or not importable with this torch (transformers 5)
            pytest.skip(f"{setting.needs}: {type(error).__name__}")
    torch.manual_seed(0)
    module = setting.build().to(F64)
    return module.train(setting.train)


def params_of(module: nn.Module, rule: GramianRule) -> dict[str, nn.Parameter]:
    named = module.named_parameters(recurse=rule.recursive)
    return {n: p for n, p in named if p.requires_grad}


# -- the rule called directly ----------------------------------------------------------------------


def per_sample_losses(outputs: list[Tensor], dims: tuple[int, ...]) -> Tensor:
    """``mse`` of every tapped output, the batch on dim 0 as the setting declares."""
    features = torch.cat(
        [y.movedim(d, 0).flatten(1) for y, d in zip(outputs, dims, strict=True)], 1
    )
    return mse(features)


class _Tapped(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, *outputs: Tensor) -> tuple[Tensor, ...]:
        return tuple(y.clone() for y in outputs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, ...]:
        return grads


def forward_call(
    module: nn.Module, setting: Setting, gen: torch.Generator
) -> tuple[Call, list[Tensor], Tensor, tuple[tuple[Any, ...], dict[str, Any]]]:
    """One forward: the record a rule receives (inputs detached, the batch on dim 0 where the
    setting declares it), the tapped outputs, the per-sample losses and the module's inputs."""
    args, kwargs = setting.inputs(gen)
    out = module(*args, **kwargs)
    leaves = tree_flatten(out)[0]
    tensor_positions = [k for k, y in enumerate(leaves) if isinstance(y, Tensor)]
    dims_at = dict(zip(tensor_positions, setting.out_dims, strict=True))
    positions = tuple(k for k in tensor_positions if leaves[k].requires_grad)
    # As the engine's tap: the outputs through one identity node, so that the gradient w.r.t.
    # an output another output is computed from (an LSTM cell's c, under h) is its own use only.
    outputs = list(_Tapped.apply(*(leaves[k] for k in positions)))
    out_dims = tuple(dims_at[k] for k in positions)
    losses = per_sample_losses(outputs, out_dims)
    in_leaves, spec = tree_flatten((args, kwargs))
    dims = iter(setting.in_dims)
    moved = []
    for leaf in in_leaves:
        if isinstance(leaf, Tensor):
            d = next(dims)
            leaf = leaf.detach()
            moved.append(leaf.movedim(d, 0) if d else leaf)
        else:
            moved.append(leaf)
    assert next(dims, "end") == "end", "the setting declares more inputs than the module took"
    call_args, call_kwargs = tree_unflatten(moved, spec)
    call = Call(
        tuple(call_args),
        dict(call_kwargs),
        output_grads=(),
        output_positions=positions,
        sample_dims=setting.in_dims,
        output_dims=out_dims,
        outputs=tuple(y.detach().movedim(d, 0) for y, d in zip(outputs, out_dims, strict=True)),
    )
    return call, outputs, losses, (args, kwargs)


def with_grads(call: Call, outputs: list[Tensor], total: Tensor) -> Call:
    grads = torch.autograd.grad(total, outputs, retain_graph=True)
    moved = tuple(g.movedim(d, 0) for g, d in zip(grads, call.output_dims, strict=True))
    return Call(
        call.args,
        call.kwargs,
        output_grads=moved,
        output_positions=call.output_positions,
        sample_dims=call.sample_dims,
        output_dims=call.output_dims,
        outputs=call.outputs,
    )


def error(actual: Tensor, expected: Tensor, floor: float) -> float:
    """``relative_error``, its scale at least ``floor`` (the oracle's round-off where the exact
    value is 0: a GroupNorm group of one channel normalises to 0)."""
    scale = max(float(expected.abs().max()), floor)
    return float((actual.detach().double() - expected).abs().max()) / scale


def split(jacobian: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    sizes = [p.numel() for p in params.values()]
    chunks = torch.split(jacobian, sizes, dim=1)
    return {n: c.reshape(-1, *p.shape) for (n, p), c in zip(params.items(), chunks, strict=True)}


def check_rule(setting: Setting, calls: int = 1, rule: GramianRule | None = None) -> None:
    """The rule's per-sample gradients, Gramian and summed gradients against the oracle, with
    ``calls`` forwards of the module (a reused layer: every quantity sums over its calls)."""
    module = module_of(setting)
    rule = rule_for(module) if rule is None else rule
    params = params_of(module, rule)
    if not params:
        return  # (nothing to check: the step refuses such a considered part, see below)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # dropout masks (train mode)
    forwards = [forward_call(module, setting, gen) for _ in range(calls)]
    losses = sum(f[2] for f in forwards)
    assert isinstance(losses, Tensor)
    records = [with_grads(call, outputs, losses.sum()) for call, outputs, _, _ in forwards]
    jacobian = oracle_jacobian(losses, list(params.values()))
    expected = split(jacobian, params)
    floor = 1e-4 * max(float(jacobian.abs().max()), 1.0)  # (the problems are of order 1)
    if type(rule) is not GenericRule:  # (the generic rule may take a shared table for per-sample)
        args, kwargs = forwards[0][3]
        in_dims, out_dims = rule.sample_dims(module, args, kwargs, B)
        assert tuple(in_dims) == setting.in_dims, (in_dims, setting.in_dims)
        positions = records[0].output_positions
        assert tuple(batch_dim(out_dims, k) for k in positions) == records[0].output_dims

    def compare() -> None:
        grads = rule.per_sample_grads(module, records, params)
        assert set(grads) == set(params)
        for name, p in params.items():
            assert grads[name].shape == (B, *p.shape), name
            assert error(grads[name], expected[name], floor) < setting.tolerance, name
        gramian = rule.gramian(module, records, params)
        assert gramian.shape == (B, B)
        assert error(gramian, jacobian @ jacobian.T, floor**2) < setting.tolerance
        summed = rule.summed_grads(module, records, params)
        assert set(summed) == set(params)
        for name, p in params.items():
            assert summed[name].shape == p.shape, name
            assert error(summed[name], expected[name].sum(0), floor) < setting.tolerance, name

    exact_or_refused(setting.refusal, compare)


def exact_or_refused(refusal: str | None, check: Callable[[], None]) -> None:
    """``check()`` must pass; where ``refusal`` is set, a ``ValueError`` matching it is allowed
    instead (never a silently wrong result, nor another error)."""
    if refusal is None:
        check()
        return
    try:
        check()
    except ValueError as error:
        assert re.search(refusal, str(error)), str(error)


# -- the whole step --------------------------------------------------------------------------------


class Host(nn.Module):
    """A trunk parameter scaling the first (floating) input, then the layer: returns the
    per-sample features of every tapped output (the batch on dim 0)."""

    def __init__(self, setting: Setting, layer: nn.Module, rest: tuple[Any, ...], kw: Any) -> None:
        super().__init__()
        self.trunk = nn.Parameter(torch.tensor(1.3, dtype=F64))
        self.layer = layer
        self.setting, self.rest, self.kw = setting, rest, kw

    def forward(self, x: Tensor) -> Tensor:
        first = x * self.trunk if x.is_floating_point() else x
        out = self.layer(first, *self.rest, **self.kw)
        leaves = [y for y in tree_flatten(out)[0] if isinstance(y, Tensor)]
        dims = self.setting.out_dims
        features = [
            y.movedim(d, 0).flatten(1) for y, d in zip(leaves, dims, strict=True) if y.requires_grad
        ]
        return torch.cat(features, dim=1)


def check_step(setting: Setting) -> None:
    module = module_of(setting)
    args, kwargs = setting.inputs(torch.Generator().manual_seed(1))
    model = Host(setting, module, args[1:], kwargs)
    case = Case(model, args[0], [module], mse)
    if not any(p.requires_grad for p in module.parameters()):
        with pytest.raises(ValueError, match="No parameter is considered"):
            PartialJDOptimizer(SGD(model.parameters(), lr=0.1), model, considered=module)
        return

    def compare() -> None:
        torch.manual_seed(2)
        errors = errors_against_oracle(case, F64)
        assert errors["gramian"] < setting.tolerance, errors
        assert errors["grads"] < setting.tolerance, errors
        assert errors["weights"] < 1e-7, errors

    if setting.step_refusal is not None:
        with pytest.raises(ValueError, match=setting.step_refusal):
            compare()
        return
    exact_or_refused(setting.refusal, compare)


# -- the table -------------------------------------------------------------------------------------


def package_keys() -> list[type[nn.Module] | str]:
    """The layer types with a rule of the package (tests register rules of their own)."""
    table: dict[Any, GramianRule] = {**_RULES, **_RULES_BY_NAME}
    return [k for k, rule in table.items() if type(rule).__module__.startswith("pjd_optim.")]


def test_every_registered_type_has_settings() -> None:
    """A rule registered without settings here fails: the contract covers every rule."""
    covered = {s.key for s in SETTINGS}
    missing = [k for k in package_keys() if k not in covered]
    assert not missing, f"registered layer types without rule-contract settings: {missing}"


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_the_setting_gets_the_rule_registered_for_its_type(setting: Setting) -> None:
    module = module_of(setting)
    assert rule_for(module) is registry_key(setting.key)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_rule_matches_the_per_sample_oracle(setting: Setting) -> None:
    check_rule(setting)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_rule_sums_over_the_calls_of_a_reused_layer(setting: Setting) -> None:
    check_rule(setting, calls=2)


@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_step_matches_the_per_sample_oracle(setting: Setting) -> None:
    check_step(setting)


GROUPED = [s for s in SETTINGS if isinstance(registry_key(s.key), GroupedLinearRule)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("setting", GROUPED, ids=[s.name for s in GROUPED])
def test_both_branches_of_the_grouped_linear_cost_model(setting: Setting, mode: Mode) -> None:
    rule: GroupedLinearRule = ConvRule(mode)
    if setting.key in (nn.Linear, "transformers.models.falcon.modeling_falcon.FalconLinear"):
        rule = LinearRule(mode)
    elif setting.key == "transformers.pytorch_utils.Conv1D":
        rule = TransposedLinearRule(mode)
    check_rule(setting, calls=2, rule=rule)


# -- property-based sweeps -------------------------------------------------------------------------

SWEEP = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
    database=None,
)


@SWEEP
@given(conv_settings())
def test_drawn_convolutions(setting: Setting) -> None:
    check_rule(setting)
    for mode in MODES:
        check_rule(setting, rule=ConvRule(mode))
    check_step(setting)


@SWEEP
@given(norm_settings())
def test_drawn_norms(setting: Setting) -> None:
    check_rule(setting)
    check_step(setting)


@SWEEP
@given(recurrent_settings())
def test_drawn_recurrent_layers(setting: Setting) -> None:
    check_rule(setting)
    check_step(setting)


@SWEEP
@given(embedding_settings())
def test_drawn_embeddings(setting: Setting) -> None:
    check_rule(setting, calls=2)
    check_step(setting)


@SWEEP
@given(attention_settings())
def test_drawn_attention(setting: Setting) -> None:
    check_rule(setting)
    check_step(setting)
