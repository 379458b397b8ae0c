"""Run untrusted Python (model-written code and tests) in a separate, contained process.

``run_python(source, limits)`` starts one fresh interpreter per run (``python -s -S -B``: no site-packages,
no user site, no PYTHON* variables but a fixed hash seed), in a new session, with stdin closed, an
environment of PATH, locale, HOME and TMPDIR only, and a fresh owner-only temporary working folder that
is deleted afterwards. The child (``_sandbox_child.py``) builds its containment before the untrusted code
runs, and reports which layers it got (``RunResult.isolation``):

- **network**: a new network namespace (no interface but a loopback that is down); plus an audit hook that
  refuses sockets. Without namespaces (some kernels/containers refuse unprivileged user namespaces) only the
  audit hook remains, a weaker guard, and the sandbox refuses to run unless ``unsafe_local_exec=True``.
- **files**: a private mount namespace where every mount is read-only except the working folder (locked by a
  nested user namespace), RLIMIT_FSIZE, RLIMIT_NOFILE; plus an audit hook refusing ``open`` for writing,
  remove/rename/mkdir/chmod/... outside the folder.
- **processes**: the audit hook refuses fork/exec/subprocess/os.system/kill; RLIMIT_NPROC = this user's
  process count + ``processes`` (the kernel does not apply it to uid 0); a new PID namespace whose init is
  the untrusted process, with pid_max at its floor (301, Linux ≥ 6.14), so a fork bomb is capped and every
  process it made dies with it; the launcher and its namespace are killed as a process group on timeout.
- **time/memory**: a wall-clock timeout (SIGKILL to the group), RLIMIT_CPU one second above it, RLIMIT_AS.

Nothing here needs root; on this project's machines every layer is present (``probe()`` says which).
The audit hook is an extra layer, not a boundary (human-eval's "reliability guard" docstring says the same of
its own guard): code that reaches native memory can bypass it, and the kernel layers above contain it.

Outcomes (``RunResult.status``): ``passed`` (exit 0), ``failed`` (assertion, exception, syntax error, early
exit: ``reason`` says which), ``timeout`` (wall or CPU), ``memory`` (MemoryError under RLIMIT_AS),
``blocked`` (the audit hook refused something, even if the code caught the error), ``killed`` (another
signal, e.g. SIGXFSZ past the file-size limit). Only ``passed`` is a pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHILD = Path(__file__).with_name("_sandbox_child.py")
# The child's exit statuses (_sandbox_child.py).
_CODES = {0: ("passed", "ok"), 10: ("failed", "assertion"), 11: ("failed", "exception"), 12: ("failed", "syntax"),
          13: ("memory", "MemoryError"), 14: ("blocked", "audit hook"), 15: ("failed", "early exit")}
_REFUSED, _SETUP = 16, 17
# ``python -c``: sys.path[0] is then "" (the working folder), dropped before any import; running the file by
# path instead would put preftune/tasks/ first on sys.path, where keyword.py shadows the standard library's.
_BOOT = "import sys; del sys.path[0]; p = sys.argv[1]; exec(compile(open(p).read(), p, 'exec'))"
STATUSES = ("passed", "failed", "timeout", "memory", "blocked", "killed")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be built here (or only without a network namespace, and that was not accepted)."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one run. Defaults [preftune] follow METHODS.md §M10's execution-safety rules."""

    wall_seconds: float = 10.0
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    processes: int = 8  # processes the code may add (RLIMIT_NPROC allowance); fork is refused by the hook anyway
    file_bytes: int = 10 << 20  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE
    output_bytes: int = 64 << 10  # stdout and stderr kept, each (the rest is read and dropped)
    namespaces: bool = True  # user/network/pid/mount namespaces when the machine grants them
    unsafe_local_exec: bool = False  # run even without a network namespace (audit-hook network guard only)
    # Audit-hook switches, for tests of the kernel layers underneath (never needed by a task).
    allow_processes: bool = False
    allow_native: bool = False
    block_network_calls: bool = True
    block_writes: bool = True

    @property
    def cpu_seconds(self) -> int:
        return int(self.wall_seconds) + 1  # just above the wall time: the wall clock normally ends a busy loop

    def child_view(self) -> dict[str, Any]:
        return {**asdict(self), "cpu_seconds": self.cpu_seconds}


@dataclass(frozen=True)
class RunResult:
    status: str  # one of STATUSES
    reason: str
    exit_code: int | None = None
    signal: int | None = None
    stdout: str = ""
    stderr: str = ""
    truncated: bool = False  # stdout or stderr was longer than limits.output_bytes
    seconds: float = 0.0
    isolation: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _env(work: str) -> dict[str, str]:
    # PATH and locale only, plus the folder as HOME and TMPDIR: no tokens, proxies, caches or model paths.
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": work, "TMPDIR": work,
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}


def _read_capped(proc: subprocess.Popen, report_r: int, deadline: float, cap: int):
    """Drain stdout, stderr and the report pipe until all close or the deadline passes (True: timed out)."""
    bufs = {"stdout": bytearray(), "stderr": bytearray(), "report": bytearray()}
    total = {"stdout": 0, "stderr": 0, "report": 0}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(report_r, selectors.EVENT_READ, "report")
    open_ = 3
    timed_out = False
    exited_at = None
    while open_:
        now = time.monotonic()
        if now >= deadline:
            timed_out = True
            break
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now - exited_at > 0.2:
            break  # the launcher is gone; something it left holds a pipe open: the group kill below ends it
        for key, _ in sel.select(timeout=min(0.05, deadline - now)):
            fd = key.fd if isinstance(key.fileobj, int) else key.fileobj.fileno()
            chunk = os.read(fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_ -= 1
                continue
            name = key.data
            total[name] += len(chunk)
            room = cap - len(bufs[name])
            if room > 0:
                bufs[name] += chunk[:room]
    sel.close()
    return bufs, total, timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session the child started: launcher, namespace init, the rest
    except (ProcessLookupError, PermissionError):
        pass


def _remove(path: str) -> None:
    def onerror(func, p, exc):  # the code may have made its files read-only
        try:
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


def run_python(source: str, limits: Limits | None = None, files: dict[str, str] | None = None) -> RunResult:
    """Run ``source`` in a fresh contained interpreter and classify how it ended (module docstring).

    ``files``: name → text written into the working folder first (e.g. data a test reads).
    Raises SandboxUnavailable when the containment cannot be built (never runs the code then).
    """
    lim = limits or Limits()
    work = tempfile.mkdtemp(prefix="preftune-sandbox-")  # 0700, owner only
    report_r, report_w = os.pipe()
    t0 = time.monotonic()
    try:
        for name, text in (files or {}).items():
            target = Path(work) / name
            if target.resolve().parent != Path(work).resolve():
                raise ValueError(f"sandbox file name {name!r} must be a plain name")
            target.write_text(text, encoding="utf-8")
        job = json.dumps({"source": source, "workdir": os.path.realpath(work), "limits": lim.child_view()})
        proc = subprocess.Popen(
            [sys.executable, "-s", "-S", "-B", "-c", _BOOT, str(CHILD), str(report_w)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(report_w,), cwd=work, env=_env(work),
            start_new_session=True, close_fds=True)
        os.close(report_w)
        report_w = -1
        deadline = t0 + lim.wall_seconds

        def feed() -> None:  # a thread: a large job must not block reading the child's output
            try:
                proc.stdin.write(job.encode("utf-8"))
                proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        bufs, total, timed_out = _read_capped(proc, report_r, deadline, lim.output_bytes)
        _kill_group(proc)
        rc = proc.wait()
        feeder.join(timeout=1)
        proc.stdout.close()
        proc.stderr.close()
    finally:
        if report_w >= 0:
            os.close(report_w)
        os.close(report_r)
        _remove(work)
    seconds = time.monotonic() - t0
    report = _parse_report(bytes(bufs["report"]))
    if report.get("refused"):
        raise SandboxUnavailable(report["refused"])
    stdout = bufs["stdout"].decode("utf-8", "replace")
    stderr = bufs["stderr"].decode("utf-8", "replace")
    common = {"stdout": stdout, "stderr": stderr, "seconds": seconds, "isolation": report.get("layers", {}),
              "truncated": total["stdout"] > lim.output_bytes or total["stderr"] > lim.output_bytes}
    if timed_out:
        return RunResult("timeout", f"wall time over {lim.wall_seconds:g} s", signal=signal.SIGKILL, **common)
    if rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return RunResult("timeout", f"CPU time over {lim.cpu_seconds} s", signal=sig, **common)
        if sig == signal.SIGXFSZ:
            return RunResult("killed", f"file size over {lim.file_bytes} bytes", signal=sig, **common)
        return RunResult("killed", f"signal {signal.Signals(sig).name}", signal=sig, **common)
    if rc == _SETUP:
        raise SandboxUnavailable(f"the sandbox could not be built: {stderr.strip()[-500:]}")
    if rc in _CODES:
        status, reason = _CODES[rc]
        if status in ("failed", "blocked"):
            reason = _last_line(stderr) or reason
        return RunResult(status, reason, exit_code=rc, **common)
    return RunResult("failed", f"exit status {rc}", exit_code=rc, **common)


def _parse_report(raw: bytes) -> dict:
    try:
        return json.loads(raw.decode("utf-8").splitlines()[0]) if raw.strip() else {}
    except (ValueError, IndexError):
        return {}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def probe(limits: Limits | None = None) -> dict[str, Any]:
    """The layers this machine grants (one trivial run), e.g. for a run's log."""
    lim = limits or Limits(wall_seconds=5.0)
    return run_python("pass", Limits(**{**asdict(lim), "unsafe_local_exec": True})).isolation


class Sandbox:
    """Many runs: a bounded pool of child processes and a cache keyed by (source hash, limits).

    Each run is one child process; the threads only wait on them, so ``workers`` is how many children
    run at once (keep it at or below the free cores).
    """

    def __init__(self, limits: Limits | None = None, workers: int = 1):
        self.limits = limits or Limits()
        self.workers = max(1, int(workers))
        self._cache: dict[str, RunResult] = {}
        self._lock = threading.Lock()
        self.runs = 0  # processes started (cache misses)

    def key(self, source: str) -> str:
        return hashlib.sha256((json.dumps(asdict(self.limits), sort_keys=True) + "\0" + source).encode()).hexdigest()

    def run(self, source: str) -> RunResult:
        k = self.key(source)
        with self._lock:
            hit = self._cache.get(k)
        if hit is not None:
            return hit
        res = run_python(source, self.limits)
        with self._lock:
            self._cache[k] = res
            self.runs += 1
        return res

    def run_many(self, sources: list[str]) -> list[RunResult]:
        unique = list(dict.fromkeys(sources))  # a source repeated in one call runs once, not once per thread
        if self.workers == 1 or len(unique) < 2:
            done = {s: self.run(s) for s in unique}
        else:
            with ThreadPoolExecutor(self.workers) as pool:
                done = dict(zip(unique, pool.map(self.run, unique), strict=True))
        return [done[s] for s in sources]
