"""Independent references for the dual-cone QPs of UPGrad (``v = argmin vᵀGv s.t. v ≥ u``):
random Gramians, quadprog per row, brute force over active sets, KKT conditions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import Tensor

F64 = torch.float64


def random_gramian(m: int, rank: int, kind: str = "gaussian", seed: int = 0) -> Tensor:
    """``J Jᵀ`` for a random ``J`` (``[m, rank]``), not normalised. ``kind``: ``"gaussian"``;
    ``"uneven"`` (gradient norms spread by ``e^N(0,1)``); ``"scaled"`` (by ``e^3N(0,1)``);
    ``"aligned"`` (every pair positive: no conflict); ``"conflicting"`` (gradients nearly
    cancel)."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(m, rank, generator=gen, dtype=F64)
    if kind == "aligned":
        J = J.abs() + 1.0
    elif kind == "conflicting":
        J = J - J.mean(dim=0, keepdim=True) + 0.05 * J.abs().mean()
    elif kind in ("uneven", "scaled"):
        spread = 1.0 if kind == "uneven" else 3.0
        J = J * torch.exp(spread * torch.randn(m, 1, generator=gen, dtype=F64))
    return J @ J.T


def regularised(G: Tensor, norm_eps: float = 1e-4, reg_eps: float = 1e-4) -> Tensor:
    """TorchJD's normalize + regularize, written out independently of the package."""
    trace = float(G.trace())
    base = torch.zeros_like(G) if trace < norm_eps else G / trace
    return base + reg_eps * torch.eye(G.shape[0], dtype=G.dtype)


def normalised_gramian(m: int, rank: int, kind: str = "gaussian", seed: int = 0) -> Tensor:
    """``regularised(random_gramian(...))``: a problem as UPGrad's solver receives it."""
    return regularised(random_gramian(m, rank, kind, seed))


def cross_entropy_gramian(m: int, n_classes: int, seed: int) -> Tensor:
    """As an MLP's last layer gives: G_ij = (p_i − e_yi)·(p_j − e_yj) h_i·h_j (samples of
    different classes conflict)."""
    gen = torch.Generator().manual_seed(seed)
    logits = 0.3 * torch.randn(m, n_classes, generator=gen, dtype=F64)
    labels = torch.randint(0, n_classes, (m,), generator=gen)
    C = logits.softmax(dim=1) - torch.nn.functional.one_hot(labels, n_classes).to(F64)
    h = torch.randn(m, 32, generator=gen, dtype=F64).relu() + 0.1
    G = (C @ C.T) * (h @ h.T)
    return regularised(G)


def upgrad_rows(m: int) -> Tensor:
    """UPGrad's lower bounds: row ``i`` is ``e_i / m`` (preference ``1/m`` per loss)."""
    return torch.eye(m, dtype=F64) / m


def quadprog_rows(G: Tensor, U: Tensor) -> Tensor:
    """One quadprog QP per row ``u`` of ``U``: ``argmin ½vᵀGv s.t. v ≥ u`` (the calling test is
    skipped where qpsolvers is not installed)."""
    solve_qp = pytest.importorskip("qpsolvers").solve_qp
    m = G.shape[0]
    rows = []
    for u in U.numpy():
        v = solve_qp(G.numpy(), np.zeros(m), -np.eye(m), -u, solver="quadprog")
        assert v is not None
        rows.append(v)
    return torch.from_numpy(np.stack(rows))


def brute_force(G: Tensor, u: Tensor) -> Tensor:
    """Enumerate all ``2^m`` free sets; return the one whose candidate satisfies the KKT
    conditions (unique for positive definite ``G``)."""
    m = G.shape[0]
    q = G @ u
    for bits in itertools.product([False, True], repeat=m):
        free = torch.tensor(bits)
        x = torch.zeros(m, dtype=F64)
        if free.any():
            x[free] = torch.linalg.solve(G[free][:, free], -q[free])
        y = G @ x + q
        if (x >= -1e-12).all() and (y[~free] >= -1e-12).all():
            return u + x.clamp_min(0.0)
    raise AssertionError("no KKT point found")


def assert_kkt(G: Tensor, U: Tensor, V: Tensor, rtol: float = 1e-9) -> None:
    """Per row: ``v ≥ u``, ``Gv ≥ 0`` and ``(v − u) ⊙ Gv = 0``, each to ``rtol`` relative to
    that row's own scale (``max(|v|, |u|)``, times ``max|G|`` for ``Gv``): a small row is held
    to its own size, not to the largest row's."""
    scale_v = torch.maximum(V.abs().amax(dim=1), U.abs().amax(dim=1)).clamp_min(1e-300)
    scale_y = scale_v * G.abs().max()
    Y = V @ G
    slack_v, slack_y = rtol * scale_v.unsqueeze(1), rtol * scale_y.unsqueeze(1)
    rows = torch.arange(V.shape[0])
    bad = rows[(-slack_v > (V - U)).any(dim=1)].tolist()
    assert not bad, f"primal feasibility v >= u fails on rows {bad}"
    bad = rows[(-slack_y > Y).any(dim=1)].tolist()
    assert not bad, f"dual feasibility Gv >= 0 fails on rows {bad}"
    bad = rows[((V - U) * Y).abs().gt(slack_v * slack_y / rtol).any(dim=1)].tolist()
    assert not bad, f"complementarity fails on rows {bad}"


def forbid(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
    """Make ``owner.name`` (a solver stage: a path, the active-set method, FISTA) fail the test
    if it is reached."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{getattr(owner, '__name__', owner)}.{name} was reached")

    monkeypatch.setattr(owner, name, forbidden)
