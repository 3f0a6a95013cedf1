"""Fork server for `kvbench compare`: imports the heavy third-party libraries once, then forks one pytest process
per session, so a session costs its tests instead of ~8 s of `import torch, transformers` on a 2-core machine.

Run as a script (never as `-m pytest_kvcache...`): it imports nothing of pytest_kvcache, so each child, which puts
its own tree first on sys.path (and in PYTHONPATH for its subprocesses), runs that tree's plugin, engines and
suites. Base and head sessions fork from this one parent, so whatever they share is shared by both sides alike.

Protocol: one JSON request per line on stdin, {"tree", "args", "env", "log"}; one JSON line back per session,
{"returncode", "cpu_s"} (the session's CPU time, from its rusage).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

PRELOAD = ("numpy", "psutil", "tabulate", "filelock", "torch", "transformers",
           "transformers.models.llama.modeling_llama", "pytest")


def _child(tree: str, args: list[str], env: dict[str, str], log: str) -> None:
    """In the forked process: become a pytest session of `tree`, output to `log`; never returns."""
    code = 70
    try:
        os.chdir(tree)
        sys.path.insert(0, tree)
        os.environ.update(env)
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
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request["tree"], request["args"], request["env"], request["log"])
        _, status, usage = os.wait4(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "cpu_s": usage.ru_utime + usage.ru_stime}),
              flush=True)


if __name__ == "__main__":
    serve()
