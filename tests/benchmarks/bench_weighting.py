"""Benchmark of the batched UPGrad weighting against the per-row quadprog reference.

Run: ``python tests/benchmarks/bench_weighting.py [--device cuda] [--sizes 16 64 256 1024]``.

For each size m and Gramian kind (random rank m/2, random rank 2m, non-conflicting, and a
softmax classifier's last-layer Gramian ``(C Cᵀ) ⊙ (H Hᵀ)``, whose rows keep most indices free
as for real losses), prints our median time over interleaved repetitions, the reference time
(TorchJD's ``UPGradWeighting``, per-row quadprog; a plain qpsolvers loop when TorchJD is
absent), their ratio and the largest weight difference, and a DAQP column: the bare per-row
loop of the compiled dual active-set solver (one ``daqp.Model``, ``q`` updated per row; its own
tolerances, no polish) with its largest weight difference to ours. ``--paths daqp numpy ...``
adds a column per forced solver path (``SolverOptions(path=...)``: where the crossovers are).
On an accelerator it also times the lock-step path on the device and the copy to the host
(``SolverOptions.host_max_m`` picks the host below a size). No assertion on time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from pjd_optim import UPGrad
from pjd_optim.solver import SolverOptions

KINDS = ("rank m/2", "rank 2m", "non-conflicting", "classifier")


def make_gramian(m: int, kind: str, device: torch.device, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "rank m/2":
        J = torch.randn(m, max(1, m // 2), generator=gen, dtype=torch.float64)
    elif kind == "rank 2m":
        J = torch.randn(m, 2 * m, generator=gen, dtype=torch.float64)
    elif kind == "classifier":  # a softmax classifier's last layer, as real losses give
        logits = 0.3 * torch.randn(m, 10, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, 10, (m,), generator=gen)
        C = logits.softmax(dim=1) - torch.nn.functional.one_hot(labels, 10).double()
        features = torch.randn(m, 64, generator=gen, dtype=torch.float64).relu() + 0.1
        return ((C @ C.T) * (features @ features.T)).to(device)
    else:  # non-conflicting: all pairwise inner products positive
        J = torch.rand(m, m, generator=gen, dtype=torch.float64) + 0.1
    return (J @ J.T).to(device)


def reference_weighting() -> tuple[str, Callable[[Tensor], Tensor]]:
    try:
        from torchjd.aggregation import UPGradWeighting
    except ImportError:
        from qpsolvers import solve_qp

        def per_row(gramian: Tensor) -> Tensor:
            G = gramian.detach().cpu().double()
            trace = float(G.trace())
            G = (torch.zeros_like(G) if trace < 1e-4 else G / trace) + 1e-4 * torch.eye(len(G))
            m = G.shape[0]
            Gn, total = G.numpy(), np.zeros(m)
            for i in range(m):
                u = np.zeros(m)
                u[i] = 1.0 / m
                v = solve_qp(Gn, np.zeros(m), -np.eye(m), -u, solver="quadprog")
                assert v is not None, "quadprog failed"
                total += v
            return torch.from_numpy(total).to(gramian)

        return "qpsolvers per row", per_row
    weighting = UPGradWeighting()
    return "TorchJD UPGradWeighting", lambda gramian: weighting(gramian)


def daqp_per_row(gramian: Tensor) -> Tensor:
    """UPGrad's weights by DAQP, one QP per row (``v ≥ e_i/m``), TorchJD's normalisation."""
    import daqp

    G = gramian.detach().cpu().double().numpy()
    m = G.shape[0]
    trace = float(np.trace(G))
    G = (np.zeros_like(G) if trace < 1e-4 else G / trace) + 1e-4 * np.eye(m)
    model = daqp.Model()
    lower = np.zeros(m)
    lower[0] = 1.0 / m
    model.setup(G, np.zeros(m), np.zeros((0, m)), np.full(m, np.inf), lower)
    total = np.zeros(m)
    for i in range(m):
        if i:
            lower[i - 1], lower[i] = 0.0, 1.0 / m
            model.update(blower=lower)
        v, _, flag, _ = model.solve()
        assert flag >= 1, "DAQP failed"
        total += v
    return torch.from_numpy(total).to(gramian)


def timed(fn: Callable[[Tensor], Tensor], G: Tensor) -> tuple[float, Tensor]:
    if G.device.type == "cuda":
        torch.cuda.synchronize(G.device)
    start = time.perf_counter()
    out = fn(G)
    if G.device.type == "cuda":
        torch.cuda.synchronize(G.device)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="device of the Gramian (cpu, cuda, ...)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--repeats", type=int, default=7, help="repetitions of ours (3 if m≥1024)")
    parser.add_argument("--ref-repeats", type=int, default=3, help="repetitions of the reference")
    parser.add_argument(
        "--ref-max-m", type=int, default=256, help="skip the reference above this m (slow)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--paths", nargs="*", default=[], help="forced solver paths to time")
    parser.add_argument(
        "--daqp-max-m", type=int, default=256, help="skip the DAQP column above this m (slow)"
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    accelerator = device.type != "cpu"
    sizes = args.sizes or ([16, 128, 1024, 4096] if accelerator else [16, 64, 256, 1024])
    ref_name, reference = reference_weighting()
    ours = UPGrad()
    paths = {}
    if accelerator:  # each path forced, beside the default choice
        paths["lock-step"] = UPGrad(solver=SolverOptions(path="lockstep"))
        paths["host"] = UPGrad(solver=SolverOptions(host_max_m=1 << 30))
    paths.update({name: UPGrad(solver=SolverOptions(path=name)) for name in args.paths})
    print(f"device={device} threads={torch.get_num_threads()} reference={ref_name}\n")
    extra = "".join(f" {name} (ms) |" for name in paths)
    print(
        f"| m | Gramian | ours (ms) |{extra} DAQP per row (ms) | its max abs(dw) |"
        " reference (ms) | speed-up | max abs(dw) |"
    )
    print("| --- | --- | --- |" + " --- |" * len(paths) + " --- | --- | --- | --- | --- |")
    for m in sizes:
        for kind in args.kinds:
            G = make_gramian(m, kind, device, seed=m)
            ours(G)  # warm-up
            repeats = args.repeats if m < 1024 else min(args.repeats, 3)
            run_ref = m <= args.ref_max_m
            ours_times: list[float] = []
            ref_times: list[float] = []
            daqp_times: list[float] = []
            w = w_ref = w_daqp = None
            run_daqp = m <= args.daqp_max_m
            # Interleave our repetitions with the reference's, so load drifts hit both alike.
            ref_reps = max(1, args.ref_repeats if m <= 64 else 1) if run_ref else 0
            for rep in range(max(repeats, ref_reps)):
                if rep < repeats:
                    t, w = timed(ours, G)
                    ours_times.append(t)
                if rep < ref_reps:
                    t, w_ref = timed(reference, G)
                    ref_times.append(t)
                if run_daqp and rep < max(repeats if m <= 64 else 1, 1):
                    t, w_daqp = timed(daqp_per_row, G)
                    daqp_times.append(t)
            t_ours = 1e3 * statistics.median(ours_times)
            columns = ""
            for weighting in paths.values():
                weighting(G)  # warm-up
                path_ms = 1e3 * statistics.median(timed(weighting, G)[0] for _ in range(repeats))
                columns += f" {path_ms:.2f} |"
            if w is not None and w_daqp is not None:
                diff = float((w.double().cpu() - w_daqp.double().cpu()).abs().max())
                columns += f" {1e3 * statistics.median(daqp_times):.2f} | {diff:.0e} |"
            else:
                columns += " not run | - |"
            if w is not None and w_ref is not None:
                t_ref = 1e3 * statistics.median(ref_times)
                diff = float((w.double() - w_ref.double().to(w.device)).abs().max())
                ratio = t_ref / t_ours
                line = f"{t_ref:.1f} | {ratio:.{1 if ratio < 10 else 0}f}x | {diff:.1e}"
            else:
                line = "not run | - | -"
            print(f"| {m} | {kind} | {t_ours:.2f} |{columns} {line} |", flush=True)


if __name__ == "__main__":
    main()
