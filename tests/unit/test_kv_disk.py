"""Private files of a KV member: 0700 directories and 0600 files whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.kv.disk import private_dir, write_private_text
from app.kv.store import OP_PUT, Op, ShardStore
from app.kv.wal import WriteAheadLog


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask: modes must not depend on it."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_data_directories_are_0700_and_files_0600(tmp_path: Path, open_umask: None) -> None:
    member = tmp_path / "data" / "kv" / "group-0" / "g0-m1"
    wal = WriteAheadLog(member, snapshot_every=2)
    store = ShardStore()
    wal.begin_term(1, store.snapshot())
    for seq in (1, 2):
        op = Op(seq, OP_PUT, f"k{seq}", 0, b"secret value", seq)
        store.apply(op)
        wal.append(op)
    wal.write_snapshot(store.snapshot())
    wal.close()
    for directory in (tmp_path / "data", member.parent.parent, member.parent, member):
        assert _mode(directory) == 0o700, directory
    files = list(member.iterdir())
    assert {p.suffix for p in files} == {".pkl", ".log"}
    for path in files:
        assert _mode(path) == 0o600, path


def test_an_existing_member_directory_is_tightened(tmp_path: Path, open_umask: None) -> None:
    member = tmp_path / "g0-m1"
    member.mkdir(mode=0o755)
    os.chmod(member, 0o755)
    (member / "wal-00000001-000000000001.log").touch(mode=0o644)
    wal = WriteAheadLog(member)
    wal.begin_term(1, ShardStore().snapshot())  # reopens the segment above to append
    wal.close()
    assert _mode(member) == 0o700
    assert _mode(member / "wal-00000001-000000000001.log") == 0o600


def test_private_text_replaces_a_file_atomically(tmp_path: Path, open_umask: None) -> None:
    path = private_dir(tmp_path / "kv") / "cluster.json"
    write_private_text(path, '{"a": 1}')
    write_private_text(path, '{"a": 2}')
    assert path.read_text() == '{"a": 2}' and _mode(path) == 0o600
    assert _mode(tmp_path / "kv") == 0o700
    assert [p.name for p in (tmp_path / "kv").iterdir()] == ["cluster.json"]  # no temp left
