"""Turn-taking between sessions that run at the same time (kvbench compare): only the session holding the turn
computes, and the turn passes before every timed round, so base and head measure the same round of the same test
back to back instead of tens of seconds apart, and a slow drift of the machine's speed falls on both alike.

Session side (`join`, `before_round`): a session whose environment names a conductor socket (`KVBENCH_TURNS`,
its name in `KVBENCH_TURN_NAME`) connects as soon as it is forked, waits for its first turn, and at each timed
round says where it is (`at <test id>#<round>`) and waits for the turn again; its exit (the socket closing) ends
its part. Sessions without that variable never wait.

Conductor side (`Conductor`): gives the turn to one session at a time. Sessions at the same key run one after the
other in the same order at every key (ABAB, never ABBA), so no session's round follows its own: a round right after
its own session's finds the caches warm, and ABBA made one side of an A/A pair 3.9% faster on the tiny model
(benchmarks/results/interleaving/README.md). A session that is behind (at a key another one has passed) runs alone
until it catches up; sessions that diverged (a test on one side only) run one at a time, in name order.
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SOCKET_ENV, NAME_ENV = "KVBENCH_TURNS", "KVBENCH_TURN_NAME"
FD_ENV = "KVBENCH_TURN_FD"  # "<pid>:<fd>": the connection `join` opened in this process
START = "start"
JOIN_TIMEOUT_S = 60.0  # sessions join right after their fork, before pytest starts

_connection: socket.socket | None = None


def _read_line(conn: socket.socket, buffer: bytearray) -> str | None:
    """One newline-terminated message, or None when the peer closed."""
    while b"\n" not in buffer:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


def _wait_for_turn(conn: socket.socket) -> None:
    if _read_line(conn, bytearray()) != "go":
        os._exit(75)  # the conductor went away: the compare was stopped, measuring on would be alone and unpaired


def join() -> None:
    """In a freshly forked session (forkserver.py, before pytest starts): connect to the conductor named in the
    environment, if any, and wait for the first turn. A tree without this module then still runs in turn, only
    without passing the turn at its rounds."""
    path = os.environ.get(SOCKET_ENV)
    if not path:
        return
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    conn.sendall(f"hello {os.environ.get(NAME_ENV, str(os.getpid()))}\n".encode())
    _wait_for_turn(conn)
    os.environ[FD_ENV] = f"{os.getpid()}:{conn.detach()}"  # the fd stays open for the tree's own turns module


def _adopted() -> socket.socket | None:
    """The connection `join` opened in this very process (not one inherited through the environment)."""
    global _connection
    if _connection is None:
        pid, _, fd = os.environ.get(FD_ENV, "").partition(":")
        if pid == str(os.getpid()) and fd:
            _connection = socket.socket(fileno=int(fd))
    return _connection


def before_round(test_id: str, index: int) -> None:
    """A timed round is next: pass the turn, and wait for it to come back (no-op outside kvbench compare)."""
    conn = _adopted()
    if conn is None:
        return
    conn.sendall(f"at {test_id}#{index}\n".encode())
    _wait_for_turn(conn)


@dataclass
class Member:
    """One session as the conductor sees it: where it waits, and every key it has been at."""

    name: str
    conn: socket.socket
    key: str | None = START
    seen: set[str] = field(default_factory=lambda: {START})
    buffer: bytearray = field(default_factory=bytearray)

    @property
    def ended(self) -> bool:
        return self.key is None

    def turn(self) -> None:
        """Let it run to its next timed round (or its end)."""
        self.conn.sendall(b"go\n")
        line = _read_line(self.conn, self.buffer)
        if line is None or not line.startswith("at "):
            self.key = None
            self.conn.close()
            return
        self.key = line[3:]
        self.seen.add(self.key)


@dataclass
class Conductor:
    """Listens on a socket in a fresh temporary folder; `conduct(names)` runs those sessions' turns until every one
    has ended."""

    seed: int = 0
    orders: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="kvbench-turns-")) / "turns.sock"  # short: socket paths are <= 107
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        self.server.listen(8)
        self.rng = random.Random(self.seed)

    def env(self, name: str) -> dict[str, str]:
        """What a session needs in its environment to take part under `name`."""
        return {SOCKET_ENV: str(self.path), NAME_ENV: name}

    def _accept(self, names: list[str], timeout: float) -> list[Member]:
        members: dict[str, Member] = {}
        self.server.settimeout(timeout)
        while len(members) < len(names):
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                for m in members.values():  # those that joined get end-of-file and exit
                    m.conn.close()
                missing = sorted(set(names) - set(members))
                raise TimeoutError(f"sessions {missing} did not join within {timeout:g} s") from None
            conn.settimeout(None)
            buffer = bytearray()
            hello = _read_line(conn, buffer) or ""
            name = hello.removeprefix("hello ")
            if not hello.startswith("hello ") or name not in names or name in members:
                conn.close()
                continue
            members[name] = Member(name, conn, buffer=buffer)
        return [members[n] for n in names]

    def _next(self, live: list[Member], first: list[str] | None) -> list[Member]:
        """Whom to run next: a group at one key (in turn order), else one session alone."""
        behind = [m for m in live if any(m.key in o.seen and o.key != m.key for o in live if o is not m)]
        if behind:
            return behind[:1]
        if len({m.key for m in live}) > 1:
            return live[:1]
        names = [m.name for m in live]
        if self.orders and sorted(self.orders[-1]) == sorted(names):
            order = self.orders[-1]
        elif not self.orders and first and sorted(first) == sorted(names):
            order = list(first)
        else:
            order = self.rng.sample(names, len(names))
        self.orders.append(order)
        by_name = {m.name: m for m in live}
        return [by_name[n] for n in order]

    def conduct(self, names: list[str], first: list[str] | None = None, timeout: float = JOIN_TIMEOUT_S) -> None:
        """Wait for every named session to join, then give turns until all have ended; `first`: the order of the
        turns (default: drawn). The order used at each key shared by all is kept in `orders`."""
        self.orders = []
        members = self._accept(names, timeout)
        while live := [m for m in members if not m.ended]:
            for m in self._next(live, first):
                m.turn()

    def close(self) -> None:
        self.server.close()
        self.path.unlink(missing_ok=True)
        self.path.parent.rmdir()
