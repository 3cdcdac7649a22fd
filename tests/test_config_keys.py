"""TOML config keys: one setting spelled two ways (`tls_dir` and `[tls] dir`, `local_steps` and
`local-steps`) is refused, naming both, instead of the later one silently winning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pluralfed.config import load_config
from pluralfed.errors import InputError


@dataclass
class Settings:
    tls_dir: Path | None = None
    tls_ca: Path | None = None
    local_steps: int = 6


def _load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "c.toml"
    path.write_text(text, "utf-8")
    return load_config(Settings, path, "X_", {}, environ={})


@pytest.mark.parametrize(
    ("text", "first", "second", "name"),
    [
        ('tls_dir = "/a"\n[tls]\ndir = "/b"\n', "tls_dir", "[tls] dir", "tls_dir"),
        ('tls.dir = "/b"\ntls_dir = "/a"\n', "[tls] dir", "tls_dir", "tls_dir"),
        ("local_steps = 6\nlocal-steps = 60\n", "local_steps", "local-steps", "local_steps"),
        ('tls-dir = "/a"\n[tls]\ndir = "/b"\n', "tls-dir", "[tls] dir", "tls_dir"),
    ],
)
def test_two_spellings_of_one_key_are_refused(
    tmp_path: Path, text: str, first: str, second: str, name: str
) -> None:
    with pytest.raises(InputError) as err:
        _load(tmp_path, text)
    assert str(err.value) == (
        f"{tmp_path / 'c.toml'}: {first!r} and {second!r} both set {name}; keep one"
    )


def test_tables_and_hyphens_still_load(tmp_path: Path) -> None:
    cfg = _load(tmp_path, 'local-steps = 3\n[tls]\ndir = "/d"\nca = "/d/ca.pem"\n')
    assert cfg == Settings(tls_dir=Path("/d"), tls_ca=Path("/d/ca.pem"), local_steps=3)
