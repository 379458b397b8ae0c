"""The child side of ``preftune.tasks.sandbox``: run by ``python -s -S -B -c <boot> <this file> <fd>``, never imported.

It reads one job (JSON on stdin: the source, the limits, the working folder), closes stdin, builds the
isolation layers, reports which ones it got on the report pipe, closes that pipe, and only then runs the
untrusted source in this interpreter. The outcome is the exit status (codes below); the untrusted code cannot
reach ``os._exit`` (removed) and a ``SystemExit`` it raises is a failure, so it cannot end "passed" early.

Layers, in order (each one that the machine refuses is reported, never silently assumed):
1. ``unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS)``: no network interface but a
   loopback that is down; a PID namespace whose init is the untrusted process, so when it dies (or its
   launcher dies: PR_SET_PDEATHSIG) the kernel kills every process it started, even ones that left the
   process group; the namespace's pid_max set to its floor (Linux ≥ 6.14 makes pid_max per namespace);
   a private mount namespace where every mount is re-mounted read-only except the working folder.
2. rlimits: RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE = 0 and RLIMIT_NPROC = the
   processes this user has now + the allowance (the kernel does not apply RLIMIT_NPROC to uid 0).
3. An audit hook (sys.addaudithook) that refuses writes outside the folder, process creation, signals,
   sockets, ctypes and gc introspection. It is a second layer, not a boundary: CPython's audit hooks can be
   bypassed by code that reaches native memory, which layers 1–2 contain.
Standard library only: the untrusted code runs with no site-packages on its path.
"""

import json
import os
import resource
import sys

# Exit statuses (the parent maps them; any other status, or a signal, is reported as such).
PASSED, ASSERTION, EXCEPTION, SYNTAX, MEMORY, BLOCKED, EXITED, REFUSED, SETUP = 0, 10, 11, 12, 13, 14, 15, 16, 17

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
# Flags a remount must repeat: a user namespace may add restrictions to a mount, never drop locked ones.
_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
PR_SET_PDEATHSIG = 1

# Audit events refused outright (the process, signal, network and native-code families).
_PROCESS_EVENTS = ("os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                   "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "os.setsid")
_ALWAYS_EVENTS = ("resource.setrlimit", "resource.prlimit", "gc.get_objects", "gc.get_referrers",
                  "gc.get_referents", "sys.remote_exec", "os.putenv", "os.unsetenv")
_NETWORK_PREFIX = "socket."
_NATIVE_PREFIX = "ctypes."
# Path events: (event, indices of the path arguments that must lie inside the folder).
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
                "os.symlink": (1,), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,), "os.chflags": (0,),
                "os.lchflags": (0,), "os.lchmod": (0,), "os.utime": (0,), "os.setxattr": (0,),
                "os.removexattr": (0,), "shutil.rmtree": (0,), "os.mkfifo": (0,), "os.mknod": (0,)}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    return libc, ctypes


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _unshare(libc, ctypes):
    """The namespaces this machine grants, the fullest set first: (flags granted, why not more)."""
    uid, gid = os.getuid(), os.getgid()
    why = ""
    for flags in (CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS, CLONE_NEWUSER | CLONE_NEWNET):
        if libc.unshare(flags) == 0:
            try:  # map only ourselves: the same uid/gid inside, so file ownership reads the same
                _write("/proc/self/setgroups", "deny")
                _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
                _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
            except OSError as e:
                why = f"uid map: {e}"
            return flags, why
        why = f"unshare: {os.strerror(ctypes.get_errno())}"
    return 0, why


def _nest(libc):
    # No id map inside (/proc is read-only by now): ids show as the overflow id there, while the kernel keeps
    # checking files against the real ones, so the working folder stays writable.
    return libc.unshare(CLONE_NEWUSER | CLONE_NEWNS)


def _mount(libc, ctypes, src, dst, flags):
    if libc.mount(src.encode() if src else None, dst.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def _read_only_except(libc, ctypes, work):
    """Every mount read-only in this (private) mount namespace, except a bind of the working folder."""
    _mount(libc, ctypes, None, "/", MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    _mount(libc, ctypes, work, work, MS_BIND | MS_REC)
    failed = []
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        parts = line.split()
        point = parts[4].encode().decode("unicode_escape")
        if point == work or point.startswith(work + "/"):
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for opt in parts[5].split(","):
            flags |= _MOUNT_FLAGS.get(opt, 0)
        try:
            _mount(libc, ctypes, None, point, flags)
        except OSError as e:
            failed.append(f"{point}: {e.strerror}")
    return failed


def _count_processes(uid):
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            n += int(line.split()[1]) == uid
                            break
            except OSError:
                pass
    return n


def _set_limits(lim, base_procs, root):
    cpu = int(lim["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_AS, (lim["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["file_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # RLIMIT_NPROC counts all of this user's processes, so the allowance is on top of today's count; the
    # limit only binds forks made below this process (other processes of the user keep their own limit).
    nproc = base_procs + int(lim["processes"])
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    return {"nproc": None if root else nproc}


def _inside(path, root):
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep) or real == "/dev/null"


def _make_hook(work, lim, violations):
    allow_processes = bool(lim.get("allow_processes"))
    allow_native = bool(lim.get("allow_native"))
    block_network = bool(lim.get("block_network_calls", True))
    block_writes = bool(lim.get("block_writes", True))

    def refuse(what):
        violations.append(what)
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event, args):
        if event == "open" and block_writes:
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            if isinstance(path, int) or path is None:
                return
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                (isinstance(flags, int) and flags & _WRITE_FLAGS)
            if writing and not _inside(os.fsdecode(path), work):
                refuse(f"write outside the working folder ({os.fsdecode(path)})")
        elif event in _PATH_EVENTS and block_writes:
            for i in _PATH_EVENTS[event]:
                p = args[i] if i < len(args) else None
                if isinstance(p, (str, bytes, os.PathLike)) and not _inside(os.fsdecode(p), work):
                    refuse(f"{event} outside the working folder ({os.fsdecode(p)})")
        elif event.startswith(_PROCESS_EVENTS):
            if not allow_processes:
                refuse(f"process control ({event})")
        elif event.startswith(_NETWORK_PREFIX):
            if block_network:
                refuse(f"network ({event})")
        elif event.startswith(_NATIVE_PREFIX):
            if not allow_native:
                refuse(f"native code ({event})")
        elif event.startswith(_ALWAYS_EVENTS):
            refuse(event)

    return hook


def _fork_and_wait(report_fd, relay):
    """Fork; the parent waits for the child, relays how it ended (``relay``) and never returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        return 0
    os.close(report_fd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        relay(os.WTERMSIG(status))
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else SETUP
    if code >= 128 and relay is _mirror_signal:  # the init's encoding of a signal
        _mirror_signal(code - 128)
    os._exit(code)


def _encode_signal(sig):
    # pid 1 cannot kill itself with a signal: 128 + signal, decoded by the launcher (the code cannot pick an
    # exit status: os._exit is gone and SystemExit is caught)
    os._exit(128 + sig)


def _mirror_signal(sig):
    import signal

    signal.signal(sig, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.kill(os.getpid(), sig)
    os._exit(SETUP)


def _run(source, g):
    code = compile(source, "<sandboxed>", "exec")
    exec(code, g)


def main():
    job = json.loads(sys.stdin.read())
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # stdin closed for the untrusted code (reads get EOF)
    os.close(devnull)
    report_fd = int(sys.argv[2])
    lim, work = job["limits"], job["workdir"]
    layers = {}
    try:
        root = os.getuid() == 0
        base_procs = _count_processes(os.getuid())  # before any namespace changes how ids read
        libc, ctypes = _libc()
        flags, why = _unshare(libc, ctypes) if lim.get("namespaces", True) else (0, "not asked for")
        layers["network"] = "namespace" if flags & CLONE_NEWNET else ("audit hook" if lim.get(
            "block_network_calls", True) else "none")
        if why:
            layers["namespace_error"] = why
        if flags & CLONE_NEWPID:
            # launcher (outside) -> namespace init (pid 1: a reaper) -> the untrusted process (pid 2). The code
            # is not pid 1, whose default-handled signals the kernel drops (abort() would end as SIGSEGV).
            _fork_and_wait(report_fd, relay=_mirror_signal)  # the launcher never returns from here
            libc.prctl(PR_SET_PDEATHSIG, 9)  # SIGKILL when the launcher dies (e.g. the wall-time kill)
            layers["processes"] = "pid namespace"
            try:  # a per-namespace pid_max (Linux >= 6.14) caps the namespace's processes; 301 is the floor
                _write("/proc/sys/kernel/pid_max", str(max(301, int(lim["processes"]) + 2)))
                layers["pid_max"] = max(301, int(lim["processes"]) + 2)
            except OSError as e:
                layers["pid_max"] = f"not set ({e.strerror})"
            # the init: when it exits the kernel kills everything left in the namespace
            _fork_and_wait(report_fd, relay=_encode_signal)
            libc.prctl(PR_SET_PDEATHSIG, 9)
        else:
            layers["processes"] = "process group"
        if flags & CLONE_NEWNS:
            failed = _read_only_except(libc, ctypes, work)
            layers["filesystem"] = "read-only mounts" if not failed else f"read-only except {failed}"
            # A nested user + mount namespace locks those read-only flags: the kernel refuses to clear flags on
            # mounts inherited from a namespace owned by another user namespace, capabilities or not.
            if _nest(libc) != 0:
                layers["filesystem"] += " (not locked: " + os.strerror(ctypes.get_errno()) + ")"
        else:
            layers["filesystem"] = "audit hook"
        os.chdir(work)
        layers.update(_set_limits(lim, base_procs, root))
        refuse = None
        if layers["network"] != "namespace" and not lim.get("unsafe_local_exec"):
            refuse = ("no network namespace on this machine (" + layers.get("namespace_error", "?") + "); "
                      "run with unsafe_local_exec to accept the audit hook's weaker network guard")
        os.write(report_fd, (json.dumps({"layers": layers, "refused": refuse}) + "\n").encode())
        os.close(report_fd)
        if refuse:
            sys.exit(REFUSED)
    except Exception as e:  # the sandbox could not be built: nothing untrusted has run
        sys.stderr.write(f"sandbox setup failed: {type(e).__name__}: {e}\n")
        sys.exit(SETUP)

    violations = []
    sys.addaudithook(_make_hook(os.path.realpath(work), lim, violations))
    # No way to end "passed" early: os._exit is removed (sys.exit raises SystemExit, caught below).
    import posix

    exit_now = os._exit
    for mod in (os, posix):
        if hasattr(mod, "_exit"):
            delattr(mod, "_exit")
    source = job["source"]
    del job
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    code = PASSED
    import traceback

    try:
        _run(source, g)
    except MemoryError:
        g.clear()
        code = MEMORY
    except SyntaxError:
        traceback.print_exc(limit=0)
        code = SYNTAX
    except SystemExit as e:
        sys.stderr.write(f"SystemExit({e.code!r}) raised: an early exit is a failure\n")
        code = EXITED
    except AssertionError:
        traceback.print_exc(limit=3)
        code = ASSERTION
    except BaseException:
        traceback.print_exc(limit=3)
        code = EXCEPTION
    if violations:  # a refused action counts even when the code caught the PermissionError
        sys.stderr.write("sandbox: blocked: " + violations[0] + "\n")
        code = BLOCKED
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    exit_now(code)


if __name__ == "__main__":
    main()
