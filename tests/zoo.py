"""Small architectures covering every layer family, each with a batch and its considered part."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from case import B, Case, mse
from torch import Tensor, nn
from zoo_children import (
    parent_calling_child_method,
    parent_reading_child_weight,
    timm_beit,
    timm_eva,
    torchvision_swin,
)
from zoo_recurrent import (
    gru_batch_first,
    gru_cell_unrolled,
    lstm_projection,
    lstm_time_first_bidirectional,
    rnn_relu_time_first,
)


def seed_mlp() -> Case:
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 1))
    return Case(model, torch.randn(B, 10), [model[2], model[4]], mse)


def seed_mlp_all() -> Case:
    case = seed_mlp()
    case.considered = [case.model]
    return case


def linear_sequence() -> Case:
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3))
    return Case(model, torch.randn(B, 5, 4), [model[0], model[2]], mse)


def linear_4d_input() -> Case:
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    return Case(model, torch.randn(B, 2, 3, 3), [model], mse)


def conv1d() -> Case:
    model = nn.Sequential(
        nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
        nn.ReLU(),
        nn.Conv1d(6, 3, 2, padding="same", padding_mode="circular"),
        nn.Flatten(),
    )
    return Case(model, torch.randn(B, 4, 11), [model], mse)


def conv2d() -> Case:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=(2, 1), padding=1),
        nn.ReLU(),
        nn.Conv2d(
            4, 6, (2, 3), stride=1, dilation=(2, 1), groups=2, padding_mode="reflect", padding=1
        ),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, groups=6, bias=False),
        nn.Flatten(),
    )
    return Case(model, torch.randn(B, 3, 9, 8), [model[2], model[4]], mse)


def conv3d() -> Case:
    model = nn.Sequential(nn.Conv3d(2, 3, 2, stride=(1, 2, 1), groups=1), nn.Flatten())
    return Case(model, torch.randn(B, 2, 3, 4, 3), [model], mse)


class BagOfEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 4, padding_idx=0)
        self.head = nn.Linear(4, 2)

    def forward(self, ids: Tensor) -> Tensor:
        out: Tensor = self.head(self.embed(ids).mean(dim=1))
        return out


def embedding() -> Case:
    ids = torch.tensor(
        [[0, 1, 1, 2], [3, 0, 0, 3], [1, 2, 3, 4], [0, 0, 0, 0], [8, 8, 1, 0], [5, 6, 7, 1]]
    )
    model = BagOfEmbeddings()
    return Case(model, ids, [model], mse)


def norms() -> Case:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(start_dim=2),
        nn.LayerNorm(25),
        nn.Flatten(),
        nn.RMSNorm(100),
        nn.Linear(100, 2),
    )
    return Case(model, torch.randn(B, 2, 5, 5), [model[1], model[4], model[6], model[7]], mse)


def batchnorm_eval() -> Case:
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), bn, nn.ReLU(), nn.Flatten(), nn.Linear(27, 2))
    assert bn.running_mean is not None and bn.running_var is not None
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    model.eval()
    return Case(model, torch.randn(B, 2, 5, 5), [model[1], model[4]], mse)


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.out = nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))
        return out


def module_called_twice() -> Case:
    model = Twice()
    return Case(model, torch.randn(B, 5), [model], mse)


class TinyLM(nn.Module):
    """Embedding tied to the output projection (one Parameter in two modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        out: Tensor = self.head(torch.tanh(self.mix(self.embed(ids))))
        return out


def tied_embedding() -> Case:
    model = TinyLM()
    ids = torch.randint(0, 11, (B, 5))
    targets = torch.randint(0, 11, (B, 5))

    def loss(logits: Tensor) -> Tensor:
        ce = F.cross_entropy(logits.transpose(1, 2).double(), targets, reduction="none")
        return ce.mean(dim=1).to(logits.dtype)

    return Case(model, ids, [model], loss)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        attended, _ = self.attn(x, x, x)
        out: Tensor = self.head(attended.mean(dim=1))
        return out


def multihead_attention() -> Case:
    model = Attention()
    return Case(model, torch.randn(B, 4, 8), [model], mse, resumed=False)


def transformer_layer() -> Case:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(3, 8), layer, nn.Flatten(), nn.Linear(32, 2))
    return Case(model, torch.randn(B, 4, 3), [model[1], model[3]], mse, resumed=False)


class Scaled(nn.Module):
    """A module with a direct Parameter used in its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.proj(x) * self.scale + self.scale.sin()
        return out


def direct_parameter() -> Case:
    model = nn.Sequential(nn.Linear(3, 4), Scaled(), nn.Linear(4, 1))
    return Case(model, torch.randn(B, 3), [model[1], model[2]], mse, resumed=False)


def frozen_weight() -> Case:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    return Case(model, torch.randn(B, 3), [model[2]], mse)


def timm_vit() -> Case:
    import timm

    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32)
    *_, last = model.get_submodule("blocks").children()
    parts = [last, model.get_submodule("norm"), model.get_submodule("head")]
    return Case(model, torch.randn(3, 3, 32, 32), parts, mse)


def timm_resnet() -> Case:
    import timm

    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    parts = [model.get_submodule("layer4"), model.get_submodule("fc")]
    return Case(model, torch.randn(3, 3, 32, 32), parts, mse)


def timm_norms() -> Case:
    from timm.layers import GroupNorm, LayerNorm, LayerNorm2d

    model = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        LayerNorm2d(4),
        GroupNorm(4, num_groups=2),
        nn.Flatten(start_dim=2),
        LayerNorm(9),
        nn.Flatten(),
        nn.Linear(36, 2),
    )
    parts = [model[1], model[2], model[4]]
    return Case(model, torch.randn(B, 2, 5, 5), parts, mse, resumed=False)


def non_considered_after_considered() -> Case:
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    return Case(model, torch.randn(B, 3), [model[2]], mse, resumed=False)


class SkipAround(nn.Module):
    """A skip connection around the considered block; the loss also sees trunk features."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.trunk(x))
        out: Tensor = self.head(h + self.block(h)) + h[:, :2].pow(2)
        return out


def skip_connection() -> Case:
    model = SkipAround()
    return Case(model, torch.randn(B, 3), [model.block, model.head], mse)


class DeepSkip(nn.Module):
    """Trunk features from below the considered part's input reach the losses directly: through
    a skip into the considered block (``mode="skip"``) or a loss term (``mode="loss"``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.low, self.high = nn.Linear(3, 4), nn.Linear(4, 4)
        self.block, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        deep = torch.tanh(self.low(x))
        h = torch.tanh(self.high(deep))
        if self.mode == "skip":
            return self.head(torch.tanh(self.block(h)) + deep)  # type: ignore[no-any-return]
        out: Tensor = self.head(torch.tanh(self.block(h))) + deep[:, :2].pow(2)
        return out


def deep_skip() -> Case:
    model = DeepSkip("skip")
    return Case(model, torch.randn(B, 3), [model.block, model.head], mse, resumed=False)


def trunk_feature_loss() -> Case:
    model = DeepSkip("loss")
    return Case(model, torch.randn(B, 3), [model.block, model.head], mse, resumed=False)


class TwoInputs(nn.Module):
    """Considered heads on two trunk tensors; with ``nested`` the second is computed from the
    first (boundaries that feed each other), else from its own tower."""

    def __init__(self, nested: bool) -> None:
        super().__init__()
        self.nested = nested
        self.tower1, self.tower2 = nn.Linear(3, 4), nn.Linear(4 if nested else 3, 4)
        self.head1, self.head2 = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.tanh(self.tower1(x))
        b = torch.tanh(self.tower2(a if self.nested else x))
        return self.head1(a) + self.head2(b)  # type: ignore[no-any-return]


def two_towers() -> Case:
    model = TwoInputs(nested=False)
    return Case(model, torch.randn(B, 3), [model.head1, model.head2], mse)


def nested_boundaries() -> Case:
    model = TwoInputs(nested=True)
    return Case(model, torch.randn(B, 3), [model.head1, model.head2], mse, resumed=False)


class Gate(nn.Module):
    """``y = x ⊙ σ(a) + b`` with its own parameters: no closed-form rule (the generic one)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.a) + self.b


class ReusedGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.gate, self.out = nn.Linear(3, 4), Gate(4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.gate(torch.tanh(self.gate(torch.tanh(self.inp(x))))))
        out: Tensor = self.out(h)
        return out


def generic_module_called_twice() -> Case:
    model = ReusedGate()
    return Case(model, torch.randn(B, 3), [model.gate, model.out], mse, resumed=False)


class Chunked(nn.Module):
    """A trunk op with two outputs (``chunk``): both feed considered heads, or one feeds the
    head and the other the loss directly."""

    def __init__(self, both: bool) -> None:
        super().__init__()
        self.both = both
        self.trunk, self.head1, self.head2 = nn.Linear(3, 8), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        a, b = torch.tanh(self.trunk(x)).chunk(2, dim=1)
        if self.both:
            return self.head1(a) + self.head2(b)  # type: ignore[no-any-return]
        out: Tensor = self.head1(a) + b[:, :2].pow(2)
        return out


def chunk_both_considered() -> Case:
    model = Chunked(both=True)
    return Case(model, torch.randn(B, 3), [model.head1, model.head2], mse)


def chunk_partly_considered() -> Case:
    model = Chunked(both=False)
    return Case(model, torch.randn(B, 3), [model.head1], mse, resumed=False)


def identical_samples() -> Case:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return Case(model, torch.randn(1, 3).expand(B, 3).contiguous(), [model], mse)


CASES: dict[str, Callable[[], Case]] = {
    f.__name__: f
    for f in (
        seed_mlp,
        seed_mlp_all,
        linear_sequence,
        linear_4d_input,
        conv1d,
        conv2d,
        conv3d,
        embedding,
        norms,
        batchnorm_eval,
        module_called_twice,
        tied_embedding,
        multihead_attention,
        transformer_layer,
        direct_parameter,
        frozen_weight,
        timm_vit,
        timm_resnet,
        timm_norms,
        non_considered_after_considered,
        skip_connection,
        identical_samples,
        deep_skip,
        trunk_feature_loss,
        two_towers,
        nested_boundaries,
        generic_module_called_twice,
        gru_cell_unrolled,
        chunk_both_considered,
        chunk_partly_considered,
        gru_batch_first,
        lstm_time_first_bidirectional,
        lstm_projection,
        rnn_relu_time_first,
        timm_beit,
        timm_eva,
        torchvision_swin,
        parent_reading_child_weight,
        parent_calling_child_method,
    )
}
