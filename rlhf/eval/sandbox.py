"""Run untrusted Python (a generated program plus its tests) and say whether it passed.

Defences, outermost first:

* The child is a fresh interpreter (`python -I -S`) in its own session and process group, in a
  temporary working directory that is removed afterwards, with an environment built from scratch
  (nothing of the parent's environment, secrets included, reaches it).
* Private namespaces, made in the child before the program loads: network (no interface but a
  loopback that is down); mounts, where /tmp (holding the working folder), /var/tmp and /dev/shm are
  fresh size- and file-count-capped tmpfs mounts and every other mount is read-only, so no
  world-writable place stays writable and nothing written outside the working folder survives the
  run; IPC, so System V objects and POSIX message queues die with it. A seccomp filter makes the
  kernel-key syscalls fail (keys outlive their process). Where the kernel refuses any of this, runs
  raise SandboxUnavailable unless weaker isolation was accepted (SandboxLimits.unsafe or
  $RLHF_UNSAFE_SANDBOX=1): then only the network namespace and the uid drop below apply, with a warning.
* Running as root, the child drops to a fresh, otherwise unused uid/gid for this run only, with
  no_new_privs set. The fresh uid means it cannot signal any other process, cannot write files it
  does not own, and makes RLIMIT_NPROC count only this run's processes, which caps a fork bomb.
  After the run, every process that still carries that uid is killed, including any that left
  the process group with setsid(). Without root, a user namespace makes the namespaces above and the
  program keeps the caller's uid.
* resource limits in the child: address space, CPU seconds, file size, open files, processes,
  no core files.
* In-process guards before the program loads: the functions that fork, exec, kill, delete,
  rename, change permissions or open sockets are removed. They stop honest mistakes cheaply; the
  OS-level layers above stop a program that goes around them.
* Output is read by the parent with a byte cap per stream; a child that exceeds it is killed, so
  printing a gigabyte costs a few milliseconds and a megabyte of memory.

A pass is proven positively. The parent writes a random nonce into a pipe before starting the
child; the runner reads it only after the program (tests included) finished without raising, and
writes it back on a second pipe. Exiting early (sys.exit, os._exit, a signal, closing fds) never
produces the nonce. The program shares the runner's interpreter, so deliberately hostile code that
reads the nonce pipe itself could forge a pass; the harness defends the machine against such code,
and scores honest mistakes (including early exits) correctly.
"""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

# Statuses a run can end in. Only PASSED counts as a pass.
PASSED = "passed"
FAILED = "failed"  # ran to the end without the pass proof: an exception, an early exit, a signal
TIMEOUT = "timeout"  # still running at the wall-clock limit
OUTPUT_LIMIT = "output_limit"  # wrote more than the byte cap to stdout or stderr
ERROR = "error"  # the harness could not run it at all


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use."""

    timeout_s: float = 5.0  # wall-clock limit for the whole run
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    cpu_s: int | None = None  # CPU seconds per process (RLIMIT_CPU); default ceil(timeout) + 1
    file_size_mb: int = 16  # largest file it may write (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 32  # tasks (processes and threads) of the run's uid (RLIMIT_NPROC); root only
    output_bytes: int = 1 << 20  # cap on each of stdout and stderr; beyond it the run is killed
    drop_privileges: bool = True  # OS layers: namespaces, (as root) a fresh uid, no_new_privs
    scratch_mb: int = 64  # size of each private tmpfs: /tmp (holding the working folder), /var/tmp, /dev/shm
    scratch_files: int = 4096  # files and folders each private tmpfs may hold (its nr_inodes)
    unsafe: bool = False  # where the kernel refuses namespaces, run without them (warned) instead of refusing


@dataclass(frozen=True)
class SandboxResult:
    """The outcome of one run."""

    status: str  # one of PASSED, FAILED, TIMEOUT, OUTPUT_LIMIT, ERROR
    passed: bool  # status == PASSED: the program and its tests ran to the end
    returncode: int | None  # None when the harness killed it or could not start it
    duration_s: float  # wall-clock seconds from spawn to the end of clean-up
    stdout: str = ""  # at most limits.output_bytes of it
    stderr: str = ""  # at most limits.output_bytes of it
    truncated: bool = False  # an output stream hit the cap
    extra: dict = field(default_factory=dict)  # "uid": the run's uid (None without the drop), ...

    def to_dict(self) -> dict:
        return asdict(self)

    def tail(self, chars: int = 400) -> str:
        """The end of stderr (else stdout): where a traceback or the last output is."""
        text = self.stderr or self.stdout
        return text[-chars:]


# The runner: the first code the child executes. It receives its settings as argv[1] (nothing
# secret in them) and the nonce on a pipe that it reads only after the program finished.
_RUNNER = r"""
import os, sys
def _runner():
    import json, resource, types, builtins
    cfg = json.loads(sys.argv[1])
    read, write, exit_ = os.read, os.write, os._exit
    libc = None
    def fail(what):
        write(cfg["result_fd"], ("!setup: %s" % what).encode())
        exit_(1)
    if cfg["uid"] is not None or cfg["userns"] or cfg["private"] or cfg["seccomp"]:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    with open(cfg["program"], encoding="utf-8") as f:  # before a private /tmp hides the parent's copy
        source = f.read()
    program = cfg["program"]
    def mount(source_, target, fstype, flags, data):
        if libc.mount(source_, target.encode(), fstype, flags, data) != 0:
            fail("mount %s: %s" % (target, os.strerror(ctypes.get_errno())))
    def private_mounts(owner):
        # Nothing below propagates back to the parent's mounts.
        mount(None, "/", None, 0x4000 | 0x40000, None)  # MS_REC | MS_PRIVATE
        seen = []
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                fstype = fields[fields.index(b"-") + 1]
                point = fields[4].decode("unicode_escape")  # \040 and friends
                seen.append((point, fstype))
        scratch = cfg["private"]["scratch"]
        opts = ("size=%dk,nr_inodes=%d,mode=1777" % (cfg["private"]["size_kb"], cfg["private"]["inodes"])).encode()
        for path in scratch:  # fresh, size-capped, gone when the run's last process exits
            mount(b"tmpfs", path, b"tmpfs", 0x2 | 0x4, opts)  # MS_NOSUID | MS_NODEV
        # Every other mount becomes read-only in this namespace (its flags kept, which a user namespace
        # requires): no world-writable place outside the private ones stays writable.
        kernel = (b"proc", b"sysfs", b"cgroup", b"cgroup2", b"devpts")
        for point, fstype in seen:
            if fstype in kernel or point.startswith(("/proc/", "/sys/")):
                continue  # files the run's uid may write there are its own process's, gone with it
            if any(point == p or point.startswith(p + "/") for p in scratch):
                continue
            try:
                st = os.statvfs(point)
            except OSError:
                continue  # hidden under another mount or gone: not reachable by the program
            if st.f_flag & 0x1:  # ST_RDONLY already
                continue
            keep = st.f_flag & (0x2 | 0x4 | 0x8 | 0x400 | 0x800)  # nosuid nodev noexec noatime nodiratime
            if st.f_flag & 0x1000:
                keep |= 1 << 21  # ST_RELATIME -> MS_RELATIME
            mount(None, point, None, 0x20 | 0x1000 | 0x1 | keep, None)  # MS_REMOUNT | MS_BIND | MS_RDONLY
        workdir = cfg["private"]["workdir"]
        os.mkdir(workdir, 0o700)
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        os.chmod(path, 0o444)
        if owner is not None:
            os.chown(workdir, owner, owner)
        os.chdir(workdir)
        return path
    if cfg["uid"] is not None or cfg["private"]:
        # The interpreter may live under a directory only root can traverse (/root/...) or under a
        # folder a private mount hides (/tmp/...). Open its import directories now and import
        # through /proc/self/fd/N, which reaches an open directory without searching its parents.
        moved = {}
        for entry in sys.path:
            try:
                moved[entry] = "/proc/self/fd/%d" % os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                pass
        sys.path[:] = list(moved.values())
        for module in list(sys.modules.values()):  # packages imported already find submodules
            search = getattr(module, "__path__", None)  # through __path__: move those too
            if type(search) is list:
                for i, entry in enumerate(search):
                    for old in sorted(moved, key=len, reverse=True):
                        if entry == old or entry.startswith(old + "/"):
                            search[i] = moved[old] + entry[len(old):]
                            break
        sys.path_importer_cache.clear()
    if cfg["uid"] is not None or cfg["userns"] or cfg["private"]:
        flags = 0x40000000  # CLONE_NEWNET
        if cfg["userns"]:
            flags |= 0x10000000  # CLONE_NEWUSER: lets a non-root user make the namespaces below
        if cfg["private"]:
            flags |= cfg["namespaces"]  # CLONE_NEWNS | CLONE_NEWIPC
        if libc.unshare(flags) != 0 and (cfg["uid"] is not None or cfg["private"]):
            fail("unshare(0x%x) refused: %s" % (flags, os.strerror(ctypes.get_errno())))
        if cfg["userns"] and cfg["private"]:  # keep our own ids inside the user namespace
            uid, gid = os.getuid(), os.getgid()
            for name, text in (("setgroups", "deny"), ("uid_map", "%d %d 1" % (uid, uid)),
                               ("gid_map", "%d %d 1" % (gid, gid))):
                with open("/proc/self/" + name, "w") as f:
                    f.write(text)
        if cfg["private"]:
            program = private_mounts(cfg["uid"])
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    if libc is not None:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries gain nothing
    if cfg["seccomp"]:
        # Kernel keys outlive their process (a persistent keyring for days) and no namespace here holds them:
        # their three syscalls fail with EPERM. Another ABI (i386 via int 0x80, x32) could reach them under
        # other numbers, so its calls fail too.
        arch, denied = cfg["seccomp"]
        def op(code, k, jt=0, jf=0):
            return (code, jt, jf, k)
        errno_eperm, allow = 0x00050000 | 1, 0x7FFF0000  # SECCOMP_RET_ERRNO | EPERM, SECCOMP_RET_ALLOW
        prog = [op(0x20, 4), op(0x15, arch, 1, 0), op(0x06, errno_eperm),  # ld arch; foreign arch -> EPERM
                op(0x20, 0), op(0x35, 0x40000000, 0, 1), op(0x06, errno_eperm)]  # ld nr; x32 -> EPERM
        for i, nr in enumerate(denied):
            prog.append(op(0x15, nr, len(denied) - i, 0))  # jump to the EPERM below
        prog += [op(0x06, allow), op(0x06, errno_eperm)]
        class Filter(ctypes.Structure):
            _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                        ("k", ctypes.c_uint)]
        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]
        filters = (Filter * len(prog))(*[Filter(*f) for f in prog])
        fprog = Program(len(prog), filters)
        if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
            fail("seccomp refused: %s" % os.strerror(ctypes.get_errno()))
    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    for name in cfg["blocked_os"]:
        if hasattr(os, name):
            setattr(os, name, None)
    for name in cfg["blocked_modules"]:
        sys.modules[name] = None
    main = types.ModuleType("__main__")
    main.__file__ = program
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = [program]
    try:
        exec(compile(source, program, "exec"), main.__dict__)
    except BaseException:
        import traceback
        traceback.print_exc()
        exit_(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        exit_(1)
    nonce = read(cfg["nonce_fd"], 256)
    write(cfg["result_fd"], nonce)
    exit_(0)
_runner()
"""


# Functions of `os` removed before the program runs.
_BLOCKED_OS = (
    "system", "popen", "fork", "forkpty", "kill", "killpg",
    "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
    "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
    "posix_spawn", "posix_spawnp",
    "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
    "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "link", "symlink",
    "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setsid", "setpgid",
    "putenv", "unsetenv",
)
# Modules made unimportable before the program runs.
_BLOCKED_MODULES = (
    "socket", "_socket", "ssl", "subprocess", "_posixsubprocess", "multiprocessing",
    "ctypes", "_ctypes", "pty",
)

# Namespaces a run gets besides the network one: mounts (its private /tmp, /var/tmp, /dev/shm and a
# read-only view of every other mount) and System V IPC / POSIX message queues (which otherwise
# outlive the process that made them).
_PRIVATE_NAMESPACES = 0x00020000 | 0x08000000  # CLONE_NEWNS | CLONE_NEWIPC
_SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # replaced by a fresh size-capped tmpfs in each run
# (AUDIT_ARCH, numbers of add_key, request_key, keyctl) per machine: kernel keys survive the run.
_KEY_SYSCALLS = {"x86_64": (0xC000003E, (248, 249, 250)), "aarch64": (0xC00000B7, (217, 218, 219))}
UNSAFE_ENV = "RLHF_UNSAFE_SANDBOX"  # "1": as SandboxLimits.unsafe, for runs started by name (reward fns)

_uids_in_use: set[int] = set()
_uid_lock = threading.Lock()
_isolation: tuple[bool, bool, str] | None = None  # (uid drop works, private namespaces work, why not)
_probe_lock = threading.Lock()
_warned: set[str] = set()


class SandboxUnavailable(RuntimeError):
    """The kernel refuses the namespaces the sandbox needs, and weaker isolation was not accepted."""


def _is_root() -> bool:
    return os.geteuid() == 0


def _fresh_uid() -> int:
    """A uid no account and no other run uses: a random one in a range real systems leave empty."""
    with _uid_lock:
        while True:
            uid = secrets.randbelow(1 << 30) + (1 << 30)  # [2^30, 2^31)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _release_uid(uid: int | None) -> None:
    if uid is not None:
        with _uid_lock:
            _uids_in_use.discard(uid)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _probe_isolation() -> tuple[bool, bool, str]:
    """What this machine allows, tried once with a trivial program: (uid drop, private namespaces, why).

    The uid drop fails where the interpreter or its standard library is readable by root only; the
    namespaces fail where the kernel (or a container's seccomp policy) refuses unshare or mount.
    """
    probe, limits = "import json, math, collections\n", SandboxLimits(timeout_s=10.0)
    root = _is_root()
    first = _run(probe, b"", limits, drop=root, private=True)
    if first.passed:
        return root, True, ""
    if root and _run(probe, b"", limits, drop=False, private=True).passed:
        return False, True, f"{first.status}: {first.tail(200)!r}"
    why = first.extra.get("setup_error") or f"{first.status}: {first.tail(200)!r}"
    return root and _run(probe, b"", limits, drop=True, private=False).passed, False, why


def _isolation_for(limits: SandboxLimits) -> tuple[bool, bool]:
    """(drop the uid, private namespaces) for a run; raises SandboxUnavailable, or warns once and
    runs weaker when `limits.unsafe` (or $RLHF_UNSAFE_SANDBOX=1) accepts it."""
    global _isolation
    if not limits.drop_privileges:
        return False, False
    with _probe_lock:
        if _isolation is None:
            _isolation = _probe_isolation()
    drop, private, why = _isolation
    if _is_root() and not drop:
        _warn_once(f"sandbox: cannot run the interpreter as an unprivileged uid ({why}); running without "
                   "the uid drop")
    if private:
        return drop, True
    if not (limits.unsafe or os.environ.get(UNSAFE_ENV) == "1"):
        raise SandboxUnavailable(
            f"the kernel refuses the namespaces that give each program a private /tmp ({why}); "
            f"pass --unsafe-sandbox (or set {UNSAFE_ENV}=1) to run programs with weaker isolation")
    _warn_once(f"sandbox: running programs without private /tmp, /var/tmp and /dev/shm ({why}): files they "
               "write there outlive the run")
    return drop, False


def check_isolation(unsafe: bool = False) -> None:
    """Raise SandboxUnavailable now (before any model is loaded) if programs cannot run isolated."""
    _isolation_for(SandboxLimits(unsafe=unsafe))


def _scratch_dirs() -> list[str]:
    out = []
    for path in _SCRATCH_DIRS:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in out:
            out.append(real)
    return out


def _rlimits(limits: SandboxLimits, drop: bool) -> list[tuple[str, int, int]]:
    cpu = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
    mb = 1 << 20
    out = [
        ("RLIMIT_AS", limits.memory_mb * mb, limits.memory_mb * mb),
        ("RLIMIT_CPU", cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard one
        ("RLIMIT_FSIZE", limits.file_size_mb * mb, limits.file_size_mb * mb),
        ("RLIMIT_NOFILE", limits.open_files, limits.open_files),
        ("RLIMIT_CORE", 0, 0),
    ]
    if drop:  # for our own uid it would count every process we own, not just this run's
        out.append(("RLIMIT_NPROC", limits.processes, limits.processes))
    return out


def _pids_with_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real or effective uid is `uid`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue
        uids = state = None
        for line in status.splitlines():
            if line.startswith(b"State:"):
                state = line.split()[1]
            elif line.startswith(b"Uid:"):
                uids = [int(x) for x in line.split()[1:3]]
                break
        if uids and uid in uids and state != b"Z":
            pids.append(int(name))
    return pids


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the child's process group, then every process left with the run's uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet, so the pgid is ours
    except (ProcessLookupError, PermissionError):
        pass
    if uid is None:
        return
    for _ in range(200):  # a fork bomb can keep forking while we kill; it is capped by NPROC
        pids = _pids_with_uid(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)


def _exited(proc: subprocess.Popen) -> bool:
    """Whether the child has exited, without reaping it (so its pid and pgid stay reserved)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _run(program: str, stdin: bytes, limits: SandboxLimits, drop: bool, private: bool) -> SandboxResult:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="rlhf-sandbox-")
    uid = _fresh_uid() if drop else None
    nonce = secrets.token_hex(16).encode()
    nonce_r, nonce_w = os.pipe()
    result_r, result_w = os.pipe()
    proc = None
    try:
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        os.chmod(program_path, 0o444)
        scratch = _scratch_dirs()
        # With private mounts the child reads program.py before they hide this folder, and runs in a
        # folder of the same name inside its own /tmp; without them it runs here.
        rundir = os.path.join(scratch[0], os.path.basename(workdir)) if private else workdir
        if uid is not None and not private:
            os.chown(workdir, uid, uid)
        os.write(nonce_w, nonce)  # fits the pipe buffer; read by the runner only at the end
        os.close(nonce_w)
        nonce_w = -1
        config = {
            "uid": uid,
            "userns": not _is_root(),
            "namespaces": _PRIVATE_NAMESPACES,
            "seccomp": _KEY_SYSCALLS.get(platform.machine()) if private else None,
            "private": {"scratch": scratch, "size_kb": limits.scratch_mb * 1024, "inodes": limits.scratch_files,
                        "workdir": rundir} if private else None,
            "program": program_path,
            "nonce_fd": nonce_r,
            "result_fd": result_w,
            "rlimits": _rlimits(limits, drop),
            "blocked_os": _BLOCKED_OS,
            "blocked_modules": _BLOCKED_MODULES,
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": rundir, "TMPDIR": rundir, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _RUNNER, json.dumps(config)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=workdir, env=env, start_new_session=True, pass_fds=(nonce_r, result_w),
            )
        except OSError as e:
            return SandboxResult(ERROR, False, None, time.monotonic() - start, stderr=repr(e))
        os.close(nonce_r)
        os.close(result_w)
        nonce_r = result_w = -1
        status, outputs, truncated = _communicate(proc, stdin, result_r, limits, start)
        _kill_all(proc, uid)
        returncode = proc.wait()
        if status is None:
            proven = outputs["result"] == nonce
            if outputs["result"].startswith(b"!setup"):  # written before the program could run
                status = ERROR
            else:
                status = PASSED if (returncode == 0 and proven) else FAILED
        return SandboxResult(
            status=status,
            passed=status == PASSED,
            returncode=returncode if status in (PASSED, FAILED, ERROR) else None,
            duration_s=time.monotonic() - start,
            stdout=outputs["stdout"].decode("utf-8", "replace"),
            stderr=outputs["stderr"].decode("utf-8", "replace"),
            truncated=truncated,
            extra={"uid": uid, "private": private, **({"setup_error": outputs["result"][1:].decode("utf-8", "replace")}
                                  if status == ERROR else {})},
        )
    finally:
        for fd in (nonce_r, nonce_w, result_r, result_w):
            if fd >= 0:
                os.close(fd)
        if proc is not None and proc.returncode is None:
            _kill_all(proc, uid)
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        _release_uid(uid)


def _communicate(
    proc: subprocess.Popen, stdin: bytes, result_r: int, limits: SandboxLimits, start: float
) -> tuple[str | None, dict[str, bytes], bool]:
    """Feed stdin and collect the capped outputs until the child exits or breaks a limit.

    Returns (status, outputs, truncated); status is None when the child exited by itself.
    """
    caps = {"stdout": limits.output_bytes, "stderr": limits.output_bytes, "result": 256}
    buffers = {name: bytearray() for name in caps}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    sel.register(result_r, selectors.EVENT_READ, "result")
    pending = memoryview(stdin)
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE, "stdin")
    else:
        proc.stdin.close()
    deadline = start + limits.timeout_s
    status = None
    truncated = False
    exited_at = None
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and _exited(proc):
                exited_at = now
            # After the runner exits only leftovers of descendants can keep a pipe open; give
            # buffered bytes a moment to drain, then stop.
            if exited_at is not None and (not sel.get_map() or now - exited_at > 0.2):
                break
            if now >= deadline:
                status = TIMEOUT
                break
            if not sel.get_map():  # every pipe closed: the runner is exiting, poll for it briefly
                time.sleep(0.001)
                continue
            events = sel.select(timeout=min(deadline - now, 0.05))
            for key, _ in events:
                name = key.data
                if name == "stdin":
                    try:
                        written = os.write(key.fd, pending[:65536])
                    except BlockingIOError:
                        written = 0
                    except OSError:  # the child closed its stdin: the rest is not wanted
                        written = len(pending)
                    pending = pending[written:]
                    if not pending:
                        sel.unregister(key.fileobj)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                room = caps[name] - len(buffers[name])
                buffers[name] += chunk[:room]
                if len(chunk) > room:
                    truncated = True
                    if name != "result":
                        status = OUTPUT_LIMIT
            if status is not None:
                break
    finally:
        sel.close()
        if proc.stdin and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
    return status, {k: bytes(v) for k, v in buffers.items()}, truncated


def run_program(
    program: str, stdin: str | bytes = b"", limits: SandboxLimits | None = None
) -> SandboxResult:
    """Run `program` (Python source) in the sandbox, feeding it `stdin`; see the module doc."""
    limits = limits or SandboxLimits()
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    drop, private = _isolation_for(limits)
    return _run(program, stdin, limits, drop, private)


def run_programs(
    programs: Sequence[str],
    stdins: Sequence[str | bytes] | None = None,
    limits: SandboxLimits | None = None,
    workers: int | None = None,
) -> list[SandboxResult]:
    """Run many programs in parallel (a thread per running sandbox); results keep input order."""
    stdins = list(stdins) if stdins is not None else [b""] * len(programs)
    if len(stdins) != len(programs):
        raise ValueError(f"{len(programs)} programs but {len(stdins)} stdins")
    workers = max(1, workers or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda ps: run_program(ps[0], ps[1], limits), zip(programs, stdins)))
