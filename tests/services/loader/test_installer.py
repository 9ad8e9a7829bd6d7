"""Installing from folders and archives: everything is checked before anything is copied."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from services.loader import installer
from services.loader.manifest import ManifestError

from .conftest import status_router, write_plugin

LIMITS = installer.Limits(max_bytes=100_000, max_files=50)
RUN = b"PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/arch'}\n"


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def make_zip(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, target)
    return path


def make_tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return path


@pytest.fixture
def plugins(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    write_plugin(folder, "existing", router=status_router())
    return folder


@pytest.mark.parametrize("maker", [make_zip, make_tar])
def test_archive_installs_from_a_top_folder(tmp_path: Path, plugins: Path, maker) -> None:
    suffix = ".zip" if maker is make_zip else ".tar.gz"
    archive = maker(
        tmp_path / f"whatever{suffix}",
        {"arch/__init__.py": b"", "arch/run.py": RUN, "arch/util/__init__.py": b"X = 1\n"},
    )
    staged = installer.stage(archive, plugins, LIMITS)
    assert staged.name == "arch"
    assert installer.commit(staged, plugins, replace=False) is None  # nothing replaced
    installer.discard(staged)
    target = plugins / "arch"
    assert listing(target) == ["__init__.py", "run.py", "util", "util/__init__.py"]
    assert listing(plugins) == listing(plugins)  # staging area gone:
    assert not (plugins / installer.STAGING).exists()


def test_archive_without_top_folder_takes_its_stem(tmp_path: Path, plugins: Path) -> None:
    archive = make_zip(tmp_path / "flat.zip", {"run.py": RUN.replace(b"arch", b"flat")})
    staged = installer.stage(archive, plugins, LIMITS)
    assert staged.name == "flat"
    installer.discard(staged)


@pytest.mark.parametrize(
    ("members", "links", "fragment"),
    [
        ({"../evil/run.py": RUN}, None, "contains '..'"),
        ({"/etc/run.py": RUN}, None, "absolute path"),
        ({"arch/run.py": RUN}, {"arch/secret": "../../etc/passwd"}, "links are refused"),
        ({"arch/run.py": RUN}, {"arch/abs": "/etc/passwd"}, "links are refused"),
        ({"arch/run.py": RUN, "arch/big.bin": b"x" * 200_000}, None, "more than 100000 bytes"),
        ({"arch/run.py": RUN, "arch/bad.py": b"def broken(:\n"}, None, "bad.py: line 1"),
        ({"arch/run.py": b"PLUGIN_INFO = {'version': 'one'}\n"}, None, "not a semantic version"),
        ({"arch/run.py": RUN, "arch/config.yaml": b"a: [1\n"}, None, "not valid YAML"),
    ],
)
@pytest.mark.parametrize("maker", [make_zip, make_tar])
def test_bad_archives_change_nothing(
    tmp_path: Path, plugins: Path, maker, members, links, fragment
) -> None:
    before = listing(plugins)
    archive = maker(tmp_path / ("a.zip" if maker is make_zip else "a.tar.gz"), members, links)
    with pytest.raises((installer.InstallError, ManifestError)) as err:
        installer.stage(archive, plugins, LIMITS)
    assert fragment in str(err.value)
    assert listing(plugins) == before


def test_too_many_files(tmp_path: Path, plugins: Path) -> None:
    members = {"arch/run.py": RUN, **{f"arch/f{i}.txt": b"" for i in range(60)}}
    with pytest.raises(installer.InstallError, match="more than 50 members"):
        installer.stage(make_zip(tmp_path / "a.zip", members), plugins, LIMITS)


def test_not_an_archive(tmp_path: Path, plugins: Path) -> None:
    bogus = tmp_path / "x.zip"
    bogus.write_bytes(b"not a zip")
    with pytest.raises(installer.InstallError, match="not a readable zip"):
        installer.stage(bogus, plugins, LIMITS)
    other = tmp_path / "x.rar"
    other.write_bytes(b"")
    with pytest.raises(installer.InstallError, match="not a folder nor an archive"):
        installer.stage(other, plugins, LIMITS)


def test_folder_with_link_outside_is_refused(tmp_path: Path, plugins: Path) -> None:
    src = write_plugin(tmp_path / "src", "linky")
    os.symlink("/etc/passwd", src / "passwd")
    with pytest.raises(installer.InstallError, match="is a symbolic link"):
        installer.stage(src, plugins, LIMITS)
    assert not (plugins / "linky").exists()


def test_existing_plugin_needs_replace(tmp_path: Path, plugins: Path) -> None:
    src = write_plugin(tmp_path / "src", "existing", info={"version": "2.0.0"})
    staged = installer.stage(src, plugins, LIMITS)
    with pytest.raises(installer.InstallError, match="already installed"):
        installer.commit(staged, plugins, replace=False)
    installer.discard(staged)
    assert "2.0.0" not in (plugins / "existing" / "run.py").read_text()
    staged = installer.stage(src, plugins, LIMITS)
    old = installer.commit(staged, plugins, replace=True)
    assert old is not None and "2.0.0" not in (old / "run.py").read_text()  # kept aside
    installer.discard(staged)
    assert "2.0.0" in (plugins / "existing" / "run.py").read_text()
    assert listing(plugins / "existing") == ["__init__.py", "run.py"]


def test_digest_follows_content(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path, "d")
    first = installer.digest(folder)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "run.cpython-311.pyc").write_bytes(b"junk")
    assert installer.digest(folder) == first
    (folder / "run.py").write_text((folder / "run.py").read_text() + "# edit\n")
    assert installer.digest(folder) != first


def test_validating_a_plugin_leaves_no_pacing_hook_on_its_pooled_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An install stages and validates its plugin in a pooled executor thread: its long
    files, parsed in pieces during another plugin's build window, put pacing's fine-yield
    hook on that thread (kernel/pacing.py), which must not stay for the pool's next job."""
    import asyncio
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from kernel import pacing
    from services.loader.installer import validate_folder
    from services.loader.source import PIECE_LINES

    long_router = "".join(f"x{i} = {i}\n" for i in range(4 * PIECE_LINES))
    folder = write_plugin(tmp_path / "plugins", "long", files={"helpers.py": long_router})
    loop = asyncio.new_event_loop()
    seen: dict[str, object] = {}
    try:
        assert pacing.watch_loop(loop)
        watch = pacing._watch
        assert watch is not None
        watch.asleep = True
        monkeypatch.setattr(pacing, "_loop_was_woken", lambda: True)  # (under load)
        pacing.set_share(0.99, yield_s=0.001, fine=True)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pool.submit(validate_folder, folder, "long").result(60)
            seen["profile"] = pool.submit(sys.getprofile).result(60)
    finally:
        pacing.set_share(1.0)
        pacing.unwatch_loop(loop)
        loop.close()
    assert not getattr(seen["profile"], "xcore_pacing", False)
