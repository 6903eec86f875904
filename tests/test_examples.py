"""The examples run end to end in their ``--quick`` mode (a few steps each, seconds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = pytest.mark.slow


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"pjd_examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def test_partial_jd_iwrm_quick(capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    load_example("partial_jd_iwrm").main(["--quick"])
    out = capsys.readouterr().out
    assert "Part 1" in out and "Part 2" in out
    assert "conflicting pairs" in out
    rows = [line for line in out.splitlines() if line.lstrip().startswith(("0 |", "1 |"))]
    assert len(rows) == 2, out  # epoch 0 (the initial model) and epoch 1
    assert torch.get_num_threads() == threads  # --threads is restored


def test_timm_finetune_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("matplotlib")
    out_file = tmp_path / "figures" / "timm_finetune_quick.png"  # the folder is created
    load_example("timm_finetune").main(["--quick", "--out", str(out_file.parent)])
    out = capsys.readouterr().out
    assert out_file.is_file() and out_file.stat().st_size > 10_000
    assert out_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "partial JD" in out and "conflict" in out
    assert any(line.lstrip().startswith("1 |") for line in out.splitlines()), out


def test_mtl_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out_file = tmp_path / "mtl_quick.png"  # a quick run never overwrites the full run's figure
    load_example("mtl").main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in out.splitlines() if line.lstrip().startswith(("1 |", "2 |"))]
    assert len(rows) == 2, out
    assert "conflict" in out


def test_hf_trainer_runs(capsys: pytest.CaptureFixture[str]) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    if not transformers.utils.is_torch_available():  # (transformers 5 needs torch >= 2.6)
        pytest.skip("this transformers does not run with this torch")
    load_example("hf_trainer").main(["--steps", "4", "--objectives", "token"])
    out = capsys.readouterr().out
    assert "final training loss" in out and "objectives" in out
