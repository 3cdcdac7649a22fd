"""Print the pip options that make `pip install torch==VERSION` take the CPU build.

PyPI's Linux torch wheel is the CUDA build, which pulls several GB of nvidia-* and triton
packages; PyTorch's own index has the CPU build (`+cpu`, which pip prefers over the same
version without a label). Where pip's configured sources already resolve torch to a build
without CUDA packages (a local wheelhouse, or a platform without CUDA builds), nothing is added.
Run with the interpreter whose pip will install: `python scripts/torch_cpu_source.py 2.13.0`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CUDA_PREFIXES = ("nvidia", "triton", "cuda")


def cuda_packages(report: dict) -> list[str]:
    """Names of the CUDA packages a `pip install --report` would install."""
    names = [str(item.get("metadata", {}).get("name", "")) for item in report.get("install", [])]
    return sorted(n for n in names if n.lower().startswith(CUDA_PREFIXES))


def main() -> int:
    version = sys.argv[1] if len(sys.argv) > 1 else "2.13.0"
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        resolved = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--report",
                str(report_path),
                f"torch=={version}",
            ],
            capture_output=True,
            text=True,
        )
        if resolved.returncode != 0:
            print(resolved.stderr, file=sys.stderr)
            print(
                f"torch_cpu_source: pip could not say which torch=={version} it would install "
                "(its error is above; `pip install --dry-run --report` needs pip 22.2 or newer)",
                file=sys.stderr,
            )
            return 1
        cuda = cuda_packages(json.loads(report_path.read_text()))
    if cuda:
        print(
            f"torch_cpu_source: pip's sources give the CUDA build of torch {version} "
            f"({', '.join(cuda[:3])}, ...): taking the CPU build from {CPU_INDEX}",
            file=sys.stderr,
        )
        print(f"--extra-index-url\n{CPU_INDEX}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
