"""Worker processes for test_fsdp: models sharded with FSDP2 (``fully_shard``), one step each.

Every rank runs every job of the test module in one process (starting ranks is what costs), and
saves, per job, the whole parameters after one ``SGD(lr=0.1)`` step of partial JD.
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import fsdp
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh

from pjd_optim import Distributed, GramianMode, NonFinite, PartialJDOptimizer

FSDP2 = hasattr(fsdp, "fully_shard")  # public from torch 2.6 (before, it fails on the CPU)
BATCH = 3
LR = 0.1


class Scale(nn.Module):
    """A layer without a closed-form rule: the generic rule (re-run per sample) covers it."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, features))
        self.bias = nn.Parameter(torch.linspace(-0.2, 0.2, features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.weight + self.bias)


class Head(nn.Module):
    """Mean over the sequence, then a Linear (per-sample outputs)."""

    def __init__(self, features: int, out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, out)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.linear(x.mean(dim=1))
        return out


class LastState(nn.Module):
    def forward(self, x: tuple[Tensor, Tensor]) -> Tensor:
        return x[0][:, -1]


def make_model(case: str) -> tuple[nn.Module, list[nn.Module]]:
    """``(model, considered modules)``, the same on every rank and in the test's oracle."""
    torch.manual_seed(0)
    model: nn.Module
    if case == "generic":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), Scale(6), nn.Linear(6, 1))
        return model, [model[2], model[3]]
    if case == "attention":
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        model = nn.Sequential(nn.Linear(4, 8), layer, Head(8, 1))
        return model, [model[1], model[2]]
    if case == "recurrent":
        model = nn.Sequential(nn.Linear(4, 5), nn.GRU(5, 5, batch_first=True), LastState())
        model.append(nn.Linear(5, 1))
        return model, [model[1], model[3]]
    if case == "vit":
        import timm

        model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
        return model, [cast(nn.Sequential, model.blocks)[-1]]
    raise ValueError(case)


def batch(case: str, rank: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    shape = {"generic": (BATCH, 4), "vit": (BATCH, 3, 32, 32)}.get(case, (BATCH, 3, 4))
    x = torch.randn(shape, generator=generator).to(dtype)
    if case == "vit":
        return x, torch.randint(0, 3, (BATCH,), generator=generator)
    return x, torch.randn(BATCH, generator=generator).to(dtype)


def losses_of(case: str, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out: Tensor = model(x)
    out = out.to(torch.promote_types(out.dtype, torch.float32))  # (bfloat16 under FSDP2's MP)
    if case == "vit":
        return nn.functional.cross_entropy(out, y, reduction="none")
    return (out.squeeze(-1) - y.to(out.dtype)).pow(2)


def shard(model: nn.Module, case: str, mp: bool, root_only: bool = False) -> None:
    """Each layer with parameters, then the root (as FSDP2 users do); or the root alone (which
    does not reshard after its forward: its parameters stay unsharded until the backward)."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    options: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": policy if mp else fsdp.MixedPrecisionPolicy(),
    }
    blocks = cast(nn.Sequential, model.blocks) if case == "vit" else model
    layers = [] if root_only else list(blocks.children())
    for layer in layers:
        if any(True for _ in layer.parameters()):
            fsdp.fully_shard(layer, **options)
    fsdp.fully_shard(model, **options)


def whole(t: Tensor) -> Tensor:
    return (
        (t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t).detach().clone()
    )


def one_step(
    rank: int, case: str, mode: Distributed, mp: bool = False, root_only: bool = False
) -> dict[str, Any]:
    """One step on the sharded model: whole parameters after it, and what the step reported."""
    model, considered = make_model(case)
    dtype = torch.float32 if mp else torch.float64
    model.to(dtype)
    shard(model, case, mp, root_only)
    base = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer = PartialJDOptimizer(base, model, considered=considered, distributed=mode)
    x, y = batch(case, rank, dtype)
    optimizer.backward(losses_of(case, model, x, y))
    optimizer.step()
    info = optimizer.last_step
    assert info is not None
    return {
        "params": [whole(p) for p in model.parameters()],
        "resumed": info.resumed,
        "bytes": info.received_bytes,
        "gramian_dtype": info.gramian.dtype,
    }


def checkpoint(rank: int) -> dict[str, Any]:
    """The wrapper's state through torch's distributed checkpoint helpers, as the base's."""
    results: dict[str, Any] = {}
    model, considered = make_model("generic")
    model.double()
    shard(model, "generic", False)
    base = torch.optim.Adam(model.parameters(), lr=LR)
    optimizer = PartialJDOptimizer(base, model, considered=considered)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        empty = get_optimizer_state_dict(model, optimizer)  # initialises state: a zero step
    results["init_warnings"] = [str(w.message) for w in caught]
    states: Any = empty["state"]
    results["empty_state"] = all(_zeros(v) for s in states.values() for v in s.values())
    results["empty_step_params"] = [whole(p) for p in model.parameters()]
    x, y = batch("generic", rank, torch.float64)
    optimizer.backward(losses_of("generic", model, x, y))
    optimizer.step()
    saved = get_optimizer_state_dict(model, optimizer)
    results["same_as_base"] = _equal(saved, get_optimizer_state_dict(model, base))
    # a fresh model and wrapper, loaded from it, take the next step as the first would
    fresh, fresh_considered = make_model("generic")
    fresh.double()
    shard(fresh, "generic", False)
    fresh.load_state_dict(model.state_dict())
    restored = PartialJDOptimizer(
        torch.optim.Adam(fresh.parameters(), lr=LR), fresh, considered=fresh_considered
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_optimizer_state_dict(fresh, restored, copy.deepcopy(saved))  # (as if from disk)
    results["load_warnings"] = [str(w.message) for w in caught]
    results["loaded_same"] = _equal(get_optimizer_state_dict(fresh, restored), saved)
    for opt, net in ((optimizer, model), (restored, fresh)):
        x, y = batch("generic", rank + 10, torch.float64)
        opt.zero_grad()
        opt.backward(losses_of("generic", net, x, y))
        opt.step()
    results["next_step_same"] = all(
        torch.equal(whole(a), whole(b))
        for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )
    return results


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.equal(whole(a), whole(b))
    return bool(a == b)


def positions(rank: int) -> dict[str, Any]:
    """Per-token losses ``[B, T]`` through an attention block with another ``T`` on each rank:
    refused on every rank (the passes per position, each gathering the sharded parameters, did
    not match: gloo aborted both processes)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 8), layer, nn.Linear(8, 1)).double()
    shard(model, "attention", mp=False)
    base = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer = PartialJDOptimizer(base, model, considered=[model[1], model[2]])
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(BATCH, 3 + rank, 4, generator=generator, dtype=torch.float64)
    try:
        optimizer.backward(model(x).squeeze(-1).pow(2))
    except ValueError as error:
        return {"refused": str(error)}
    return {"refused": ""}


def disagreeing(rank: int, case: str) -> dict[str, Any]:
    """Rank 1 alone: scalar losses (``"scalar"``, refused before the first pass), its losses
    flipped (``"flipped"``: a valid permutation that takes more passes there), NaN in its
    ``[B, T]`` losses (``"nan"``, under ``nonfinite="skip"``), rows that mix while rank 0's are
    reordered (``"mixed"``: refused after the passes, before the generic rule's re-run gathers
    parameters). Each used to hang both ranks in FSDP's parameter gathers; now every rank
    refuses, or skips. ``"autograd"``: that mode, refused clearly (an internal error before)."""
    model, considered = make_model("generic")
    model.double()
    shard(model, "generic", mp=False)
    base = torch.optim.SGD(model.parameters(), lr=LR)
    nonfinite: NonFinite = "skip" if case == "nan" else "raise"
    mode: GramianMode = "autograd" if case == "autograd" else "hooks"
    optimizer = PartialJDOptimizer(
        base, model, considered=considered, nonfinite=nonfinite, gramian_mode=mode
    )
    x, y = batch("generic", rank, torch.float64)
    if case == "nan":  # per-token losses: [B, T]
        x = x.unsqueeze(1).expand(-1, 3, -1) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1)
    losses = (model(x).squeeze(-1) - (y if case != "nan" else y[:, None])).pow(2)
    if case == "mixed":  # both reordered; rank 1's rows mix (refused after the passes)
        losses = losses.cumsum(0) if rank == 1 else losses.flip(0)
    elif rank == 1:
        if case == "scalar":
            losses = losses.sum()
        elif case == "flipped":
            losses = losses.flip(0)
        elif case == "nan":
            losses = losses * torch.tensor([[float("nan")] + [1.0] * 2] + [[1.0] * 3] * 2)
    before = [whole(p) for p in model.parameters()]
    try:
        optimizer.step(losses)
    except ValueError as error:
        return {"refused": str(error), "skipped": optimizer.skipped_steps}
    unchanged = all(
        torch.equal(whole(p), b) for p, b in zip(model.parameters(), before, strict=True)
    )
    return {"refused": "", "skipped": optimizer.skipped_steps, "unchanged": unchanged}


def _zeros(v: Any) -> bool:
    return not isinstance(v, Tensor) or v.ndim == 0 or not bool(whole(v).any())


def _job(
    case: str, mode: Distributed, mp: bool = False, root_only: bool = False
) -> Callable[[int], dict[str, Any]]:
    return lambda rank: one_step(rank, case, mode, mp, root_only)


JOBS: dict[str, Callable[[int], dict[str, Any]]] = {
    **{
        f"{case}-{mode}": _job(case, mode)
        for case in ("generic", "attention", "recurrent", "vit")
        for mode in ("local", "global")
    },
    **{f"{case}-bf16-local": _job(case, "local", True) for case in ("generic", "attention")},
    **{
        f"generic-root-{mode}": _job("generic", mode, root_only=True)
        for mode in ("local", "global")
    },
    "checkpoint": checkpoint,
    "positions": positions,
    **{
        f"disagree-{case}": partial(disagreeing, case=case)
        for case in ("scalar", "flipped", "nan", "mixed", "autograd")
    },
}


def run(rank: int, world: int, port: int, jobs: list[str], out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=30)
    )
    try:
        for job in jobs:
            try:
                result: Any = JOBS[job](rank)
            except Exception as error:  # reported per job; the test names it
                result = {"error": f"{type(error).__name__}: {error}"}
                torch.save(result, Path(out_dir, f"{job}-{rank}.pt"))
                raise
            torch.save(result, Path(out_dir, f"{job}-{rank}.pt"))
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()
