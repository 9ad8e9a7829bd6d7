"""Hostile trees and archives: bounded before they are read, refused naming the culprit.

Real archives written byte by byte (tarfile's own headers, gzip), real folders nested
deeper than the interpreter's recursion limit, a real kernel for the boot and API cases.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import anyio
import pytest

from services.loader import installer
from services.loader.files import MAX_DEPTH, regular_files

from .conftest import AUTH, status_router, write_plugin

LIMITS = installer.Limits(max_bytes=100_000, max_files=50)
RUN = b"PLUGIN_INFO = {'version': '1.0.0', 'api_prefix': '/app/arch'}\n"


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def header_bomb(path: Path, kind: bytes, size: int) -> Path:
    """A .tar.gz whose first header announces ``size`` bytes of long name or pax records."""
    with gzip.open(path, "wb", compresslevel=1) as out:
        fmt = tarfile.GNU_FORMAT if kind == tarfile.GNUTYPE_LONGNAME else tarfile.PAX_FORMAT
        head = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "pax")
        head.type, head.size = kind, size
        out.write(head.tobuf(format=tarfile.USTAR_FORMAT if fmt == tarfile.PAX_FORMAT else fmt))
        body = b"%d comment=" % size if kind == tarfile.XHDTYPE else b""
        out.write(body)
        left, block = size - len(body) - 1, b"a" * (1 << 20)
        while left > 0:
            out.write(block[: min(left, len(block))])
            left -= len(block)
        out.write(b"\n" + b"\0" * (-size % 512))
        run = tarfile.TarInfo("arch/run.py")
        run.size = len(RUN)
        out.write(run.tobuf(format=tarfile.USTAR_FORMAT) + RUN + b"\0" * (-len(RUN) % 512))
        out.write(b"\0" * 1024)
    return path


@pytest.mark.parametrize(
    ("kind", "what"), [(tarfile.GNUTYPE_LONGNAME, "GNU long-name"), (tarfile.XHDTYPE, "pax")]
)
def test_tar_extension_headers_are_bounded_before_they_are_read(
    tmp_path: Path, plugins: Path, kind: bytes, what: str
) -> None:
    # 48 MiB announced by one 512-byte header (a few hundred KiB compressed): tarfile
    # would read it whole into memory (a 300 MiB pax header took 5.6 GB of RSS)
    size = 48 << 20
    archive = header_bomb(tmp_path / "bomb.tar.gz", kind, size)
    with pytest.raises(installer.InstallError) as err:
        installer.stage(archive, plugins, LIMITS)
    message = str(err.value)
    assert f"a {what} header of {size} bytes, more than the limit of 65536" in message
    assert len(message) < 500
    assert listing(plugins) == []


def test_tar_sparse_members_and_header_chains_are_refused(tmp_path: Path, plugins: Path) -> None:
    archive = tmp_path / "sparse.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("arch/run.py")
        info.type, info.size = tarfile.GNUTYPE_SPARSE, len(RUN)
        tf.addfile(info, io.BytesIO(RUN))
    with pytest.raises(installer.InstallError, match="'arch/run.py' is a sparse file"):
        installer.stage(archive, plugins, LIMITS)
    chain = tmp_path / "chain.tar"
    with chain.open("wb") as out:
        for _ in range(50):  # fifty long names, each for the next header
            head = tarfile.TarInfo("././@LongLink")
            head.type, head.size = tarfile.GNUTYPE_LONGNAME, 8
            out.write(head.tobuf(format=tarfile.GNU_FORMAT) + b"arch/x\0\0" + b"\0" * 504)
        run = tarfile.TarInfo("arch/run.py")
        run.size = len(RUN)
        out.write(run.tobuf(format=tarfile.GNU_FORMAT) + RUN + b"\0" * (-len(RUN) % 512))
        out.write(b"\0" * 1024)
    with pytest.raises(installer.InstallError, match="more than 8 extension headers in a row"):
        installer.stage(chain, plugins, LIMITS)
    assert listing(plugins) == []


@pytest.mark.parametrize("maker", ["zip", "tar"])
def test_archive_members_nested_too_deep_or_named_too_long(
    tmp_path: Path, plugins: Path, maker: str
) -> None:
    import zipfile

    deep = "arch/" + "a/" * (MAX_DEPTH + 1) + "f.txt"
    long = "arch/" + "b" * 2000 + ".txt"
    for name, fragment in (
        (deep, f"is nested more than {MAX_DEPTH} folders deep"),
        (long, "a name of 2009 characters, more than the limit of 1024"),
    ):
        archive = tmp_path / ("a.zip" if maker == "zip" else "a.tar.gz")
        if maker == "zip":
            with zipfile.ZipFile(archive, "w") as zf:
                zf.writestr("arch/run.py", RUN)
                zf.writestr(name, b"x")
        else:
            with tarfile.open(archive, "w:gz", format=tarfile.GNU_FORMAT) as tf:
                for member, data in (("arch/run.py", RUN), (name, b"x")):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        with pytest.raises(installer.InstallError) as err:
            installer.stage(archive, plugins, LIMITS)
        assert fragment in str(err.value) and len(str(err.value)) < 600
        assert listing(plugins) == []


def deep_folder(root: Path, depth: int) -> None:
    """``root/a/a/.../a`` (``depth`` levels) with a file at the bottom, made by descriptors."""
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("a", dir_fd=fd)
            nfd = os.open("a", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def flatten(root: Path) -> None:
    """Remove what :func:`deep_folder` made without recursion (pytest's cleanup recurses)."""
    top = root / "a"
    while top.is_dir():
        inner = top / "a"
        if inner.is_dir():
            os.rename(inner, root / "a.tmp")
        for entry in top.iterdir():
            entry.unlink()
        top.rmdir()
        if (root / "a.tmp").exists():
            os.rename(root / "a.tmp", top)


#: Deeper than the interpreter's default recursion limit (os.walk recursed in 3.11).
DEPTH = 1_100


def test_a_folder_deeper_than_the_recursion_limit_is_walked_and_refused(
    tmp_path: Path, plugins: Path
) -> None:
    src = write_plugin(tmp_path / "src", "deep")
    deep_folder(src, DEPTH)
    try:
        files, others = regular_files(src)
        assert sorted(p.name for p in files) == ["__init__.py", "run.py"]
        assert others == [src.joinpath(*["a"] * (MAX_DEPTH + 1))]
        assert installer.digest(src)  # the digest counts the deep folder by its name
        with pytest.raises(installer.InstallError, match=f"more than {MAX_DEPTH} folders deep"):
            installer.stage(src, plugins, LIMITS)
        assert listing(plugins) == []
    finally:
        flatten(src)


async def test_a_plugin_with_a_deep_data_folder_loads(harness_factory, plugins: Path) -> None:
    folder = write_plugin(plugins, "deepdata", router=status_router())
    deep_folder(folder, DEPTH)
    try:
        with anyio.fail_after(60):
            h = await harness_factory()
        assert await h.events("PluginLoadFailed") == []
        assert (await h.client.get("/app/deepdata/status")).status_code == 200
        with anyio.fail_after(30):
            r = await h.client.post("/admin/plugins/deepdata/reload", headers=AUTH)
        assert r.status_code == 200, r.text
        # uninstalling deletes all of it (shutil.rmtree raised RecursionError halfway,
        # after the plugin was unloaded: the uninstall was reported failed)
        with anyio.fail_after(30):
            r = await h.client.delete("/admin/plugins/deepdata", headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["outcome"] == "PluginUninstalled"
        assert listing(plugins) == []
    finally:
        flatten(folder)


BOOT_WITH_RAISED_LIMIT = """
import asyncio, json, sys
from pathlib import Path
from tests.services.loader.conftest import Harness

async def main():
    # hypothesis, a debugger or the host application may raise the limit
    sys.setrecursionlimit(1_000_000)
    h = Harness(Path(sys.argv[1]), Path(sys.argv[2]))
    await h.start()
    failed = {r.data["name"]: r.data["error"] for r in await h.events("PluginLoadFailed")}
    await h.stop()
    print(json.dumps(failed))

asyncio.run(main())
"""


def test_imports_cannot_recurse_past_the_loaders_bounds(tmp_path: Path, plugins: Path) -> None:
    """Neither one import of a long dotted name nor a long chain of modules importing one
    another can make the import system recurse until the process crashes (both did,
    with a segmentation fault, once the recursion limit was raised)."""
    import json
    import subprocess
    import sys

    dotted = "from ." + ".".join(["a"] * 20_000) + " import x\n"
    write_plugin(plugins, "dotted", run=dotted)
    write_plugin(plugins, "helperdot", run="from . import helper\n", files={"helper.py": dotted})
    chain = write_plugin(plugins, "chain", run="from . import m0\n")
    for i in range(3_000):
        (chain / f"m{i}.py").write_text(f"from . import m{i + 1}\n")
    (chain / "m3000.py").write_text("X = 1\n")
    write_plugin(plugins, "good", router=status_router())
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", BOOT_WITH_RAISED_LIMIT, str(tmp_path), str(plugins)],
        cwd=root,
        capture_output=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, (done.returncode, done.stderr.decode(errors="replace")[-2000:])
    failed = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert set(failed) == {"dotted", "helperdot", "chain"}
    parts = "imports a module name of 20000 dotted parts, more than the loader's limit of 64"
    assert f"run.py: line 2: {parts}" in failed["dotted"]
    assert f"line 1: {parts}" in failed["helperdot"]
    assert "import one another more than 100 levels deep" in failed["chain"]


def test_zip_members_are_counted_before_zipfile_reads_them(tmp_path: Path, plugins: Path) -> None:
    import struct
    import zipfile

    archive = tmp_path / "many.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("arch/run.py", RUN)
        for i in range(20_000):
            zf.writestr(f"arch/{i}", b"")
    # the end record claims one member: only the directory itself tells the truth
    raw = bytearray(archive.read_bytes())
    end = raw.rfind(b"PK\x05\x06")
    raw[end + 8 : end + 12] = struct.pack("<HH", 1, 1)
    archive.write_bytes(bytes(raw))
    with pytest.raises(installer.InstallError) as err:
        installer.stage(archive, plugins, LIMITS)
    assert str(err.value).endswith("more than 50 members (the limit)")
    assert listing(plugins) == []


def laughs(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


async def test_config_aliases_cannot_stand_for_billions_of_values(
    harness_factory, plugins: Path
) -> None:
    # 452 bytes standing for 10^9 values: a sandboxed plugin's config crossed the wire to
    # its worker expanded (540 MB of server RSS at 10^8, the worker killed)
    write_plugin(plugins, "laughs", router=status_router(), config=laughs(9))
    # a large config written out (no alias) is not refused
    big = "table:\n" + "".join(f"  k{i}: {i}\n" for i in range(5_000))
    write_plugin(plugins, "big", router=status_router(), config=big)
    # nested without brackets or indentation (read whole under a raised recursion limit)
    write_plugin(plugins, "dashes", config="k:\n" + "- " * 500 + "x\n")
    with anyio.fail_after(60):
        h = await harness_factory()
    failed = {r.data["name"]: r.data for r in await h.events("PluginLoadFailed")}
    assert set(failed) == {"laughs", "dashes"}
    assert "nested more than 100 levels deep" in failed["dashes"]["error"]
    assert failed["laughs"]["stage"] == "config" and failed["laughs"]["file"] == "config.yaml"
    assert "expands to more than 1000000 values" in failed["laughs"]["error"]
    assert (await h.client.get("/app/big/status")).status_code == 200
    with pytest.raises(installer.ManifestError, match="YAML anchors and aliases"):
        installer.validate_folder(plugins / "laughs", "laughs", LIMITS)


async def test_a_special_router_or_config_module_is_refused_not_skipped(
    harness_factory, plugins: Path
) -> None:
    # a FIFO router.py made the plugin load without routes, and nothing said why
    os.mkfifo(write_plugin(plugins, "fiforouter") / "router.py")
    os.symlink("/dev/null", write_plugin(plugins, "linkconfig") / "config.py")
    write_plugin(plugins, "good", router=status_router())
    with anyio.fail_after(60):
        h = await harness_factory()
    failed = {r.data["name"]: r.data for r in await h.events("PluginLoadFailed")}
    assert set(failed) == {"fiforouter", "linkconfig"}
    assert failed["fiforouter"]["stage"] == "import"
    assert "router.py is a FIFO; only regular files are read" in failed["fiforouter"]["error"]
    assert failed["fiforouter"]["file"] == "router.py"
    assert "config.py is a symbolic link" in failed["linkconfig"]["error"]
    assert (await h.client.get("/app/good/status")).status_code == 200


async def test_plugin_modules_behind_links_or_special_files_are_refused(
    harness_factory, plugins: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "__init__.py").write_text("X = 'from outside the plugin'\n")
    # a folder link leaving the plugin: its code loaded, unseen by the watcher and digest
    os.symlink(outside, write_plugin(plugins, "linked", run="from .shared import X\n") / "shared")
    os.mkfifo(write_plugin(plugins, "piped", run="from . import helper\n") / "helper.py")
    with anyio.fail_after(60):
        h = await harness_factory()
    failed = {r.data["name"]: r.data for r in await h.events("PluginLoadFailed")}
    assert set(failed) == {"linked", "piped"}
    assert "shared is a symbolic link" in failed["linked"]["error"]
    assert "helper.py is a FIFO; only regular files are read" in failed["piped"]["error"]
    assert failed["piped"]["file"] == "run.py" and failed["piped"]["line"] == 2


def test_a_hard_link_in_a_folder_install_is_refused(tmp_path: Path, plugins: Path) -> None:
    # docs/plugins.md promises no links at all, hard ones included, in folders too: the
    # copy took the linked file's content (a file of whoever runs the install)
    secret = tmp_path / "secret.txt"
    secret.write_text("not the plugin's\n")
    src = write_plugin(tmp_path / "src", "hard")
    os.link(secret, src / "copy.txt")
    with pytest.raises(installer.InstallError, match="'copy.txt' is a hard link"):
        installer.stage(src, plugins, LIMITS)
    with pytest.raises(installer.ManifestError, match="'copy.txt' is a hard link"):
        installer.validate_folder(src, "hard", LIMITS)
    assert listing(plugins) == []


def test_an_archive_of_dot_installs(tmp_path: Path, plugins: Path) -> None:
    # `tar -C plugin -czf dotted.tgz .` starts with the member './' (tarfile: '.'); it
    # was refused as "member '.' has no usable path"
    archive = tmp_path / "dotted.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        root = tarfile.TarInfo("./")
        root.type = tarfile.DIRTYPE
        tf.addfile(root)
        for name, data in (("./run.py", RUN), ("./__init__.py", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    staged = installer.stage(archive, plugins, LIMITS)
    try:
        assert staged.name == "dotted"
        assert sorted(p.name for p in staged.folder.iterdir()) == ["__init__.py", "run.py"]
    finally:
        installer.discard(staged)


async def test_an_undecodable_file_name_does_not_end_hot_reload(
    harness_factory, plugins: Path, caplog
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="xcore.loader")
    folder = write_plugin(plugins, "watched", router=status_router('"a"'))
    h = await harness_factory(reload=True)
    with anyio.fail_after(10):
        await h.loader_service.watching.wait()
    # watchfiles raises on a path that is not UTF-8: the watch task died, silently, and
    # no plugin was reloaded again. The edit made with it is in the batch that failed:
    # it is not lost either.
    (folder / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"x")
    (folder / "router.py").write_text(status_router('"b"').replace("        ", ""))
    with anyio.fail_after(60):
        while (await h.client.get("/app/watched/status")).json() != "b":
            await anyio.sleep(0.05)
    failures = [r for r in caplog.records if "the plugins watcher failed" in r.getMessage()]
    assert failures and failures[0].levelno == logging.ERROR
    assert "caf\\xE9.txt" in failures[0].getMessage()
    # and later edits are seen too
    (folder / "router.py").write_text(status_router('"c"').replace("        ", ""))
    with anyio.fail_after(60):
        while (await h.client.get("/app/watched/status")).json() != "c":
            await anyio.sleep(0.05)


async def test_get_source_never_blocks_on_a_file_become_a_fifo(tmp_path: Path) -> None:
    from services.loader.importer import _SourceLoader

    module = tmp_path / "helper.py"
    os.mkfifo(module)  # e.g. swapped after the import; a traceback asks for the source
    with anyio.fail_after(10):
        source = await anyio.to_thread.run_sync(
            _SourceLoader(module).get_source, "x", abandon_on_cancel=True
        )
    assert source is None
