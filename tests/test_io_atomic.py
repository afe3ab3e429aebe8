"""core.io.atomic: refusing inputs and unwritable folders, PID-named temp files, and cleanup after kill -9."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile

from core.cli.main import main
from core.errors import StackError
from core.io.atomic import (
    TEMP_PATTERN,
    atomic_output,
    output_name_of,
    remove_stale_temps,
    temp_path_for,
    write_bytes,
    write_text,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".~"))


def _dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- temp names ------------------------------------------------------------------------------------


def test_temp_name_carries_pid_and_final_name(tmp_path):
    tmp = temp_path_for(tmp_path / "masks.ome.tif")
    match = TEMP_PATTERN.match(tmp.name)
    assert tmp.parent == tmp_path and match is not None
    assert int(match.group("pid")) == os.getpid()
    assert match.group("name") == "masks.ome.tif" and tmp.name.endswith(".ome.tif")  # suffix writers behave
    assert output_name_of(tmp.name) == "masks.ome.tif"
    assert output_name_of("masks.tif") == "masks.tif"


def test_the_temp_exists_while_writing_and_is_renamed(tmp_path):
    with atomic_output(tmp_path / "a.bin") as tmp:
        assert tmp.is_file() and tmp.stat().st_size == 0  # reserved before any work
        assert _temps(tmp_path) == [tmp.name]
        tmp.write_bytes(b"abc")
    assert (tmp_path / "a.bin").read_bytes() == b"abc"
    assert _temps(tmp_path) == []


# -- inputs ----------------------------------------------------------------------------------------


def test_an_output_that_is_any_input_is_refused_with_and_without_overwrite(tmp_path):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    (tmp_path / "link.tif").symlink_to(b)
    os.link(b, tmp_path / "hard.tif")
    for spelling in (b, tmp_path / "sub" / ".." / "b.tif", tmp_path / "link.tif", tmp_path / "hard.tif"):
        for overwrite in (False, True):
            with pytest.raises(StackError, match=r"is the source file itself \('.*b.tif' is an input"):
                write_text(spelling, "clobbered", overwrite=overwrite, sources=[a, b])
    with pytest.raises(StackError, match="source file itself"):  # source= still works, alone or with sources
        write_text(a, "clobbered", overwrite=True, source=a, sources=[b])
    assert a.read_bytes() == b"A" and b.read_bytes() == b"B"
    assert _temps(tmp_path) == []


def test_an_output_inside_an_input_folder_is_refused(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    (folder / "z0.png").write_bytes(b"")
    with pytest.raises(StackError, match=r"lies inside the input folder '.*slices'"):
        write_text(folder / "mask.tif", "x", sources=[folder])
    assert sorted(p.name for p in folder.iterdir()) == ["z0.png"]
    assert write_text(tmp_path / "mask.tif", "x", sources=[folder]).read_text() == "x"  # beside it is fine


# -- folders that cannot be written ----------------------------------------------------------------


def test_a_folder_that_cannot_be_created_names_the_folder(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    with pytest.raises(StackError, match=r"^cannot create the output folder '.*notes.txt/sub' \(Not a directory\)"):
        write_text(blocker / "sub" / "out.csv", "x")
    assert blocker.read_text() == "a file, not a folder"


def _read_only_folders(tmp_path: Path) -> list[Path]:
    """A chmod 555 folder where permissions bind (not for root), and sysfs, which even root cannot write."""
    folders = []
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if not os.access(locked, os.W_OK):
        folders.append(locked)
    if _sys_refuses_files():
        folders.append(Path("/sys"))
    return folders


def _sys_refuses_files() -> bool:
    try:
        fd = os.open("/sys/.protoscope-probe", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError:
        return Path("/sys").is_dir()
    os.close(fd)
    os.unlink("/sys/.protoscope-probe")
    return False


def test_a_read_only_folder_gives_one_stack_error_naming_the_folder(tmp_path):
    folders = _read_only_folders(tmp_path)
    if not folders:
        pytest.skip("no folder here refuses writes to this user")
    for folder in folders:
        with pytest.raises(StackError, match=rf"^cannot write in the output folder '{re.escape(str(folder))}' "
                                             r"\(.+\); choose a folder you can write to for 'out.tif'"):
            with atomic_output(folder / "out.tif") as tmp:
                tmp.write_bytes(b"never")
        assert not (folder / "out.tif").exists()


def test_the_cli_reports_a_read_only_output_folder_in_one_line(tmp_path, capsys):
    folders = _read_only_folders(tmp_path)
    if not folders:
        pytest.skip("no folder here refuses writes to this user")
    tifffile.imwrite(tmp_path / "in.tif", np.arange(12, dtype=np.uint8).reshape(3, 4), photometric="minisblack")
    assert main(["export", str(tmp_path / "in.tif"), "--out", str(folders[0] / "out.tif")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot write in the output folder '{folders[0]}'")


def test_an_os_error_of_the_temp_file_becomes_a_stack_error_naming_the_output(tmp_path):
    out = tmp_path / "m.bin"
    with pytest.raises(StackError, match=r"^cannot write '.*m.bin' \(No space left on device\); free some space"):
        with atomic_output(out) as tmp:
            raise OSError(28, "No space left on device", str(tmp))
    with pytest.raises(FileNotFoundError):  # an input's error stays what it is
        with atomic_output(out):
            open(tmp_path / "missing-input.tif", "rb")
    assert not out.exists() and _temps(tmp_path) == []


# -- stale temps -----------------------------------------------------------------------------------


def test_only_our_dead_temps_on_this_machine_are_removed(tmp_path):
    dead, host = _dead_pid(), TEMP_PATTERN.match(temp_path_for(tmp_path / "x").name).group("host")
    other_host = "0" * 6 if host != "0" * 6 else "1" * 6
    names = {
        f".~protoscope-{dead}-{host}-0123abcd.m.tif": False,  # ours, dead: removed
        f".~protoscope-{os.getpid()}-{host}-0123abcd.m.tif": True,  # ours, alive (this process)
        f".~protoscope-{dead}-{other_host}-0123abcd.m.tif": True,  # another machine on a shared folder
        ".~0123abcd.m.tif": True,  # the old unnamed style: whose it is cannot be told
        f"notes.~protoscope-{dead}-{host}-0123abcd.m.tif": True,  # does not start with the prefix
    }
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / f".~protoscope-{dead}-{host}-0123abce.dir").mkdir()  # a folder is never touched
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [f".~protoscope-{dead}-{host}-0123abcd.m.tif"]
    for name, kept in names.items():
        assert (tmp_path / name).exists() == kept, name
    assert (tmp_path / f".~protoscope-{dead}-{host}-0123abce.dir").is_dir()


_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import tifffile
    from core.io.atomic import atomic_output

    out, mode = sys.argv[1], sys.argv[2]
    with atomic_output(out) as tmp, tifffile.TiffWriter(tmp) as tw:
        for i in range(400):  # 400 pages of 512 x 512 uint16: 200 MB when complete
            tw.write(np.full((512, 512), i, np.uint16), photometric="minisblack", contiguous=True)
            if i == 1:
                print("writing", flush=True)
                if mode == "hold":  # wait, mid-write, until the parent says go on
                    sys.stdin.readline()
                    break
            time.sleep(0.05)
    print("done", flush=True)
""")


def _start_writer(out: Path, mode: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(out), mode], cwd=PROJECT_ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()  # blocks until two pages are in its temp file
    assert line.strip() == "writing", child.stderr.read()
    return child


def _temp_of(folder: Path, pid: int) -> Path:
    found = [p for p in folder.iterdir() if (m := TEMP_PATTERN.match(p.name)) and int(m.group("pid")) == pid]
    assert len(found) == 1, sorted(p.name for p in folder.iterdir())
    return found[0]


def test_kill_9_mid_write_leaves_no_output_and_the_next_write_removes_the_stray_temp(tmp_path):
    killed = _start_writer(tmp_path / "big.tif", "slow")
    alive = _start_writer(tmp_path / "other.tif", "hold")
    try:
        stray = _temp_of(tmp_path, killed.pid)
        assert stray.stat().st_size >= 512 * 512 * 2  # mid-write: a page is on disk (the rest may be buffered)
        os.kill(killed.pid, signal.SIGKILL)
        assert killed.wait(timeout=60) == -signal.SIGKILL
        assert not (tmp_path / "big.tif").exists()  # no partial file under the real name
        assert stray.exists()  # a killed process cannot clean up after itself
        live_temp = _temp_of(tmp_path, alive.pid)

        write_text(tmp_path / "next.txt", "the next write to this folder")
        assert not stray.exists()  # the dead writer's temp is gone
        assert live_temp.exists() and not (tmp_path / "other.tif").exists()  # the live one is untouched

        out, _ = alive.communicate("go on\n", timeout=120)
        assert alive.returncode == 0 and out.strip() == "done"
        assert [int(v) for v in tifffile.imread(tmp_path / "other.tif")[:, 0, 0]] == [0, 1]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["next.txt", "other.tif"]
    finally:
        for child in (killed, alive):
            if child.poll() is None:
                child.kill()
                child.wait()


def test_write_bytes_reports_a_folder_and_an_existing_file(tmp_path):
    write_bytes(tmp_path / "x.bin", b"1")
    with pytest.raises(StackError, match="already exists"):
        write_bytes(tmp_path / "x.bin", b"2")
    with pytest.raises(StackError, match="is a folder"):
        write_bytes(tmp_path, b"2", overwrite=True)
    assert (tmp_path / "x.bin").read_bytes() == b"1"


def test_a_failed_write_removes_the_folders_it_created_and_keeps_existing_ones(tmp_path):
    existing = tmp_path / "kept"
    existing.mkdir()
    out = existing / "new" / "deeper" / "mask.tif"
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("writer failed")
    assert existing.is_dir() and list(existing.iterdir()) == []


def test_a_failed_write_keeps_a_created_folder_that_something_else_filled(tmp_path):
    out = tmp_path / "new" / "mask.tif"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp.parent / "other.txt").write_text("another writer's file")
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["other.txt"]


def test_a_successful_write_into_new_folders_keeps_them(tmp_path):
    out = write_bytes(tmp_path / "a" / "b" / "x.bin", b"1")
    assert out.read_bytes() == b"1"
