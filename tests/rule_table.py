"""The rule contract's table (tests/test_rule_contract.py): one entry per registered layer type,
over non-default hyperparameters, and hypothesis strategies that draw more settings. The
:class:`~rule_settings.Setting` builders are in ``rule_settings``."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import assume
from hypothesis import strategies as st
from rule_settings import (
    CELLS,
    CONV_TYPES,
    B,
    Gated,
    Noisy,
    Setting,
    attention,
    batchnorm,
    cell,
    conv,
    embedding,
    falcon_linear,
    hf_conv1d,
    hf_rmsnorm,
    linear,
    norm,
    one,
    randn,
    recurrent,
    timm_norm,
    with_table,
)
from torch import nn

# -- the table -----------------------------------------------------------------------------------


def settings() -> list[Setting]:
    table = [
        linear("default", 5, 3, True, ()),
        linear("no_bias_tokens", 5, 3, False, (6,)),
        linear("4d", 3, 2, True, (2, 3)),
        hf_conv1d("default", 5, 3, ()),
        hf_conv1d("tokens", 4, 6, (5,)),
        falcon_linear("default", 5, 3, True, ()),
        falcon_linear("tokens_no_bias", 4, 6, False, (5,)),
        conv("stride_dilation_groups", 1, (9,), in_channels=4, out_channels=6, kernel_size=3,
             stride=2, dilation=2, groups=2, padding=1),
        conv("same_circular_depthwise", 1, (7,), in_channels=3, out_channels=3, kernel_size=5,
             padding="same", groups=3, padding_mode="circular", bias=False),
        conv("single_position_grouped", 1, (5,), in_channels=4, out_channels=6, kernel_size=5,
             groups=2),
        conv("single_position_depthwise", 1, (3,), in_channels=4, out_channels=4, kernel_size=3,
             groups=4, bias=False),
        conv("reflect_stride3", 1, (8,), in_channels=2, out_channels=4, kernel_size=3, stride=3,
             padding=2, padding_mode="reflect"),
        conv("grouped_stride", 2, (7, 8), in_channels=4, out_channels=2, kernel_size=(3, 2),
             stride=(2, 3), padding=(1, 0), groups=2),
        conv("replicate_dilation", 2, (6, 7), in_channels=2, out_channels=4, kernel_size=3,
             dilation=(1, 2), padding=2, padding_mode="replicate"),
        conv("single_position_grouped", 2, (3, 4), in_channels=6, out_channels=4,
             kernel_size=(3, 4), groups=2),
        conv("single_position_one_group", 2, (2, 2), in_channels=3, out_channels=2,
             kernel_size=2),
        conv("circular_1x1_groups", 2, (4, 5), in_channels=6, out_channels=6, kernel_size=1,
             groups=3, padding_mode="circular"),
        conv("same_reflect_even_kernel", 2, (5, 4), in_channels=3, out_channels=6,
             kernel_size=(3, 2), padding="same", padding_mode="reflect", groups=3),
        conv("grouped", 3, (3, 5, 6), in_channels=2, out_channels=4, kernel_size=(1, 2, 3),
             stride=(1, 2, 1), groups=2, padding=1),
        conv("single_position_grouped", 3, (2, 2, 2), in_channels=4, out_channels=2,
             kernel_size=2, groups=2, bias=False),
        conv("replicate_dilation", 3, (3, 3, 4), in_channels=2, out_channels=2, kernel_size=2,
             padding=1, padding_mode="replicate", dilation=(1, 1, 2)),
        embedding("default", (5,)),
        embedding("one_id_per_sample", ()),
        embedding("padding_idx", (5,), padding_idx=2),
        embedding("negative_padding_idx", (2, 3), padding_idx=-5),
        embedding("max_norm_none", (4,), max_norm=None),
        embedding("max_norm", (4,), max_norm=1.0, norm_type=1.5),
        embedding("scale_grad_by_freq", (5,), scale_grad_by_freq=True),
        norm(nn.LayerNorm, "layernorm_eps", lambda: nn.LayerNorm(5, eps=0.5), (3, 5)),
        norm(nn.LayerNorm, "layernorm_no_bias_2d_shape",
             lambda: nn.LayerNorm((2, 5), eps=1e-2, bias=False), (3, 2, 5)),
        norm(nn.LayerNorm, "layernorm_no_affine",
             lambda: nn.LayerNorm(5, elementwise_affine=False), (5,)),
        norm(nn.RMSNorm, "rmsnorm_default_eps", lambda: nn.RMSNorm(5), (3, 5)),
        hf_rmsnorm("llama", "LlamaRMSNorm", (3, 5), 1e-6),
        hf_rmsnorm("qwen2", "Qwen2RMSNorm", (4,), 0.3),
        hf_rmsnorm("gemma", "GemmaRMSNorm", (2, 3, 4), 1e-6, "gemma"),
        hf_rmsnorm("gemma2", "Gemma2RMSNorm", (5,), 0.3, "gemma"),
        hf_rmsnorm("olmo2", "Olmo2RMSNorm", (3, 4), 0.3, "olmo"),
        hf_rmsnorm("gpt_oss", "GptOssRMSNorm", (5,), 1e-5, "olmo"),
        norm(nn.RMSNorm, "rmsnorm_eps", lambda: nn.RMSNorm((2, 4), eps=0.3), (2, 4)),
        norm(nn.RMSNorm, "rmsnorm_no_affine",
             lambda: nn.RMSNorm(4, eps=0.1, elementwise_affine=False), (4,)),
        norm(nn.GroupNorm, "groupnorm_eps", lambda: nn.GroupNorm(2, 6, eps=0.4), (6, 3)),
        norm(nn.GroupNorm, "groupnorm_one_group_2d",
             lambda: nn.GroupNorm(1, 4, eps=1e-3), (4, 2, 3)),
        norm(nn.GroupNorm, "groupnorm_no_positions",
             lambda: nn.GroupNorm(2, 4, eps=0.2), (4,)),
        norm(nn.GroupNorm, "groupnorm_no_affine",
             lambda: nn.GroupNorm(3, 6, affine=False), (6, 2)),
        norm(nn.BatchNorm1d, "batchnorm1d_eval_eps", batchnorm(1, 0.3, True, (4,)), (4,)),
        norm(nn.BatchNorm1d, "batchnorm1d_eval_sequence", batchnorm(1, 1e-3, True, (4,)), (4, 5)),
        norm(nn.BatchNorm2d, "batchnorm2d_eval", batchnorm(2, 0.2, True, (3,)), (3, 2, 4)),
        norm(nn.BatchNorm3d, "batchnorm3d_eval", batchnorm(3, 1e-5, True, (2,)), (2, 2, 2, 3)),
        norm(nn.BatchNorm2d, "batchnorm2d_eval_no_affine", batchnorm(2, 0.2, False, (3,)),
             (3, 2, 2)),
        norm(nn.BatchNorm1d, "batchnorm1d_train", batchnorm(1, 0.1, True, (4,)), (4, 3),
             train=True, step_refusal="BatchNorm|batch"),
        norm("timm.layers.norm.LayerNorm", "timm_layernorm",
             timm_norm("LayerNorm", num_channels=5, eps=0.2), (3, 5), needs="timm"),
        norm("timm.layers.norm.LayerNorm2d", "timm_layernorm2d",
             timm_norm("LayerNorm2d", num_channels=4, eps=0.3), (4, 3, 2), needs="timm"),
        norm("timm.layers.norm.GroupNorm", "timm_groupnorm",
             timm_norm("GroupNorm", num_channels=4, num_groups=2, eps=0.1), (4, 3), needs="timm"),
        recurrent("RNN", "time_first"),
        recurrent("RNN", "relu_two_layers_no_bias_batch_first", layers=2, nonlinearity="relu",
                  bias=False, batch_first=True),
        recurrent("RNN", "dropout_eval", layers=2, dropout=0.5, states=True),
        recurrent("RNN", "dropout_train", layers=2, dropout=0.5, train=True),
        recurrent("RNN", "train_single_layer", train=True, bidirectional=True),
        recurrent("LSTM", "bidirectional_two_layers_batch_first_states", layers=2,
                  bidirectional=True, batch_first=True, states=True),
        recurrent("LSTM", "proj_size_states_kwarg", proj_size=2, states=True, as_kwarg=True),
        recurrent("LSTM", "proj_bidirectional_dropout_eval", layers=3, proj_size=2,
                  bidirectional=True, dropout=0.3),
        recurrent("LSTM", "dropout_train", layers=2, dropout=0.3, train=True, batch_first=True),
        recurrent("GRU", "bidirectional_states", bidirectional=True, states=True),
        recurrent("GRU", "two_layers_dropout_eval_batch_first", layers=2, dropout=0.2,
                  batch_first=True),
        recurrent("GRU", "dropout_train", layers=2, dropout=0.2, train=True),
        recurrent("GRU", "one_step_no_bias", bias=False, length=1),
        attention("batch_first", batch_first=True),
        attention("time_first_no_weights", batch_first=False, need_weights=False),
        attention("kdim_vdim_no_bias", batch_first=True, heads=1, kdim=3, vdim=5, bias=False),
        attention("bias_kv_zero_attn_padding", batch_first=False, add_bias_kv=True,
                  add_zero_attn=True, padding_mask=True),
        attention("shared_mask_per_head_weights", batch_first=True, attn_mask=True,
                  average=False, padding_mask=True),
        attention("square_shared_mask", batch_first=False, attn_mask=True, length=B, source=B),
        attention("dropout_train", batch_first=True, dropout=0.5, train=True),
        Setting(nn.Module, "generic_gated", Gated, one(lambda g: randn(g, B, 2, 3)), (0,), (0,)),
        Setting(nn.Module, "generic_bilinear", lambda: nn.Bilinear(3, 2, 2),
                lambda g: ((randn(g, B, 3), randn(g, B, 2)), {}), (0, 0), (0,)),
        with_table(B),
        with_table(B + 2),
        Setting(nn.Module, "generic_dropout_train", Noisy, one(lambda g: randn(g, B, 3)), (0,),
                (0,), train=True, refusal="random"),
        Setting(nn.Module, "generic_dropout_eval", Noisy, one(lambda g: randn(g, B, 3)), (0,),
                (0,)),
        *(cell(kind, states) for kind in CELLS for states in (False, True)),
    ]  # fmt: skip
    return table


SETTINGS = settings()


# -- hypothesis strategies -----------------------------------------------------------------------


@st.composite
def conv_settings(draw: st.DrawFn) -> Setting:
    dims = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding: Any = draw(st.sampled_from([0, 1, 2, "same"]))
    if padding == "same" and max(stride) > 1:
        padding = 1
    # Sizes from exactly the receptive field (one output position) upwards.
    spatial = tuple(
        max(1, dil * (k - 1) + 1 + draw(st.integers(-2, 3)))
        for k, dil in zip(kernel, dilation, strict=True)
    )
    kwargs = dict(
        in_channels=c_in,
        out_channels=c_out,
        kernel_size=kernel,
        stride=stride,
        dilation=dilation,
        groups=groups,
        padding=padding,
        padding_mode=mode,
        bias=draw(st.booleans()),
    )
    try:  # keep only the settings torch accepts
        CONV_TYPES[dims](**kwargs)(torch.zeros(1, c_in, *spatial))
    except (RuntimeError, ValueError, NotImplementedError):
        assume(False)
    return conv(f"drawn_{spatial}_{kwargs}", dims, spatial, **kwargs)


EPS = st.sampled_from([1e-6, 1e-3, 0.05, 0.5, 2.0])


@st.composite
def norm_settings(draw: st.DrawFn) -> Setting:
    kind = draw(st.sampled_from(["layer", "rms", "group", "batch"]))
    eps = draw(EPS)
    if kind in ("layer", "rms"):
        features = (draw(st.integers(2, 4)), *draw(st.lists(st.integers(1, 3), max_size=1)))
        positions = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
        affine = draw(st.booleans())
        bias = draw(st.booleans())
        if kind == "layer":
            return norm(nn.LayerNorm, f"drawn_layernorm_{features}_{positions}_eps{eps}_{bias}",
                        lambda: nn.LayerNorm(features, eps=eps, bias=bias),
                        (*positions, *features))  # fmt: skip
        rms_eps = draw(st.sampled_from([None, eps]))
        return norm(nn.RMSNorm, f"drawn_rmsnorm_{features}_{positions}_eps{rms_eps}_{affine}",
                    lambda: nn.RMSNorm(features, eps=rms_eps, elementwise_affine=affine),
                    (*positions, *features))  # fmt: skip
    groups = draw(st.integers(1, 3))
    channels = groups * draw(st.integers(1, 2))
    spatial = tuple(draw(st.lists(st.integers(1, 3), max_size=3)))
    if kind == "group":
        return norm(
            nn.GroupNorm,
            f"drawn_groupnorm_{groups}_{channels}_{spatial}_eps{eps}",
            lambda: nn.GroupNorm(groups, channels, eps=eps),
            (channels, *spatial),
        )
    dims = max(1, len(spatial))  # [B, C] and [B, C, L]: BatchNorm1d
    shape = (channels, *spatial)
    key = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    return norm(key, f"drawn_batchnorm_{shape}_eps{eps}", batchnorm(dims, eps, True, shape), shape)


@st.composite
def recurrent_settings(draw: st.DrawFn) -> Setting:
    mode = draw(st.sampled_from(["RNN", "LSTM", "GRU"]))
    layers = draw(st.integers(1, 3))
    return recurrent(
        mode,
        "drawn",
        layers=layers,
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.4])) if layers > 1 else 0.0,
        train=draw(st.booleans()),
        proj_size=draw(st.sampled_from([0, 2, 3])) if mode == "LSTM" else 0,
        bias=draw(st.booleans()),
        states=draw(st.booleans()),
        nonlinearity=draw(st.sampled_from(["tanh", "relu"])),
        as_kwarg=draw(st.booleans()),
        length=draw(st.integers(1, 4)),
    )


@st.composite
def embedding_settings(draw: st.DrawFn) -> Setting:
    num = draw(st.integers(3, 8))
    padding = draw(st.one_of(st.none(), st.integers(-num, num - 1)))
    shape = tuple(draw(st.lists(st.integers(1, 4), max_size=2)))
    max_norm = draw(st.sampled_from([None, 0.5]))
    return embedding("drawn", shape, num=num, padding_idx=padding, max_norm=max_norm)


@st.composite
def attention_settings(draw: st.DrawFn) -> Setting:
    return attention(
        "drawn",
        batch_first=draw(st.booleans()),
        heads=draw(st.sampled_from([1, 2, 4])),
        kdim=draw(st.sampled_from([None, 3])),
        vdim=draw(st.sampled_from([None, 5])),
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()),
        padding_mask=draw(st.booleans()),
        attn_mask=draw(st.booleans()),
        need_weights=draw(st.booleans()),
        average=draw(st.booleans()),
        length=draw(st.integers(1, 4)),
        source=draw(st.integers(3, 5)),
    )
