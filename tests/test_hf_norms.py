"""Hugging Face's RMSNorm layers (Llama's, Olmo2's and Gemma's forms, copied into most decoder
models): their closed-form rule takes per-token losses flat or ``[B, T]`` with the final norm
considered, exact against the per-loss oracle; a class whose code is not an exact copy takes the
generic rule. Tiny random configurations, no downloads."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from oracle import oracle_grads, oracle_gramian, relative_error
from torch import Tensor, nn
from torch.optim import SGD

transformers = pytest.importorskip("transformers")
if not transformers.utils.is_torch_available():  # (transformers 5 needs torch >= 2.6)
    pytest.skip("this transformers does not run with this torch", allow_module_level=True)

from pjd_optim import PartialJDOptimizer  # noqa: E402
from pjd_optim.gramian._registry import rule_for  # noqa: E402
from pjd_optim.gramian.generic import GenericRule  # noqa: E402
from pjd_optim.gramian.norm import (  # noqa: E402
    GemmaRMSNormRule,
    LlamaRMSNormRule,
    Olmo2RMSNormRule,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SIZES = dict(
    vocab_size=29, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    tie_word_embeddings=False,
)  # fmt: skip
MODELS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SIZES)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(head_dim=4, **SIZES)),
    "olmo2": lambda: transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**SIZES)),
}
RULES = {
    "llama": LlamaRMSNormRule,
    "qwen2": LlamaRMSNormRule,
    "gemma": GemmaRMSNormRule,
    "olmo2": Olmo2RMSNormRule,
}


def token_losses(model: nn.Module, ids: Tensor, layout: str) -> Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    losses = nn.functional.cross_entropy(
        logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
    )
    return losses if layout == "flat" else losses.view(ids.shape[0], -1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["flat", "[B, T]"])
@pytest.mark.parametrize("name", list(MODELS))
def test_the_final_norm_takes_per_token_losses(
    name: str, layout: str, dtype: torch.dtype, device: str
) -> None:
    """``model.norm`` considered, per-token losses flat (refused before: no rule, positions could
    not be rows) or ``[B, T]``: the Gramian and every ``.grad`` against the per-loss oracle (the
    norms compute in float32 even in a float64 model: bounds of float32's round-off)."""
    torch.manual_seed(0)
    model = MODELS[name]().to(device, dtype)
    norm = model.get_submodule("model.norm")
    with torch.no_grad():  # (Gemma's weight starts at zero, Llama's at one)
        norm.get_parameter("weight").normal_()
    assert type(rule_for(norm)) is RULES[name]
    ids = torch.randint(0, 29, (3, 7), generator=torch.Generator().manual_seed(1)).to(device)
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.0), model, considered=norm)
    optimizer.backward(token_losses(model, ids, layout))
    assert optimizer.last_step is not None
    losses = token_losses(model, ids, layout).flatten()
    gramian = oracle_gramian(losses, list(norm.parameters()))
    bound = 1e-6 if dtype == torch.float64 else 1e-4
    assert relative_error(optimizer.last_step.gramian, gramian) < bound
    params = [p for p in model.parameters() if p.grad is not None]
    assert len(params) == len(list(model.parameters()))
    expected = oracle_grads(losses, params, optimizer.last_step.weights)
    for p, g in zip(params, expected, strict=True):
        assert p.grad is not None and relative_error(p.grad, g) < bound


def test_gemmas_norm_with_per_sequence_losses() -> None:
    """Gemma's ``(1 + γ)`` form at its zero initialisation, per-sequence losses through the last
    block (each of its two norms and the final one)."""
    torch.manual_seed(0)
    model = MODELS["gemma"]()
    ids = torch.randint(0, 29, (4, 6), generator=torch.Generator().manual_seed(2))
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.0), model, considered=model)
    optimizer.backward(token_losses(model, ids, "[B, T]").mean(dim=1))
    assert optimizer.last_step is not None
    losses = token_losses(model, ids, "[B, T]").mean(dim=1)
    expected = oracle_gramian(losses, list(model.parameters()))
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-4


def test_only_exact_copies_take_the_rule() -> None:
    """The same code (a class built around Llama's own ``forward``) takes the rule; the same
    maths written otherwise, the same code reading another ``torch`` global, or a subclass that
    overrides ``forward`` take the generic rule."""
    llama: Any = transformers.models.llama.modeling_llama.LlamaRMSNorm
    forward = llama.forward

    def build(method: Callable[..., Tensor]) -> nn.Module:
        module: nn.Module = type("CopiedNorm", (nn.Module,), {"forward": method})()
        module.weight = nn.Parameter(torch.ones(4))
        setattr(module, "variance_epsilon", 1e-6)  # noqa: B010 (a float, not a Tensor)
        return module

    assert type(rule_for(build(forward))) is LlamaRMSNormRule

    def rewritten(self: nn.Module, hidden_states: Tensor) -> Tensor:
        scale = torch.rsqrt(hidden_states.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        normalised = (hidden_states.float() * scale).to(hidden_states.dtype)
        return self.get_parameter("weight") * normalised

    assert type(rule_for(build(rewritten))) is GenericRule
    other_globals = {**forward.__globals__, "torch": types.SimpleNamespace(float32=torch.float32)}
    elsewhere = types.FunctionType(forward.__code__, other_globals, "forward")
    assert type(rule_for(build(elsewhere))) is GenericRule

    class Overridden(llama):  # type: ignore[misc]
        def forward(self, hidden_states: Tensor) -> Tensor:
            out: Tensor = super().forward(hidden_states)
            return 2 * out

    assert type(rule_for(Overridden(4))) is GenericRule


def test_near_copies_take_the_generic_rule() -> None:
    """Gemma's ``_norm`` replaced (in a subclass, on the instance) while ``forward`` is kept;
    a copy whose method is replaced after a first lookup; a weight that is not ``[D]``; an
    epsilon that is not a number: the forms' maths does not hold, the generic rule re-runs."""
    gemma: Any = transformers.models.gemma.modeling_gemma.GemmaRMSNorm
    qwen2: Any = transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm
    llama: Any = transformers.models.llama.modeling_llama.LlamaRMSNorm

    class Centred(gemma):  # type: ignore[misc]
        def _norm(self, x: Tensor) -> Tensor:
            out: Tensor = super()._norm(x - x.mean(-1, keepdim=True))
            return out

    assert type(rule_for(Centred(4))) is GenericRule
    on_instance = gemma(4)
    on_instance._norm = lambda x: 2 * x
    assert type(rule_for(on_instance)) is GenericRule
    assert type(rule_for(gemma(4))) is GemmaRMSNormRule

    copied: Any = type("Copied", (qwen2,), {})  # (its own class: the class cache is per class)
    assert type(rule_for(copied(4))) is LlamaRMSNormRule
    copied.forward = lambda self, h: self.weight * h
    assert type(rule_for(copied(4))) is GenericRule

    scalar = llama(4)
    scalar.weight = nn.Parameter(torch.ones(()))
    assert type(rule_for(scalar)) is GenericRule
    per_feature = llama(4)
    per_feature.variance_epsilon = torch.full((4,), 1e-6)
    assert type(rule_for(per_feature)) is GenericRule


def test_a_norm_called_by_keyword() -> None:
    """``norm(hidden_states=h)`` (the rules read their inputs by position: a raw IndexError
    before), exact against the oracle."""
    torch.manual_seed(0)
    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(4, eps=0.3).double()
    with torch.no_grad():
        norm.weight.normal_()
    first, head = nn.Linear(5, 4).double(), nn.Linear(4, 2).double()

    def forward(x: Tensor) -> Tensor:
        out: Tensor = head(norm(hidden_states=torch.tanh(first(x))))
        return out

    model = nn.ModuleList([first, norm, head])
    optimizer = PartialJDOptimizer(SGD(model.parameters(), lr=0.0), model, considered=norm)
    x = torch.randn(6, 5, dtype=torch.float64)
    optimizer.backward(forward(x).pow(2).sum(dim=1))
    assert optimizer.last_step is not None
    expected = oracle_gramian(forward(x).pow(2).sum(dim=1), [norm.weight])
    assert relative_error(optimizer.last_step.gramian, expected) < 1e-6
