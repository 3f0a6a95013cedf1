"""turns.py: the conductor gives one session the turn at a time, ABAB at shared keys, and never deadlocks."""

import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from pytest_kvcache.turns import Conductor


def fake_session(conductor: Conductor, name: str, keys: list[str], log: list, running: list) -> threading.Thread:
    """A thread speaking the session side of the protocol; it logs (name, key) each time it holds the turn."""

    def body() -> None:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(conductor.path))
        conn.sendall(f"hello {name}\n".encode())
        sequence = ["start", *keys]
        for key, following in zip(sequence, [*keys, None]):
            assert conn.recv(3) == b"go\n"
            running.append(name)
            log.append((name, key, len(running)))
            running.remove(name)
            if following is None:
                break
            conn.sendall(f"at {following}\n".encode())
        conn.close()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def conduct(sessions: dict[str, list[str]], first: list[str] | None = None, timeout: float = 10.0) -> list:
    conductor = Conductor(seed=1)
    log, running = [], []
    try:
        threads = [fake_session(conductor, name, keys, log, running) for name, keys in sessions.items()]
        conductor.conduct(list(sessions), first, timeout=timeout)
        for t in threads:
            t.join(5)
    finally:
        conductor.close()
    assert all(depth == 1 for *_, depth in log), "two sessions held the turn at once"
    return [(name, key) for name, key, _ in log]


def test_shared_keys_alternate_abab_in_the_first_order():
    keys = ["t1#0", "t1#1", "t2#0"]
    log = conduct({"base": keys, "head": keys}, first=["head", "base"])
    assert log == [("head", "start"), ("base", "start"), ("head", "t1#0"), ("base", "t1#0"),
                   ("head", "t1#1"), ("base", "t1#1"), ("head", "t2#0"), ("base", "t2#0")]


def test_a_test_on_one_side_only_runs_alone_and_both_finish():
    log = conduct({"base": ["t1#0", "gone#0", "t2#0"], "head": ["t1#0", "t2#0"]}, first=["base", "head"])
    assert log[:4] == [("base", "start"), ("head", "start"), ("base", "t1#0"), ("head", "t1#0")]
    assert ("base", "gone#0") in log and log.index(("base", "gone#0")) < log.index(("base", "t2#0"))
    assert sorted(log[-2:]) == [("base", "t2#0"), ("head", "t2#0")]


def test_a_session_that_never_joins_is_a_timeout_not_a_hang():
    conductor = Conductor()
    joined = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        joined.connect(str(conductor.path))
        joined.sendall(b"hello base\n")
        with pytest.raises(TimeoutError, match=r"sessions \['head'\] did not join within 0.2 s"):
            conductor.conduct(["base", "head"], timeout=0.2)
        assert joined.recv(3) == b"", "the session that joined must get end-of-file (and exit), not wait for ever"
    finally:
        conductor.close()
        joined.close()
    assert not conductor.path.parent.exists()


def test_real_sessions_take_turns_at_their_rounds(tmp_path):
    """Two processes through join() and before_round(): their rounds interleave one by one."""
    script = textwrap.dedent("""
        import os, sys
        from pytest_kvcache import turns
        turns.join()
        for i in range(3):
            turns.before_round("t", i)
            with open(sys.argv[1], "a") as f:
                f.write(os.environ["KVBENCH_TURN_NAME"] + str(i) + "\\n")
    """)
    log = tmp_path / "log"
    conductor = Conductor()
    try:
        procs = [subprocess.Popen([sys.executable, "-c", script, str(log)], env={**conductor.env(name), "PATH": ""})
                 for name in ("a", "b")]
        conductor.conduct(["a", "b"], first=["b", "a"])
        assert [p.wait(10) for p in procs] == [0, 0]
    finally:
        conductor.close()
    assert log.read_text().split() == ["b0", "a0", "b1", "a1", "b2", "a2"]
