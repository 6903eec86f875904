"""Layer settings for the rule contract (tests/test_rule_contract.py): the builders of the
table in ``rule_table`` (one entry per registered layer type, over non-default hyperparameters,
and hypothesis strategies that draw more).

A :class:`Setting` builds a module and a batch of ``B`` samples for it, and *declares*
(independently of the rules) where the batch is: ``in_dims`` for each tensor among the flattened
``(args, kwargs)`` (``None``: shared by every sample) and ``out_dims`` for each tensor among the
flattened outputs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

B = 4
F64 = torch.float64

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class Setting:
    """``key``: the registry key the setting covers (a type, or a dotted name for timm's).

    ``refusal``: a regex; where set, the rule (and the step) may refuse with a ``ValueError``
    matching it instead of being exact (never anything else). ``step_refusal``: the step must
    refuse (matching it) although the rule itself is exact (BatchNorm on batch statistics)."""

    key: type[nn.Module] | str
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], Inputs]
    in_dims: tuple[int | None, ...]
    out_dims: tuple[int, ...]
    train: bool = False
    refusal: str | None = None
    step_refusal: str | None = None
    needs: str | None = None  # a module to import first (skip where absent)
    tolerance: float = 1e-9  # relative; float64 throughout: exact up to round-off
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Setting({self.name})"


def randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=F64)


def ids(gen: torch.Generator, high: int, *shape: int) -> Tensor:
    return torch.randint(0, high, shape, generator=gen)


def one(x: Callable[[torch.Generator], Tensor]) -> Callable[[torch.Generator], Inputs]:
    return lambda gen: ((x(gen),), {})


# -- linear / conv -------------------------------------------------------------------------------


def linear(name: str, d: int, p: int, bias: bool, middle: tuple[int, ...]) -> Setting:
    return Setting(
        nn.Linear,
        f"linear_{name}",
        lambda: nn.Linear(d, p, bias=bias),
        one(lambda g: randn(g, B, *middle, d)),
        (0,),
        (0,),
    )


def hf_conv1d(name: str, d: int, p: int, middle: tuple[int, ...]) -> Setting:
    """Hugging Face's ``Conv1D`` (GPT-2's linear layers, weight ``[in, out]``)."""

    def build() -> nn.Module:
        from transformers.pytorch_utils import Conv1D

        module: nn.Module = Conv1D(p, d)  # type: ignore[no-untyped-call]
        with torch.no_grad():
            module.get_parameter("bias").normal_()  # (zeros by default)
        return module

    key = "transformers.pytorch_utils.Conv1D"
    inputs = one(lambda g: randn(g, B, *middle, d))
    return Setting(key, f"hf_conv1d_{name}", build, inputs, (0,), (0,), needs="transformers")


def falcon_linear(name: str, d: int, p: int, bias: bool, middle: tuple[int, ...]) -> Setting:
    """Hugging Face's ``FalconLinear`` (``x @ W.T + b``, a ``Linear`` with a forward of its own)."""

    def build() -> nn.Module:
        from transformers.models.falcon.modeling_falcon import FalconLinear

        module: nn.Module = FalconLinear(d, p, bias=bias)
        return module

    key = "transformers.models.falcon.modeling_falcon.FalconLinear"
    inputs = one(lambda g: randn(g, B, *middle, d))
    needs = "transformers.models.falcon.modeling_falcon"  # (not with transformers 5 on torch < 2.6)
    return Setting(key, f"falcon_linear_{name}", build, inputs, (0,), (0,), needs=needs)


CONV_TYPES: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv(name: str, dims: int, spatial: tuple[int, ...], **kwargs: Any) -> Setting:
    kind = CONV_TYPES[dims]
    c_in = kwargs["in_channels"]
    return Setting(
        kind,
        f"conv{dims}d_{name}",
        lambda: kind(**kwargs),
        one(lambda g: randn(g, B, c_in, *spatial)),
        (0,),
        (0,),
        extra={"conv": kwargs},
    )


# -- embeddings ----------------------------------------------------------------------------------


def embedding(name: str, shape: tuple[int, ...], num: int = 7, **kwargs: Any) -> Setting:
    def build() -> nn.Module:
        module = nn.Embedding(num, 3, **kwargs)
        with torch.no_grad():  # a nonzero padding row: the losses depend on it, its gradient is 0
            module.weight.copy_(torch.randn(num, 3, generator=torch.Generator().manual_seed(5)))
        return module

    def inputs(gen: torch.Generator) -> Inputs:
        x = ids(gen, num, B, *shape)
        x.view(-1)[:3] = 2  # a repeated id (the padding one where padding_idx is 2 or -5)
        return (x,), {}

    refusal = "scale_grad_by_freq" if kwargs.get("scale_grad_by_freq") else None
    return Setting(nn.Embedding, f"embedding_{name}", build, inputs, (0,), (0,), refusal=refusal)


# -- norms ---------------------------------------------------------------------------------------


def norm(
    key: type[nn.Module] | str,
    name: str,
    build: Callable[[], nn.Module],
    shape: tuple[int, ...],
    **options: Any,
) -> Setting:
    return Setting(key, name, build, one(lambda g: randn(g, B, *shape)), (0,), (0,), **options)


def hf_rmsnorm(
    model: str, cls: str, shape: tuple[int, ...], eps: float, reference: str = "llama"
) -> Setting:
    """Hugging Face's RMSNorm of ``transformers.models.<model>`` (``cls``), a random weight;
    the key is the class its forward copies (``reference``: Llama's, Olmo2's or Gemma's)."""

    def build() -> nn.Module:
        module: nn.Module = getattr(
            importlib.import_module(f"transformers.models.{model}.modeling_{model}"), cls
        )(shape[-1], eps=eps)
        with torch.no_grad():
            module.get_parameter("weight").normal_()
        return module

    forms = {
        "gemma": "gemma.modeling_gemma.GemmaRMSNorm",
        "olmo": "olmo2.modeling_olmo2.Olmo2RMSNorm",
    }
    key = f"transformers.models.{forms.get(reference, 'llama.modeling_llama.LlamaRMSNorm')}"
    # (the module computes in float32 inside a float64 model: the oracle's round-off is float32's)
    name = f"hf_{cls}_{shape}"
    needs = f"transformers.models.{model}.modeling_{model}"
    return norm(key, name, build, shape, needs=needs, tolerance=1e-6)


def batchnorm(
    dims: int, eps: float, affine: bool, shape: tuple[int, ...]
) -> Callable[[], nn.Module]:
    kinds: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
        1: nn.BatchNorm1d,
        2: nn.BatchNorm2d,
        3: nn.BatchNorm3d,
    }

    def build() -> nn.Module:
        module = kinds[dims](shape[0], eps=eps, affine=affine, momentum=0.3)
        gen = torch.Generator().manual_seed(3)
        assert module.running_mean is not None and module.running_var is not None
        with torch.no_grad():
            module.running_mean.copy_(torch.randn(shape[0], generator=gen))
            module.running_var.copy_(torch.rand(shape[0], generator=gen) + 0.1)
            if affine:
                module.weight.copy_(torch.randn(shape[0], generator=gen))
                module.bias.copy_(torch.randn(shape[0], generator=gen))
        return module

    return build


def timm_norm(kind: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm.layers

        module: nn.Module = getattr(timm.layers, kind)(**kwargs)
        return module

    return build


# -- recurrent -----------------------------------------------------------------------------------

RECURRENT: dict[str, type[nn.RNNBase]] = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}


def recurrent(
    mode: str,
    name: str,
    *,
    layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    dropout: float = 0.0,
    train: bool = False,
    proj_size: int = 0,
    bias: bool = True,
    states: bool = False,
    nonlinearity: str = "tanh",
    as_kwarg: bool = False,
    length: int = 3,
) -> Setting:
    kind: Any = RECURRENT[mode]  # (typed as RNNBase, whose first argument is the mode)
    hidden, features = 4, 3
    options: dict[str, Any] = dict(
        num_layers=layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        dropout=dropout,
        bias=bias,
    )
    if mode == "LSTM":
        options["proj_size"] = proj_size
    if mode == "RNN":
        options["nonlinearity"] = nonlinearity
    directions = 2 if bidirectional else 1
    h_size = proj_size if proj_size else hidden
    batch = 0 if batch_first else 1

    def inputs(gen: torch.Generator) -> Inputs:
        x = randn(gen, B, length, features) if batch_first else randn(gen, length, B, features)
        if not states:
            return (x,), {}
        h0 = 0.5 * randn(gen, layers * directions, B, h_size)
        hx: Tensor | tuple[Tensor, Tensor] = h0
        if mode == "LSTM":
            hx = (h0, 0.5 * randn(gen, layers * directions, B, hidden))
        return ((x,), {"hx": hx}) if as_kwarg else ((x, hx), {})

    n_states = 0 if not states else 2 if mode == "LSTM" else 1
    n_outputs = 3 if mode == "LSTM" else 2
    refusal = "dropout" if train and dropout > 0 and layers > 1 else None
    return Setting(
        kind,
        f"{mode.lower()}_{name}",
        lambda: kind(features, hidden, **options),
        inputs,
        (batch, *([1] * n_states)),
        (batch, *([1] * (n_outputs - 1))),
        train=train,
        refusal=refusal,
    )


# -- attention -----------------------------------------------------------------------------------


def attention(
    name: str,
    *,
    batch_first: bool,
    heads: int = 2,
    kdim: int | None = None,
    vdim: int | None = None,
    bias: bool = True,
    add_bias_kv: bool = False,
    add_zero_attn: bool = False,
    padding_mask: bool = False,
    attn_mask: bool = False,
    need_weights: bool = True,
    average: bool = True,
    dropout: float = 0.0,
    train: bool = False,
    length: int = 3,
    source: int = 5,
) -> Setting:
    embed = 4

    def build() -> nn.Module:
        return nn.MultiheadAttention(
            embed,
            heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            kdim=kdim,
            vdim=vdim,
            batch_first=batch_first,
        )

    def seq(gen: torch.Generator, n: int, d: int) -> Tensor:
        return randn(gen, B, n, d) if batch_first else randn(gen, n, B, d)

    def inputs(gen: torch.Generator) -> Inputs:
        q = seq(gen, length, embed)
        k, v = seq(gen, source, kdim or embed), seq(gen, source, vdim or embed)
        kwargs: dict[str, Any] = {"need_weights": need_weights}
        if padding_mask:
            mask = torch.zeros(B, source, dtype=torch.bool)
            mask[0, -2:] = True
            mask[2, 0] = True
            kwargs["key_padding_mask"] = mask
        if attn_mask:
            kwargs["attn_mask"] = torch.triu(torch.full((length, source), -1e9, dtype=F64), 1)
        if not average:
            kwargs["average_attn_weights"] = False
        return (q, k, v), kwargs

    batch = 0 if batch_first else 1
    in_dims = (
        batch,
        batch,
        batch,
        *((0,) if padding_mask else ()),
        *((None,) if attn_mask else ()),
    )
    out_dims = (batch, 0) if need_weights else (batch,)
    refusal = "random" if train and dropout > 0 else None
    return Setting(
        nn.MultiheadAttention,
        f"attention_{name}",
        build,
        inputs,
        in_dims,
        out_dims,
        train=train,
        refusal=refusal,
    )


# -- the generic rule ----------------------------------------------------------------------------


class Gated(nn.Module):
    """A custom module (no registered rule): ``tanh(x W) ⊙ σ(x U + b)`` on ``[B, *, d]``."""

    def __init__(self, d: int = 3, p: int = 2) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, p))
        self.u = nn.Parameter(torch.randn(d, p))
        self.b = nn.Parameter(torch.randn(p))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w) * torch.sigmoid(x @ self.u + self.b)


class WithTable(nn.Module):
    """A custom module that also receives a table shared by every sample (``[L, d]``)."""

    def __init__(self, d: int = 3) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, d))

    def forward(self, x: Tensor, table: Tensor, *, scale: float = 1.0) -> Tensor:
        return scale * torch.tanh(x @ self.w) @ table.T


class Noisy(nn.Module):
    """A custom module with dropout inside (random in train mode) on its own parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(torch.tanh(x @ self.w), 0.5, self.training)


CELLS: dict[str, Callable[[int, int], nn.Module]] = {
    "RNNCell": nn.RNNCell,
    "GRUCell": nn.GRUCell,
    "LSTMCell": nn.LSTMCell,
}


def cell(kind: str, states: bool) -> Setting:
    """A recurrent cell on ``[B, 3]``, given its state or not (``hx=None``: zeros)."""
    lstm = kind == "LSTMCell"

    def inputs(gen: torch.Generator) -> Inputs:
        x = randn(gen, B, 3)
        if not states:
            return (x,), {}
        hx = (randn(gen, B, 2), randn(gen, B, 2)) if lstm else randn(gen, B, 2)
        return (x, hx), {}

    in_dims = (0, 0, 0) if states and lstm else (0, 0) if states else (0,)
    build = lambda: CELLS[kind](3, 2).double()  # noqa: E731
    key = type(CELLS[kind](1, 1))
    name = f"cell_{kind}_{'states' if states else 'no_state'}"
    return Setting(key, name, build, inputs, in_dims, (0, 0) if lstm else (0,))


def with_table(rows: int) -> Setting:
    def inputs(gen: torch.Generator) -> Inputs:
        return (randn(gen, B, 2, 3), randn(gen, rows, 3)), {"scale": 0.7}

    return Setting(nn.Module, f"generic_table_{rows}_rows", WithTable, inputs, (0, None), (0,))
