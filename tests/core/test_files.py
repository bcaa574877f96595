"""core.files: atomic writes keep the previous file on any failure and leave no temporary files."""
import os
import stat

import pytest

from localmim.core import files


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def test_write_text_creates_folder_and_file_with_the_usual_mode(tmp_path, umask_022):
    path = tmp_path / "new" / "config.yaml"
    assert files.write_text_atomically(path, "a: 1\nb: é\n") == str(path)
    assert path.read_bytes() == "a: 1\nb: é\n".encode("utf-8")
    assert stat.S_IMODE(path.stat().st_mode) == umask_022  # 0o666 less the umask, as open() gives
    assert os.listdir(path.parent) == ["config.yaml"]


def test_write_gets_a_hidden_temp_path_beside_the_target_with_the_suffix(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        with open(tmp, "wb") as f:
            f.write(b"new")

    files.write_atomically(str(tmp_path / "checkpoint-3.ckpt"), write, suffix=".ckpt")
    (tmp,) = seen
    assert os.path.dirname(tmp) == str(tmp_path)
    assert os.path.basename(tmp).startswith(".tmp-checkpoint-3.ckpt.") and tmp.endswith(".ckpt")
    assert not os.path.exists(tmp) and (tmp_path / "checkpoint-3.ckpt").read_bytes() == b"new"


class DiskFull(Exception):
    pass


def test_failed_write_leaves_the_previous_file_intact_and_no_temp(tmp_path):
    path = tmp_path / "log.txt"
    files.write_text_atomically(path, "old contents\n")

    def half_then_fail(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise DiskFull("disk full")

    with pytest.raises(DiskFull, match="disk full"):
        files.write_atomically(path, half_then_fail)
    assert path.read_text() == "old contents\n"
    assert os.listdir(tmp_path) == ["log.txt"]


def test_interrupt_during_write_and_failed_rename_keep_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    files.write_text_atomically(path, "v1")

    def interrupted(tmp):
        with open(tmp, "wb") as f:
            f.write(b"v2-partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomically(path, interrupted)
    assert path.read_bytes() == b"v1" and os.listdir(tmp_path) == ["a.bin"]

    def no_rename(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(files.os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        files.write_text_atomically(path, "v3")
    monkeypatch.undo()
    assert path.read_bytes() == b"v1" and os.listdir(tmp_path) == ["a.bin"]


def test_read_only_result_of_a_writer_gets_the_usual_mode(tmp_path, umask_022):
    def write_read_only(tmp):  # what mindspore.save_checkpoint does: remove, rewrite, chmod 0400
        os.remove(tmp)
        with open(tmp, "wb") as f:
            f.write(b"ckpt")
        os.chmod(tmp, 0o400)

    path = tmp_path / "m.ckpt"
    files.write_atomically(path, write_read_only, suffix=".ckpt")
    assert stat.S_IMODE(path.stat().st_mode) == umask_022 and path.read_bytes() == b"ckpt"
    files.write_atomically(path, write_read_only, suffix=".ckpt")  # replacing it works as well
    assert path.read_bytes() == b"ckpt"
