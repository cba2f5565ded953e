"""The sandbox corpus: every hostile program must end as a failed sample, within its time limit,
without touching the machine; good programs around them keep passing."""

import contextlib
import ctypes
import json
import os
import platform
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pytest

from rlhf.eval import sandbox
from rlhf.eval.sandbox import (
    FAILED,
    OUTPUT_LIMIT,
    PASSED,
    TIMEOUT,
    SandboxLimits,
    SandboxUnavailable,
    _pids_with_uid,
    run_program,
    run_programs,
)

QUICK = SandboxLimits(timeout_s=1.0)
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the OS-level layers (fresh uid, netns) need root")

# Hostile code that first goes around the in-process guards: `posix` holds the real fork/kill/unlink,
# and dropping the None placeholders from sys.modules makes socket importable again. Only the
# OS-level layers stand in its way.
UNGUARD = (
    "import sys, posix\n"
    "for name in ('socket', '_socket', 'ctypes', '_ctypes', 'subprocess', '_posixsubprocess'):\n"
    "    sys.modules.pop(name, None)\n"
)
TESTS = "\nassert add(2, 3) == 5\n"  # what a harness appends after the completion
GOOD = "def add(a, b):\n    return a + b\n" + TESTS


def leftover_pids(result) -> list[int]:
    """Live processes still running as the run's own uid."""
    return _pids_with_uid(result.extra["uid"]) if result.extra.get("uid") is not None else []


def assert_failed_fast(result, limits=QUICK):
    assert not result.passed
    assert result.status != PASSED
    # the wall-clock limit plus the time to kill and reap every process (slower on a loaded machine)
    assert result.duration_s < limits.timeout_s + 3.0, result
    assert leftover_pids(result) == []


def test_good_program_passes_and_bad_assert_fails():
    good = run_program(GOOD)
    assert good.status == PASSED and good.passed and good.returncode == 0
    bad = run_program("def add(a, b):\n    return a - b\n" + TESTS)
    assert bad.status == FAILED and "AssertionError" in bad.stderr


def test_stdin_is_fed_and_stdout_captured():
    result = run_program("a, b = map(int, input().split())\nprint(a * b)\n", stdin="6 7\n")
    assert result.passed and result.stdout == "42\n"


@pytest.mark.parametrize(
    "program",
    ["import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n",
     "exit(0)\n"],
    ids=["sys.exit", "os._exit", "SystemExit", "builtin-exit"],
)
def test_exit_before_tests_is_not_a_pass(program):
    # The tests after the early exit would fail; exiting 0 before them must not count as a pass.
    result = run_program(program + "assert False\n", limits=QUICK)
    assert result.status == FAILED
    assert_failed_fast(result)


def test_infinite_loop_times_out():
    result = run_program("while True:\n    pass\n", limits=QUICK)
    assert result.status == TIMEOUT
    assert QUICK.timeout_s <= result.duration_s < QUICK.timeout_s + 1.0
    assert_failed_fast(result)


def test_fork_bomb_with_guards():
    result = run_program("import os\nwhile True:\n    os.fork()\n", limits=QUICK)
    assert_failed_fast(result)


@needs_root
def test_fork_bomb_around_guards_is_capped_and_reaped():
    # Each child leaves the process group, so only the uid sweep can find it.
    program = UNGUARD + (
        "while True:\n"
        "    try:\n"
        "        if posix.fork() == 0:\n"
        "            posix.setsid()\n"
        "    except OSError:\n"
        "        pass\n"
    )
    result = run_program(program, limits=QUICK)
    assert result.status == TIMEOUT
    assert_failed_fast(result)


@needs_root
def test_daemon_left_behind_is_killed():
    program = UNGUARD + (
        "import time\n"
        "if posix.fork() == 0:\n"
        "    posix.setsid()\n"
        "    time.sleep(30)\n"
    )
    result = run_program(program, limits=QUICK)
    assert result.extra["uid"] is not None and leftover_pids(result) == []


@pytest.mark.parametrize(
    "program",
    ["x = bytearray(10 * 1024 ** 3)\n", "x = [0] * (10 * 1024 ** 3 // 8)\n",
     "import mmap\nm = mmap.mmap(-1, 10 * 1024 ** 3)\nm[-1] = 1\n"],
    ids=["bytearray", "list", "mmap"],
)
def test_allocating_10_gb_fails(program):
    result = run_program(program, limits=QUICK)
    assert result.status == FAILED
    assert_failed_fast(result)


@pytest.fixture
def public_dir():
    """A folder any user can reach (pytest's own tmp root is private to root), as a checkout is."""
    path = tempfile.mkdtemp(prefix="rlhf-sentinel-")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path)


@pytest.mark.parametrize("around_guards", [False, pytest.param(True, marks=needs_root)])
def test_files_outside_the_sandbox_are_untouched(tmp_path, public_dir, around_guards):
    folders = [tmp_path / "outside", public_dir]
    folders[0].mkdir()
    for folder in folders:
        (folder / "sentinel.txt").write_text("keep me")
    attack = (
        (UNGUARD + "unlink, rename = posix.unlink, posix.rename\n" if around_guards
         else "import os\nunlink, rename = os.unlink, os.rename\n")
        + "errors = 0\n"
        f"for folder in {[str(f) for f in folders]!r}:\n"
        "    path = folder + '/sentinel.txt'\n"
        "    for attempt in (lambda: open(path, 'w').write('owned'),\n"
        "                    lambda: unlink(path),\n"
        "                    lambda: rename(path, path + '.moved'),\n"
        "                    lambda: open(folder + '/new.txt', 'w').write('x')):\n"
        "        try:\n"
        "            attempt()\n"
        "        except Exception:\n"
        "            errors += 1\n"
        "assert errors == 0\n"
    )
    result = run_program(attack, limits=QUICK)
    assert_failed_fast(result)
    for folder in folders:
        assert (folder / "sentinel.txt").read_text() == "keep me"
        assert sorted(p.name for p in folder.iterdir()) == ["sentinel.txt"]


def test_the_working_directory_is_private_and_removed():
    result = run_program("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())\n")
    assert result.passed
    workdir = result.stdout.strip()
    assert workdir.startswith("/") and not os.path.exists(workdir)


@pytest.mark.parametrize("around_guards", [False, pytest.param(True, marks=needs_root)])
def test_network_connection_never_arrives(around_guards):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    program = (UNGUARD if around_guards else "") + (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "s.sendall(b'leak')\n"
    )
    try:
        result = run_program(program, limits=QUICK)
        assert_failed_fast(result)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


@pytest.mark.parametrize(
    "attack",
    [
        "import os\nos.kill(os.getppid(), 9)\n",
        "import os\nos.killpg(os.getpgid(os.getppid()), 9)\n",
        pytest.param(UNGUARD + "posix.kill(posix.getppid(), 9)\n", marks=needs_root),
        pytest.param(UNGUARD + "posix.killpg(posix.getpgid(posix.getppid()), 9)\n",
                     marks=needs_root),
        pytest.param(UNGUARD + "posix.kill(-1, 9)\n", marks=needs_root),
    ],
    ids=["kill", "killpg", "posix.kill", "posix.killpg", "kill-all"],
)
def test_killing_the_parent_fails_and_we_survive(attack):
    # A "solution" that attacks and then meets the tests without defining add: a failed sample.
    result = run_program(attack + "import time\ntime.sleep(0.2)\n" + TESTS, limits=QUICK)
    assert_failed_fast(result)
    # Still here: this process was not killed. Its group is intact too.
    assert os.getpgid(0) == os.getpgrp()


@pytest.mark.parametrize(
    "program",
    ["import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n",
     "import os\nchunk = b'y' * (1 << 20)\nfor _ in range(1024):\n    os.write(2, chunk)\n",
     "print('z' * (1 << 30))\n"],
    ids=["stdout-1gb", "stderr-1gb", "one-1gb-string"],
)
def test_printing_1_gb_is_cut_off(program):
    limits = SandboxLimits(timeout_s=3.0, output_bytes=64 * 1024)
    start = time.monotonic()
    result = run_program(program, limits=limits)
    assert time.monotonic() - start < 2.0
    assert result.status in (OUTPUT_LIMIT, FAILED)
    assert len(result.stdout) <= 64 * 1024 and len(result.stderr) <= 64 * 1024
    assert_failed_fast(result, limits)


def test_parent_secret_is_not_visible(monkeypatch):
    monkeypatch.setenv("RLHF_TEST_SECRET", "hunter2-secret")
    program = (
        "import os\n"
        "print(dict(os.environ))\n"
        "try:\n"
        "    print(open('/proc/%d/environ' % os.getppid(), 'rb').read())\n"
        "except OSError as e:\n"
        "    print('denied', e)\n"
    )
    result = run_program(program)
    assert result.passed
    assert "hunter2" not in result.stdout and "RLHF_TEST_SECRET" not in result.stdout
    if ROOT:
        assert "denied" in result.stdout


@needs_root
def test_runs_as_an_unprivileged_fresh_uid():
    result = run_program("import os\nprint(os.getuid(), os.getgid(), os.getgroups())\n")
    uid, gid, groups = result.stdout.split(" ", 2)
    assert int(uid) >= 1 << 30 and int(gid) == int(uid) and groups.strip() == "[]"


def test_mixed_batch_good_ones_still_pass():
    hostile = [
        "while True:\n    pass\n",
        "import os\nwhile True:\n    os.fork()\n",
        "x = bytearray(10 * 1024 ** 3)\n",
        "import sys\nsys.exit(0)\n" + TESTS,
        "import sys\nfor _ in range(10 ** 6):\n    print('x' * 1000)\n",
        "def add(a, b):\n    return a * b\n" + TESTS,
    ]
    if ROOT:
        hostile.append(UNGUARD + "while True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n")
    programs = []
    for bad in hostile:
        programs += [GOOD, bad]
    results = run_programs(programs, limits=QUICK, workers=2)
    assert [r.passed for r in results] == [True, False] * len(hostile)
    assert all(leftover_pids(r) == [] for r in results)
    # ...and the harness keeps working afterwards.
    assert run_program(GOOD).passed


@pytest.mark.parametrize(
    "program",
    ["import os\nos.fork()\n", "import os\nos.kill(os.getppid(), 9)\n", "import socket\n",
     "import subprocess\nsubprocess.run(['true'])\n", "import os\nos.system('true')\n",
     "import sys\nsys.exit(0)\n" + TESTS],
    ids=["fork", "kill", "socket", "subprocess", "system", "exit"],
)
def test_in_process_guards_alone(program):
    """With the OS layers off (drop_privileges=False) the in-process guards alone still stop these."""
    result = run_program(program, limits=SandboxLimits(timeout_s=1.0, drop_privileges=False))
    assert result.status == FAILED and not result.passed
    assert run_program(GOOD, limits=SandboxLimits(drop_privileges=False)).passed


def test_large_stdin_is_fed_whole_and_unread_stdin_does_not_block():
    data = "".join(f"{i}\n" for i in range(200_000))  # ~1.3 MB, far beyond a pipe buffer
    result = run_program("import sys\nprint(sum(int(line) for line in sys.stdin))\n", stdin=data)
    assert result.passed and result.stdout == f"{sum(range(200_000))}\n"  # 199999 * 200000 / 2
    ignored = run_program("print('done')\n", stdin=data, limits=QUICK)
    assert ignored.passed and ignored.duration_s < QUICK.timeout_s


# ---------------------------------------------------------------------------------------------------------------
# Writes that would outlive the run: every world-writable place on this machine, System V IPC, POSIX queues
# ---------------------------------------------------------------------------------------------------------------

KERNEL_TREES = ("/proc", "/sys")  # no file can be created there; /proc/<pid> of the run dies with it


def world_writable_places() -> tuple[list[str], list[str]]:
    """(folders, regular files) any user may write, found now by walking every mount but /proc and /sys: GNU find
    where it runs (a few seconds), else the same walk in Python (half a minute on a machine with a few venvs)."""
    try:
        prune = ["(", "-path", KERNEL_TREES[0]] + [a for t in KERNEL_TREES[1:] for a in ("-o", "-path", t)] + [")"]
        found = subprocess.run(["find", "/", *prune, "-prune", "-o", "-perm", "-0002", "(", "-type", "d", "-printf",
                                "d%p\\0", "-o", "-type", "f", "-printf", "f%p\\0", ")"],
                               capture_output=True, timeout=600).stdout.decode(errors="surrogateescape")
    except (OSError, subprocess.SubprocessError):
        found = ""
    entries = [e for e in found.split("\0") if e]
    if "d/tmp" in entries:  # GNU find ran (exit status 1 only says some folder could not be read, as in the walk)
        return [e[1:] for e in entries if e[0] == "d"], [e[1:] for e in entries if e[0] == "f"]
    folders, files = [], []
    for top, dirs, names in os.walk("/"):
        if top in KERNEL_TREES:
            dirs[:] = []
            continue
        for name in dirs + names:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if st.st_mode & 0o002:
                if stat.S_ISDIR(st.st_mode):
                    folders.append(path)
                elif stat.S_ISREG(st.st_mode):
                    files.append(path)
    return folders, files


@pytest.fixture(scope="module")
def writable_places():
    folders, files = world_writable_places()
    assert "/tmp" in folders  # the walk works: /tmp is world-writable on every Linux
    return folders, files


# The attempts, each reported as "kept" (it worked) or the error: a file in every world-writable folder, an
# append to every world-writable file, and the kernel objects that stay after their creator exits (System V
# shared memory, message queues and semaphores; a POSIX message queue; a key in the persistent keyring). They go
# around the in-process guards.
ESCAPES = UNGUARD + r"""
import ctypes, json, os
libc = ctypes.CDLL(None, use_errno=True)
folders, files, token, key, keys = json.loads(__import__("sys").stdin.read())
out = {}
def attempt(name, fn):
    try:
        ok = fn()
        out[name] = "kept" if ok is not False else "error: " + os.strerror(ctypes.get_errno())
    except OSError as e:
        out[name] = "error: " + e.strerror
def write_file(folder):
    with open(os.path.join(folder, token), "w") as f:
        f.write("left behind")
def append(path):
    os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
for folder in folders:
    attempt("folder " + folder, lambda: write_file(folder))
for path in files:
    attempt("file " + path, lambda: append(path))
IPC_CREAT = 0o1000
attempt("sysv shm", lambda: libc.shmget(key, 4096, IPC_CREAT | 0o666) >= 0)
attempt("sysv msg", lambda: libc.msgget(key, IPC_CREAT | 0o666) >= 0)
attempt("sysv sem", lambda: libc.semget(key, 1, IPC_CREAT | 0o666) >= 0)
libc.mq_open.restype = ctypes.c_int
attempt("posix mq", lambda: libc.mq_open(("/" + token).encode(), os.O_CREAT | os.O_RDWR, 0o600, None) >= 0)
if keys:  # (add_key, keyctl): a key in the uid's persistent keyring, which the kernel keeps for days
    add_key, keyctl = keys
    libc.syscall.restype = ctypes.c_long
    def persistent_key():
        ring = libc.syscall(keyctl, 22, ctypes.c_long(-1), ctypes.c_long(-4))  # KEYCTL_GET_PERSISTENT
        return ring >= 0 and libc.syscall(add_key, b"user", token.encode(), b"x" * 100, 100, ctypes.c_long(ring)) >= 0
    attempt("kernel key", persistent_key)
print(json.dumps(out))
"""


def sysv_keys(kind: str) -> set[int]:
    with open(f"/proc/sysvipc/{kind}") as f:
        return {int(line.split()[0]) for line in list(f)[1:]}


def leftovers(folders, token: str, key: int, uid) -> list[str]:
    """What the escape attempts left on the machine, and every file the run's uid owns in a writable folder."""
    left = [f"folder {d}" for d in folders if os.path.lexists(os.path.join(d, token))]
    for folder in folders:
        try:
            entries = os.scandir(folder)
        except OSError:
            continue
        with entries:
            left += [f"owned {e.path}" for e in entries
                     if uid is not None and e.stat(follow_symlinks=False).st_uid == uid]
    left += [f"sysv {kind}" for kind in ("shm", "msg", "sem") if key in sysv_keys(kind)]
    with open("/proc/key-users") as f:  # per uid: keys the kernel still holds for it
        if uid is not None and any(line.split(":")[0].strip() == str(uid) for line in f):
            left.append("kernel key")
    libc = ctypes.CDLL(None, use_errno=True)
    mq = libc.mq_open(("/" + token).encode(), os.O_RDONLY)
    if mq >= 0:
        os.close(mq)
        left.append("posix mq")
    return sorted(set(left))


def remove_leftovers(folders, token: str, key: int) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(folder, token))
    libc = ctypes.CDLL(None, use_errno=True)
    ipc_rmid = 0
    for ident, remove in ((libc.shmget(key, 0, 0), libc.shmctl), (libc.msgget(key, 0), libc.msgctl),
                          (libc.semget(key, 0, 0), libc.semctl)):
        if ident >= 0:
            remove(ident, 0, ipc_rmid, None) if remove is libc.semctl else remove(ident, ipc_rmid, None)
    libc.mq_unlink(("/" + token).encode())


def run_escapes(writable_places, limits, keys: bool = True):
    """Run the escape attempts; returns (their report, what they left). Cleans up after itself, but for a kernel key
    that got through (no way to drop another uid's persistent keyring; it expires after days): `keys` chooses."""
    folders, files = writable_places
    token, key = f"rlhf-escape-{secrets.token_hex(6)}", secrets.randbelow(1 << 30) + 1
    calls = sandbox._KEY_SYSCALLS.get(platform.machine())
    keys = [calls[1][0], calls[1][2]] if keys and calls else None
    try:
        result = run_program(ESCAPES, stdin=json.dumps([folders, files, token, key, keys]), limits=limits)
        assert result.passed, result.tail()
        return json.loads(result.stdout), leftovers(folders, token, key, result.extra.get("uid"))
    finally:
        remove_leftovers(folders, token, key)


def test_nothing_written_outside_the_working_folder_survives(writable_places):
    report, left = run_escapes(writable_places, QUICK)
    assert left == []
    # private, so writable inside the run: the scratch folders; everything else world-writable is read-only
    scratch = {os.path.realpath(p) for p in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(p)}
    for name, outcome in report.items():
        place = name.split(" ", 1)[1]
        if name.startswith("folder ") and place in scratch or name.startswith(("sysv", "posix")):
            assert outcome == "kept", (name, outcome)  # it worked, in the run's own namespace
        elif name == "kernel key":
            assert outcome == "error: Operation not permitted", outcome
        else:
            assert outcome.startswith("error"), (name, outcome)
    assert sum(name.startswith("folder ") for name in report) == len(writable_places[0])


@needs_root
def test_weaker_isolation_leaves_files_behind(writable_places, monkeypatch):
    """The same attempts under the weaker isolation that --unsafe-sandbox accepts: what the check above catches."""
    monkeypatch.setattr(sandbox, "_isolation", (True, False, "simulated"))
    with pytest.warns(RuntimeWarning, match="without private /tmp"):
        _, left = run_escapes(writable_places, replace(QUICK, unsafe=True), keys=False)
    assert "folder /tmp" in left and "sysv shm" in left


@pytest.mark.parametrize("where", ["/tmp", "/var/tmp", "/dev/shm", "."])
def test_scratch_space_is_capped(where):
    """Writing more than the cap fails inside the program (ENOSPC), in every private folder and the working one
    (which lies in the private /tmp); so does creating more files than the cap."""
    limits = SandboxLimits(timeout_s=5.0, scratch_mb=8, scratch_files=256, file_size_mb=4)
    program = (
        "import errno, os\n"
        f"where = {where!r}\n"
        "written = 0\n"
        "try:\n"
        "    for i in range(4):  # 4 files of 4 MiB (the file-size limit): 16 MiB, twice the cap\n"
        "        with open(os.path.join(where, 'big%d' % i), 'wb') as f:\n"
        "            for _ in range(4):\n"
        "                f.write(b'x' * (1 << 20))\n"
        "                f.flush()\n"
        "                written += 1 << 20\n"
        "    raise SystemExit('wrote %d bytes' % written)\n"
        "except OSError as e:\n"
        "    assert e.errno == errno.ENOSPC and written <= 8 << 20, (e, written)\n"
        "try:  # empty files take no space, only inodes\n"
        "    for i in range(1000):\n"
        "        open(os.path.join(where, 'f%d' % i), 'w').close()\n"
        "    raise SystemExit('made 1000 files')\n"
        "except OSError as e:\n"
        "    assert e.errno == errno.ENOSPC, e\n"
    )
    result = run_program(program, limits=limits)
    assert result.passed, result.tail()


def test_refused_namespaces_stop_evaluation_unless_accepted(monkeypatch, capsys, tmp_path):
    # An invalid unshare flag makes the child's unshare fail as a kernel that refuses namespaces would.
    monkeypatch.setattr(sandbox, "_PRIVATE_NAMESPACES", 0x1)
    monkeypatch.setattr(sandbox, "_isolation", None)
    monkeypatch.setattr(sandbox, "_warned", set())
    monkeypatch.delenv(sandbox.UNSAFE_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="--unsafe-sandbox"):
        run_program(GOOD)
    from rlhf.cli import main

    assert main(["eval", "--model", "no-such-model", "--testbed", "code"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unshare" in err and "--unsafe-sandbox" in err, err
    pipeline = tmp_path / "pipeline.yaml"  # the pipeline stops before its first stage, not at the first reward
    pipeline.write_text(f"output_dir: {tmp_path / 'runs'}\ntestbeds: [code]\n")
    assert main(["pipeline", str(pipeline)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--unsafe-sandbox" in err and not (tmp_path / "runs").exists()
    with pytest.warns(RuntimeWarning, match="without private /tmp"):
        weak = run_program(GOOD, limits=SandboxLimits(unsafe=True))
    assert weak.passed and weak.extra["private"] is False
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")  # how reward functions named in a config accept it
    assert run_program(GOOD).passed
