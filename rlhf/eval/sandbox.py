"""Run untrusted Python (a generated program plus its tests) and say whether it passed.

Defences, outermost first:

* The child is a fresh interpreter (`python -I -S`) in its own session and process group, in a
  temporary working directory that is removed afterwards, with an environment built from scratch
  (nothing of the parent's environment, secrets included, reaches it).
* Running as root, the child drops to a fresh, otherwise unused uid/gid for this run only, after
  moving into a new network namespace (no interface but a loopback that is down) and with
  no_new_privs set. The fresh uid means it cannot signal any other process, cannot write files it
  does not own, and makes RLIMIT_NPROC count only this run's processes, which caps a fork bomb.
  After the run, every process that still carries that uid is killed, including any that left
  the process group with setsid().
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

Without root the OS-level identity change and network namespace are skipped (a user namespace is
tried for the network namespace); the remaining layers still apply.
"""

from __future__ import annotations

import json
import math
import os
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
    drop_privileges: bool = True  # as root: fresh uid, network namespace, no_new_privs


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
    if cfg["uid"] is not None or cfg["userns"]:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
    if cfg["uid"] is not None:
        if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
            write(cfg["result_fd"], b"!setup: unshare failed")
            exit_(1)
        # The interpreter may live under a directory only root can traverse (/root/...). Open
        # its import directories now and import through /proc/self/fd/N, which reaches an open
        # directory without searching its parents.
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
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    elif cfg["userns"]:
        libc.unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET; best effort
    if libc is not None:
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: setuid binaries gain nothing
    for name, soft, hard in cfg["rlimits"]:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    for name in cfg["blocked_os"]:
        if hasattr(os, name):
            setattr(os, name, None)
    for name in cfg["blocked_modules"]:
        sys.modules[name] = None
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    main = types.ModuleType("__main__")
    main.__file__ = cfg["program"]
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    sys.argv = [cfg["program"]]
    try:
        exec(compile(source, cfg["program"], "exec"), main.__dict__)
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

_uids_in_use: set[int] = set()
_uid_lock = threading.Lock()
_drop_probe: bool | None = None
_probe_lock = threading.Lock()


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


def _can_drop_privileges() -> bool:
    """Whether a child can run this interpreter after dropping to a fresh uid (checked once).

    It cannot where the interpreter or its standard library is readable by root only; then the
    sandbox falls back to the non-root layers and says so once.
    """
    global _drop_probe
    with _probe_lock:
        if _drop_probe is None:
            result = _run(
                "import json, math, collections\n", b"", SandboxLimits(timeout_s=10.0), drop=True
            )
            _drop_probe = result.passed
            if not _drop_probe:
                warnings.warn(
                    "sandbox: cannot run the interpreter as an unprivileged uid "
                    f"({result.status}: {result.tail(200)!r}); running without the uid drop",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _drop_probe


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


def _run(program: str, stdin: bytes, limits: SandboxLimits, drop: bool) -> SandboxResult:
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
        if uid is not None:
            os.chown(workdir, uid, uid)
        os.write(nonce_w, nonce)  # fits the pipe buffer; read by the runner only at the end
        os.close(nonce_w)
        nonce_w = -1
        config = {
            "uid": uid,
            "userns": not _is_root(),
            "program": program_path,
            "nonce_fd": nonce_r,
            "result_fd": result_w,
            "rlimits": _rlimits(limits, drop),
            "blocked_os": _BLOCKED_OS,
            "blocked_modules": _BLOCKED_MODULES,
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
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
            extra={"uid": uid, **({"setup_error": outputs["result"][1:].decode("utf-8", "replace")}
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
    drop = limits.drop_privileges and _is_root() and _can_drop_privileges()
    return _run(program, stdin, limits, drop)


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
