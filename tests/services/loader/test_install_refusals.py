"""Installs are refused cleanly (422 naming the member) or done completely (rolled back).

Real archives written with zipfile/tarfile, real folders with links, a real kernel for
the API cases.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import anyio
import pytest

from services.loader import installer

from .conftest import AUTH, status_router, write_plugin

LIMITS = installer.Limits(max_bytes=100_000, max_files=50)
RUN = b"PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/arch'}\n"


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def bad_crc_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("arch/run.py", RUN)
        zf.writestr("arch/data.txt", b"A" * 100)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"A" * 100)
    raw[at] = ord("B")  # the content no longer matches its CRC
    path.write_bytes(bytes(raw))
    return path


def undecodable_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arch/run.py", RUN)
        zf.writestr("arch/caf\u00e9.txt", b"x")
    raw = bytearray(path.read_bytes())
    # 'é' is two UTF-8 bytes (flag 0x800 set): make them an invalid sequence, both copies
    raw = bytearray(bytes(raw).replace("é".encode(), b"\xff\xfe"))
    path.write_bytes(bytes(raw))
    return path


def undecodable_tar(path: Path) -> Path:
    with tarfile.open(
        path, "w:gz", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for name, data in (("arch/run.py", RUN), (os.fsdecode(b"arch/bad\xff.txt"), b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def tar_with(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            tf.addfile(info, io.BytesIO(data.get(info.name, b"")) if info.isfile() else None)
    return path


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (bad_crc_zip, "member 'arch/data.txt' cannot be extracted: BadZipFile: Bad CRC-32"),
        (undecodable_zip, "the name is not valid UTF-8"),
        (undecodable_tar, r"member 'arch/bad\xff.txt': the name is not valid UTF-8"),
    ],
)
def test_unreadable_members_are_named(tmp_path: Path, plugins: Path, make, fragment) -> None:
    archive = make(tmp_path / ("a.zip" if "zip" in make.__name__ else "a.tar.gz"))
    with pytest.raises(installer.InstallError) as err:
        installer.stage(archive, plugins, LIMITS)
    assert fragment in str(err.value)
    assert listing(plugins) == []


def test_tar_limits_apply_member_by_member(tmp_path: Path, plugins: Path) -> None:
    # a huge member (declared size) is refused from its header: nothing is decompressed
    big = tarfile.TarInfo("arch/big.bin")
    big.size = 50 * 1024 * 1024
    run = tarfile.TarInfo("arch/run.py")
    run.size = len(RUN)
    archive = tmp_path / "big.tar"
    with tarfile.open(archive, "w") as tf:
        tf.addfile(run, io.BytesIO(RUN))
        tf.addfile(big, io.BytesIO(b"\0" * big.size))
    with pytest.raises(installer.InstallError, match="unpacks to more than 100000 bytes"):
        installer.stage(archive, plugins, LIMITS)
    # too many members: refused at the first one over the limit
    many = [run] + [tarfile.TarInfo(f"arch/e{i}") for i in range(500)]
    archive = tar_with(tmp_path / "many.tar.gz", many, {"arch/run.py": RUN})
    with pytest.raises(installer.InstallError, match="more than 50 members"):
        installer.stage(archive, plugins, LIMITS)
    assert listing(plugins) == []


@pytest.mark.parametrize(
    "link",
    [("up", ".."), ("chain", "up/up/up"), ("etc_link", "/etc"), ("inside", "run.py")],
)
def test_every_link_in_a_folder_is_refused(tmp_path: Path, plugins: Path, link) -> None:
    src = write_plugin(tmp_path / "src", "linky")
    if link[0] == "chain":
        os.symlink("..", src / "up")
    os.symlink(link[1], src / link[0])
    with pytest.raises(installer.InstallError, match="is a symbolic link"):
        installer.stage(src, plugins, LIMITS)
    with pytest.raises(installer.ManifestError, match="is a symbolic link"):
        installer.validate_folder(src, "linky", LIMITS)
    assert listing(plugins) == []


async def test_api_refuses_a_bad_crc_with_422(harness_factory, plugins: Path, tmp_path) -> None:
    h = await harness_factory()
    archive = bad_crc_zip(tmp_path / "arch.zip")
    with anyio.fail_after(20):
        r = await h.client.post(
            "/admin/plugins", headers=AUTH, files={"file": ("arch.zip", archive.read_bytes())}
        )
    assert r.status_code == 422
    assert "member 'arch/data.txt'" in r.json()["detail"] and "CRC" in r.json()["detail"]
    assert await h.events("SubscriberFailed") == []
    assert not (plugins / "arch").exists()


def _zip_folder(folder: Path, path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                zf.write(f, f"{folder.name}/{f.relative_to(folder).as_posix()}")
    return path.read_bytes()


async def test_a_replacement_that_fails_changes_nothing(
    harness_factory, plugins: Path, tmp_path: Path
) -> None:
    write_plugin(plugins, "keep", router=status_router('{"v": "old"}'))
    h = await harness_factory()
    before = {p: p.read_bytes() for p in (plugins / "keep").rglob("*") if p.is_file()}
    new = write_plugin(
        tmp_path / "src",
        "keep",
        info={"version": "2.0.0", "api_prefix": "/app/keep"},
        router="raise RuntimeError('the new version is broken')\n",
    )
    data = _zip_folder(new, tmp_path / "keep.zip")
    with anyio.fail_after(20):
        r = await h.client.post(
            "/admin/plugins",
            headers=AUTH,
            files={"file": ("keep.zip", data)},
            data={"replace": "true"},
        )
    assert r.status_code == 422
    body = r.json()
    assert body["outcome"] == "PluginInstallFailed" and body["stage"] == "import"
    assert "the new version is broken" in body["error"] and "install undone" in body["error"]
    # the old files are back, the old generation serves, and a restart serves it too
    after = {p: p.read_bytes() for p in (plugins / "keep").rglob("*") if p.is_file()}
    assert after == before
    assert (await h.client.get("/app/keep/status")).json() == {"v": "old"}
    assert await h.events("PluginInstalled") == []
    await h.restart()
    assert (await h.client.get("/app/keep/status")).json() == {"v": "old"}
    assert not (plugins / installer.STAGING).exists()


async def test_a_fresh_install_that_fails_leaves_nothing(
    harness_factory, plugins: Path, tmp_path: Path
) -> None:
    h = await harness_factory()
    new = write_plugin(tmp_path / "src", "broken", run="raise ImportError('nope')\n")
    data = _zip_folder(new, tmp_path / "broken.zip")
    with anyio.fail_after(20):
        r = await h.client.post("/admin/plugins", headers=AUTH, files={"file": ("b.zip", data)})
    assert r.status_code == 422 and r.json()["stage"] == "import"
    assert not (plugins / "broken").exists()
    listed = (await h.client.get("/admin/plugins", headers=AUTH)).json()
    assert all(not (p["name"] == "broken" and p["installed"]) for p in listed)


async def test_already_installed_names_replace(harness_factory, plugins: Path, tmp_path) -> None:
    write_plugin(plugins, "twice", router=status_router())
    h = await harness_factory()
    data = _zip_folder(write_plugin(tmp_path / "src", "twice"), tmp_path / "twice.zip")
    r = await h.client.post("/admin/plugins", headers=AUTH, files={"file": ("t.zip", data)})
    assert r.status_code == 422 and "--replace" in r.json()["detail"]
