"""The committed generated code matches protos/, contracts only grow, and what is public is
documented."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import protogen  # noqa: E402


def test_generated_code_is_current() -> None:
    assert protogen.stale_files() == [], "generated/ is stale: run `make gen`"


def test_protos_do_not_break_the_committed_contract() -> None:
    assert protogen.breaking_changes() == ""


@pytest.mark.parametrize(("old", "new"), [
    ("int64 amount = 2;", "int64 amount = 7;"),  # renumbered field
    ("int64 balance = 2;", "string balance = 2;"),  # changed type
    ("  rpc Withdraw(", "  rpc Take("),  # renamed method
])
def test_the_breaking_check_catches_a_breaking_change(tmp_path: Path, old: str, new: str) -> None:
    protos = tmp_path / "protos"
    shutil.copytree(protogen.PROTOS, protos)
    account = protos / "upw/account/v1/account.proto"
    text = account.read_text()
    assert old in text
    account.write_text(text.replace(old, new, 1))
    assert protogen.breaking_changes(protos) != ""


def test_every_setting_is_documented() -> None:
    config = (ROOT / "conventions/config.py").read_text()
    readme = (ROOT / "README.md").read_text()
    variables = set(re.findall(r'"(UPW_[A-Z_]+)"', config))
    assert variables, "no UPW_* variables found"
    assert sorted(v for v in variables if v not in readme) == []


def test_every_rpc_is_documented() -> None:
    undocumented = []
    for proto in protogen.PROTOS.rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            if line.strip().startswith("rpc ") and not lines[number - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}: {line.strip()}")
    assert undocumented == []
