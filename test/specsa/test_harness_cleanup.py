"""A server launched by the harness dies with the process that launched it (a test run killed by a
timeout never reaches `Server.stop()`)."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from specsa.sglang_plugin import harness

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux only")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"    # a zombie is dead
    except FileNotFoundError:
        return False


def test_child_dies_with_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import subprocess, sys, time
        from specsa.sglang_plugin.harness import _die_with_parent
        p = subprocess.Popen(["sleep", "120"], start_new_session=True, preexec_fn=_die_with_parent)
        print(p.pid, flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)      # no finally, no atexit: only the kernel can help
        parent.wait()
        deadline = time.time() + 10
        while _alive(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the launched process outlived its killed parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_start_server_ties_the_server_to_the_main_thread(monkeypatch, tmp_path):
    seen = {}

    class FakePopen:
        def __init__(self, cmd, **kw):
            seen.update(kw)
            self.pid = -1

    monkeypatch.setattr(harness.subprocess, "Popen", FakePopen)
    harness.start_server("m", 1, log_path=tmp_path / "log")
    assert seen["preexec_fn"] is harness._die_with_parent
    assert seen["start_new_session"] is True

    import threading
    t = threading.Thread(target=harness.start_server, args=("m", 1),
                         kwargs={"log_path": tmp_path / "log2"})
    seen.clear()
    t.start()
    t.join()
    assert seen["preexec_fn"] is None    # the death signal would fire when this thread ends
