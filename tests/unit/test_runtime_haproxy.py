"""app.runtime.kill_stray_haproxy: the HAProxy processes a stopped cluster left behind are gone
(not merely signalled) when it returns, so the next cluster finds their ports free."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from app.runtime import kill_stray_haproxy, stray_haproxy_pids


def fake_haproxy(state: Path, *, ignore_term: bool = False) -> subprocess.Popen[bytes]:
    """A process named `haproxy` whose command line names `state`, as Serve's have."""
    state.mkdir(parents=True, exist_ok=True)
    binary = state / "haproxy"
    shutil.copy(sys.executable, binary)
    code = "import signal, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('up', flush=True)\ntime.sleep(60)\n"
    proc = subprocess.Popen([str(binary), "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    return proc


@pytest.mark.parametrize("ignore_term", [False, True])
def test_stray_haproxy_has_exited_when_the_call_returns(tmp_path: Path, ignore_term: bool) -> None:
    mine = fake_haproxy(tmp_path / "mine", ignore_term=ignore_term)
    other = fake_haproxy(tmp_path / "other")  # another cluster's: left alone
    try:
        assert stray_haproxy_pids(str(tmp_path / "mine")) == [mine.pid]
        assert kill_stray_haproxy(str(tmp_path / "mine"), wait_s=1.0) == 1
        # Gone when the call returns (one that ignores SIGTERM is killed), not merely signalled.
        assert not psutil.pid_exists(mine.pid)
        assert other.poll() is None
        assert stray_haproxy_pids(str(tmp_path / "mine")) == []
    finally:
        for proc in (mine, other):
            proc.kill()
            proc.wait()
