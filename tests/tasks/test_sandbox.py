"""The sandbox contains each hazard and reports it with the right status (preftune/tasks/sandbox.py).

Two kinds of checks: with the default audit hook (the first thing that refuses is the hook: ``blocked``),
and with the hook's switches off, so that the kernel layers underneath (network namespace, read-only
mounts, PID namespace and its pid_max, rlimits) are what stops the code. Tight limits keep the file fast.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from preftune.tasks.sandbox import Limits, Sandbox, SandboxUnavailable, run_python

FAST = Limits(wall_seconds=2.0, memory_bytes=256 << 20)
# Hook off for these families: the kernel layers alone must hold.
KERNEL = Limits(wall_seconds=2.0, memory_bytes=256 << 20, block_network_calls=False, block_writes=False,
                allow_processes=True)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox is Linux-only")


def _isolated() -> bool:
    return run_python("pass", Limits(unsafe_local_exec=True)).isolation.get("network") == "namespace"


needs_ns = pytest.mark.skipif(not _isolated(), reason="no unprivileged user namespaces on this machine")


def _leftovers() -> int:
    """Processes still running the sandbox's child (every process a run makes has its command line)."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return sum("_sandbox_child.py" in line for line in out.splitlines())


def test_passing_and_failing_code():
    ok = run_python("def f(x):\n    return 2 * x\nassert f(3) == 6\nprint('done')", FAST)
    assert (ok.status, ok.reason, ok.exit_code, ok.stdout) == ("passed", "ok", 0, "done\n")
    bad = run_python("assert 1 + 1 == 3, 'arithmetic'", FAST)
    assert (bad.status, bad.reason) == ("failed", "AssertionError: arithmetic")
    exc = run_python("1 / 0", FAST)
    assert (exc.status, exc.reason) == ("failed", "ZeroDivisionError: division by zero")
    syn = run_python("def f(:\n    pass", FAST)
    assert syn.status == "failed" and syn.reason.startswith("SyntaxError")


def test_no_early_pass():
    """sys.exit(0) is a failure and os._exit is gone: code cannot skip the tests that follow it."""
    r = run_python("import sys\nsys.exit(0)\nassert False", FAST)
    assert (r.status, r.reason) == ("failed", "SystemExit(0) raised: an early exit is a failure")
    r = run_python("import os\nos._exit(0)\nassert False", FAST)
    assert r.status == "failed" and "_exit" in r.reason


def test_runaway_loop_times_out():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", Limits(wall_seconds=1.0))
    assert (r.status, r.reason) == ("timeout", "wall time over 1 s")
    assert time.monotonic() - t0 < 3.0


def test_huge_allocation_is_memory():
    r = run_python("x = bytearray(8 << 30)", FAST)
    assert (r.status, r.reason) == ("memory", "MemoryError")
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(1 << 20))", FAST)
    assert r.status == "memory"


def test_network_is_blocked():
    r = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", FAST)
    assert r.status == "blocked" and r.reason.startswith("sandbox: blocked: network (socket.")


@needs_ns
def test_network_namespace_without_the_hook():
    r = run_python("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)", KERNEL)
    assert r.status == "failed" and "Network is unreachable" in r.reason
    assert r.isolation["network"] == "namespace"


def test_write_outside_is_blocked(tmp_path):
    target = tmp_path / "escape.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')", FAST)
    assert r.status == "blocked" and "write outside the working folder" in r.reason
    assert not target.exists()
    for src in (f"import os\nos.mkdir({str(tmp_path / 'd')!r})", f"import os\nos.remove({str(__file__)!r})"):
        r = run_python(src, FAST)
        assert r.status == "blocked", src
    assert not (tmp_path / "d").exists() and Path(__file__).exists()


@needs_ns
def test_read_only_filesystem_without_the_hook(tmp_path):
    target = tmp_path / "escape.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')", KERNEL)
    assert r.status == "failed" and "Read-only file system" in r.reason
    assert not target.exists()
    assert r.isolation["filesystem"] == "read-only mounts"


def test_write_inside_is_allowed():
    src = ("import os\nopen('a.txt', 'w').write('hello')\nos.mkdir('sub')\nos.rename('a.txt', 'sub/b.txt')\n"
           "print(open('sub/b.txt').read())\nimport tempfile\nprint(tempfile.gettempdir() == os.getcwd())")
    r = run_python(src, FAST)
    assert (r.status, r.stdout) == ("passed", "hello\nTrue\n")


def test_file_size_limit():
    r = run_python("open('big', 'wb').write(b'x' * (2 << 20))", Limits(wall_seconds=2.0, file_bytes=1 << 20))
    assert r.status == "failed" and "File too large" in r.reason  # Python ignores SIGXFSZ: the write fails


def test_process_creation_is_blocked():
    for src in ("import os\nos.fork()", "import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                "import ctypes\nctypes.CDLL(None)"):
        r = run_python(src, FAST)
        assert r.status == "blocked", src


@needs_ns
def test_fork_bomb_is_capped_and_killed():
    """With fork allowed, the bomb meets the process cap (pid_max of its PID namespace, or RLIMIT_NPROC), runs
    into the wall time, and every process it made dies with the namespace."""
    bomb = ("import os, sys, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError:\n"
            "        print('capped at', n, flush=True)\n        time.sleep(10)\n    if pid == 0:\n"
            "        time.sleep(10)\n        sys.exit(0)\n    n += 1\n")
    r = run_python(bomb, Limits(wall_seconds=1.5, memory_bytes=256 << 20, allow_processes=True))
    assert r.status == "timeout"
    capped = int(r.stdout.split()[2])
    assert 0 < capped < 400  # 301 pids in the namespace (or fewer under RLIMIT_NPROC)
    time.sleep(0.3)
    assert _leftovers() == 0


def test_stdout_flood_is_truncated():
    r = run_python("for i in range(100_000):\n    print('x' * 99)", Limits(wall_seconds=5.0, output_bytes=4096))
    assert r.status == "passed" and r.truncated
    assert len(r.stdout) == 4096 and set(r.stdout) == {"x", "\n"}


def test_killed_by_signal():
    r = run_python("import os\nos.abort()", FAST)
    assert (r.status, r.reason) == ("killed", "signal SIGABRT")


def test_clean_environment():
    r = run_python("import os, sys\nprint(sorted(k for k in os.environ if 'TOKEN' in k or 'HF' in k))\n"
                   "print(any('site-packages' in p for p in sys.path))\nprint(hash('a') == hash('a'))", FAST)
    assert r.stdout == "[]\nFalse\nTrue\n"
    same = [run_python("print(hash('preftune'))", FAST).stdout for _ in range(2)]
    assert same[0] == same[1]  # fixed hash seed


def test_sandbox_pool_and_cache():
    box = Sandbox(FAST, workers=2)
    res = box.run_many(["assert True", "assert False", "assert True"])
    assert [r.status for r in res] == ["passed", "failed", "passed"]
    assert box.runs == 2  # the repeated source came from the cache


def test_without_namespaces_refuses_unless_accepted():
    """METHODS.md §M10 safety rule 3: no network namespace, no run, unless the user accepts the weaker guard."""
    with pytest.raises(SandboxUnavailable, match="no network namespace"):
        run_python("pass", Limits(namespaces=False))
    r = run_python("import socket\nsocket.socket()", Limits(namespaces=False, unsafe_local_exec=True, wall_seconds=2))
    assert r.status == "blocked" and r.isolation["network"] == "audit hook"
    r = run_python("while True:\n    pass", Limits(namespaces=False, unsafe_local_exec=True, wall_seconds=1))
    assert r.status == "timeout"
