"""Plugin archives: packed here, materialized there, byte for byte or not at all."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from services.cluster.archives import ArchiveError, materialize, pack, tree_digest


def plugin(folder: Path, text: str = "x = 1\n") -> Path:
    (folder / "pkg").mkdir(parents=True)
    (folder / "run.py").write_text(text)
    (folder / "pkg" / "data.txt").write_text("data")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "run.cpython-311.pyc").write_bytes(b"junk")
    return folder


def test_an_archive_materializes_the_same_tree(tmp_path: Path) -> None:
    source = plugin(tmp_path / "a" / "demo")
    digest, data = pack(source, limit=1 << 20)
    assert digest == tree_digest(source)
    target_dir = tmp_path / "b"
    target_dir.mkdir()
    out = materialize("demo", digest, data, target_dir)
    assert out == target_dir / "demo"
    assert (out / "run.py").read_text() == "x = 1\n"
    assert (out / "pkg" / "data.txt").read_text() == "data"
    assert not (out / "__pycache__").exists()
    assert tree_digest(out) == digest
    # replacing an older version swaps it in whole, and leaves no staging behind
    newer = plugin(tmp_path / "c" / "demo", "x = 2\n")
    digest2, data2 = pack(newer, limit=1 << 20)
    materialize("demo", digest2, data2, target_dir)
    assert (out / "run.py").read_text() == "x = 2\n"
    assert sorted(p.name for p in target_dir.iterdir()) == ["demo"]


def test_a_tampered_archive_changes_nothing(tmp_path: Path) -> None:
    source = plugin(tmp_path / "a" / "demo")
    digest, _ = pack(source, limit=1 << 20)
    target_dir = tmp_path / "b"
    (target_dir / "demo").mkdir(parents=True)
    (target_dir / "demo" / "run.py").write_text("old = True\n")
    _, other = pack(plugin(tmp_path / "c" / "demo", "evil = 1\n"), limit=1 << 20)
    with pytest.raises(ArchiveError, match="hashes to"):
        materialize("demo", digest, other, target_dir)
    assert (target_dir / "demo" / "run.py").read_text() == "old = True\n"
    with pytest.raises(ArchiveError, match="unreadable"):
        materialize("demo", digest, b"not a tar file at all" * 30, target_dir)
    assert sorted(p.name for p in target_dir.iterdir()) == ["demo"]


@pytest.mark.parametrize("member", ["../escape.py", "/etc/passwd", "link"])
def test_unsafe_members_are_refused(tmp_path: Path, member: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(member)
        if member == "link":
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ArchiveError, match="unsafe archive member"):
        materialize("demo", "0" * 64, buf.getvalue(), tmp_path)
    assert not (tmp_path / "demo").exists() and not (tmp_path.parent / "escape.py").exists()


def test_bad_names_and_oversized_plugins_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="invalid plugin name"):
        materialize("../x", "0", b"", tmp_path)
    big = tmp_path / "big"
    big.mkdir()
    (big / "run.py").write_bytes(b"#" * 5000)
    with pytest.raises(ArchiveError, match="larger than"):
        pack(big, limit=1000)
