"""scripts/torch_cpu_source.py: setup and the image take torch's CPU build, not PyPI's CUDA one
(a fresh Debian machine resolved `torch==2.13.0` to the CUDA build and ~20 nvidia-* packages;
walkthrough review, session 17)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "torch_cpu_source.py"


def _module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("torch_cpu_source", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(*names: str) -> dict:
    return {"install": [{"metadata": {"name": n, "version": "1"}} for n in names]}


def test_cuda_packages_in_a_resolution_are_named() -> None:
    cuda_packages = _module().cuda_packages
    pypi = _report("torch", "nvidia-cublas", "triton", "cuda-toolkit", "sympy", "filelock")
    assert cuda_packages(pypi) == ["cuda-toolkit", "nvidia-cublas", "triton"]
    assert cuda_packages(_report("torch", "sympy", "networkx")) == []
    assert cuda_packages({}) == []


def test_the_script_answers_with_pip_options_or_nothing() -> None:
    """Where pip's sources carry the CPU build (a local wheelhouse, as on the project's
    machines) nothing is added; elsewhere the CPU index, as two pip arguments."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "2.13.0"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout in ("", f"--extra-index-url\n{_module().CPU_INDEX}\n"), done.stdout


def test_the_cpu_index_is_added_exactly_when_pip_would_take_the_cuda_build(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _module()

    def resolving_to(*names: str) -> Callable[..., subprocess.CompletedProcess[str]]:
        def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
            report = Path(cmd[cmd.index("--report") + 1])
            report.write_text(json.dumps(_report(*names)))
            return subprocess.CompletedProcess(cmd, 0, "", "")

        return run

    monkeypatch.setattr(sys, "argv", ["torch_cpu_source.py", "2.13.0"])
    monkeypatch.setattr(module.subprocess, "run", resolving_to("torch", "nvidia-cudnn-cu13"))
    assert module.main() == 0
    assert capsys.readouterr().out == f"--extra-index-url\n{module.CPU_INDEX}\n"
    monkeypatch.setattr(module.subprocess, "run", resolving_to("torch", "sympy"))
    assert module.main() == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(
        module.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2, "", "no")
    )
    assert module.main() == 1
    assert "pip could not say which torch==2.13.0" in capsys.readouterr().err
