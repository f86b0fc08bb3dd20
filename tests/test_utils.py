"""Atomic writes (flipnet.utils): content, no leftovers, ordinary file permissions."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from flipnet.utils import atomic_path, atomic_torch_save, atomic_write_bytes, atomic_write_text

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


def test_atomic_writes_replace_the_file_and_leave_no_temporary(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "sub" / "a.txt", "one")
    atomic_write_text(tmp_path / "sub" / "a.txt", "two")
    atomic_write_bytes(tmp_path / "sub" / "b.bin", b"\x00\x01")
    atomic_torch_save({"x": torch.arange(3)}, tmp_path / "sub" / "c.pt")
    assert (tmp_path / "sub" / "a.txt").read_text() == "two"
    assert (tmp_path / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert torch.equal(torch.load(tmp_path / "sub" / "c.pt", weights_only=True)["x"], torch.arange(3))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["a.txt", "b.bin", "c.pt"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@posix_only
def test_new_files_get_the_umask_permissions_not_mkstemps_private_ones(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "run.yaml", "x")
        atomic_torch_save({}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run.yaml").stat().st_mode) == 0o644  # readable by others, as open() gives
    assert stat.S_IMODE((tmp_path / "last.pt").stat().st_mode) == 0o644


@posix_only
def test_overwriting_keeps_the_existing_permissions(tmp_path: Path) -> None:
    target = tmp_path / "secret.txt"
    target.write_text("a")
    target.chmod(0o600)
    atomic_write_text(target, "b")
    assert stat.S_IMODE(target.stat().st_mode) == 0o600 and target.read_text() == "b"
