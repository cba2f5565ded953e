"""The sandbox corpus: every hostile program must end as a failed sample, within its time limit,
without touching the machine; good programs around them keep passing."""

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

from rlhf.eval.sandbox import (
    FAILED,
    OUTPUT_LIMIT,
    PASSED,
    TIMEOUT,
    SandboxLimits,
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
    """What a non-root user gets without the uid drop: the guards still stop these."""
    result = run_program(program, limits=SandboxLimits(timeout_s=1.0, drop_privileges=False))
    assert result.status == FAILED and not result.passed
    assert run_program(GOOD, limits=SandboxLimits(drop_privileges=False)).passed


def test_large_stdin_is_fed_whole_and_unread_stdin_does_not_block():
    data = "".join(f"{i}\n" for i in range(200_000))  # ~1.3 MB, far beyond a pipe buffer
    result = run_program("import sys\nprint(sum(int(line) for line in sys.stdin))\n", stdin=data)
    assert result.passed and result.stdout == f"{sum(range(200_000))}\n"  # 199999 * 200000 / 2
    ignored = run_program("print('done')\n", stdin=data, limits=QUICK)
    assert ignored.passed and ignored.duration_s < QUICK.timeout_s
