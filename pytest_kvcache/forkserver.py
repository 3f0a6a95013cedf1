"""Fork server for `kvbench compare`: imports the heavy third-party libraries once, then forks one pytest process
per session, so a session costs its tests instead of ~8 s of `import torch, transformers` on a 2-core machine.

Run as a script (never as `-m pytest_kvcache...`): it imports nothing of pytest_kvcache, so each child, which puts
its own tree first on sys.path (and in PYTHONPATH for its subprocesses), runs that tree's plugin, engines and
suites. Base and head sessions fork from this one parent, so whatever they share is shared by both sides alike.

Protocol: one JSON request per line on stdin, {"sessions": [{"tree", "args", "env", "log"}, ...]}: those sessions
are forked at once (they take turns through turns.py when their env says so); one JSON line back when all have
ended, {"sessions": [{"returncode", "cpu_s"}, ...]} in request order (CPU time from each one's rusage).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

PRELOAD = ("numpy", "psutil", "tabulate", "filelock", "torch", "transformers",
           "transformers.models.llama.modeling_llama", "pytest")


def _turns():
    """This tree's turns.py, loaded under its own name so that no pytest_kvcache module is imported here."""
    spec = importlib.util.spec_from_file_location("_kvbench_turns", os.path.join(os.path.dirname(__file__), "turns.py"))
    module = sys.modules["_kvbench_turns"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _child(tree: str, args: list[str], env: dict[str, str], log: str, turns) -> None:
    """In the forked process: wait for its turn (when the request has a conductor), then become a pytest session
    of `tree`, output to `log`; never returns."""
    code = 70
    try:
        os.environ.update(env)
        turns.join()
        os.chdir(tree)
        sys.path.insert(0, tree)
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        import pytest

        code = int(pytest.main(args))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    """Preload, then answer session requests until stdin closes."""
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # the script's own folder would make pytest_kvcache's modules importable by bare name
    for name in PRELOAD:
        importlib.import_module(name)
    turns = _turns()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        sessions = json.loads(line)["sessions"]
        pids = []
        for request in sessions:
            pid = os.fork()
            if pid == 0:
                _child(request["tree"], request["args"], request["env"], request["log"], turns)
            pids.append(pid)
        done = {}
        while len(done) < len(pids):
            pid, status, usage = os.wait4(-1, 0)
            if pid in pids:
                done[pid] = {"returncode": os.waitstatus_to_exitcode(status), "cpu_s": usage.ru_utime + usage.ru_stime}
        print(json.dumps({"sessions": [done[pid] for pid in pids]}), flush=True)


if __name__ == "__main__":
    serve()
