"""Logging never crashes the process, whatever stdout and stderr are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import logging, sys
from kernel.logging import configure_logging, redact
configure_logging("INFO", sys.argv[1], stream=sys.stdout)
redact("s3cret-token")
log = logging.getLogger("xcore.test")
for i in range(200):
    log.info("line %d token=s3cret-token", i, extra={"plugin": "hello"})
try:
    1 / 0
except ZeroDivisionError:
    log.exception("it failed")
sys.stderr.write("done\n")
"""


def run(tmp_path: Path, fmt: str, stdout: object) -> subprocess.CompletedProcess[bytes]:
    script = tmp_path / "log_script.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), fmt], stdout=stdout, stderr=subprocess.PIPE, timeout=60
    )


def test_logging_to_a_regular_file_works(tmp_path: Path) -> None:
    out = tmp_path / "log.txt"
    with out.open("wb") as f:
        proc = run(tmp_path, "text", f)
    assert proc.returncode == 0, proc.stderr.decode()
    text = out.read_text()
    assert "line 199" in text
    assert "plugin=hello" in text
    assert "ZeroDivisionError" in text
    assert "s3cret-token" not in text
    assert "token=***" in text


def test_json_lines_to_a_pipe(tmp_path: Path) -> None:
    import orjson

    proc = run(tmp_path, "json", subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr.decode()
    lines = [orjson.loads(line) for line in proc.stdout.splitlines() if line.startswith(b"{")]
    assert len(lines) == 201
    assert lines[0]["plugin"] == "hello"
    assert lines[0]["level"] == "INFO"
    assert "ZeroDivisionError" in lines[-1]["exc"]


def test_a_closed_stdout_does_not_crash(tmp_path: Path) -> None:
    proc = run(tmp_path, "text", subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr.decode()
    script = tmp_path / "closed.py"
    script.write_text(
        "import logging, os, sys\n"
        "from kernel.logging import configure_logging\n"
        "configure_logging('INFO', 'text', stream=sys.stdout)\n"
        "os.close(1)\n"
        "logging.getLogger('x').info('into the void')\n"
        "import time; time.sleep(0.2)\n"
        "sys.stderr.write('alive\\n')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=60)
    assert b"alive" in proc.stderr
    assert b"logging to" in proc.stderr  # the broken stream is reported once


def test_a_value_from_outside_cannot_start_a_text_line_of_its_own() -> None:
    import logging

    from kernel.logging import TextFormatter

    forged = "bad\nname\r\n2026-01-01 00:00:00,000 ERROR   xcore.kernel: forged\x1b[2J\u2028"
    record = logging.LogRecord(
        "xcore.loader", logging.WARNING, __file__, 1, "plugin %r failed: %s", (forged, forged), None
    )
    record.plugin = forged
    line = TextFormatter().format(record)
    assert len(line.splitlines()) == 1
    assert "\x1b" not in line and "\\x1b[2J" in line and "\\u2028" in line
    assert "bad\\nname" in line  # the message's own escape (%r) and the bare one alike
    # a traceback keeps its lines, after the one line of the record
    try:
        raise ValueError(forged)
    except ValueError:
        record.exc_info = sys.exc_info()
    record.exc_text = None
    lines = TextFormatter().format(record).splitlines()
    assert lines[0] == line
    assert lines[1] == "Traceback (most recent call last):"
