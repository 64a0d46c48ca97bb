"""Shared helpers of the fault-injection suite: every fault runs through the real CLI in a child process.

A fault happens at a point of the child's own code: :func:`fault_env` puts a ``sitecustomize.py`` on the
child's ``PYTHONPATH`` (inherited by every process it starts, e.g. the local launcher's workers) that wraps
one function (``module:attribute``) when its module is imported. At the k-th call, before or after the real
call, it acts:

* ``hang``: write the marker file (its content: the pid) and sleep, for the test to kill the process group;
* ``stop``: write the marker and SIGSTOP itself (the test continues it later);
* ``fill``: fill the disk holding a folder (a ballast file written until ENOSPC), then go on: the real call
  meets a full disk.

The point is counted in calls, not in time, so the suite does not depend on the machine's speed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"


def _reexport_shared_helpers() -> None:
    """Make tests/conftest.py's plain helpers (TINY_COMPARE, per_case_rows, tiny_train_config...) importable from
    here too. Test modules import them with ``from conftest import ...``, and pytest keeps one module named
    ``conftest`` in ``sys.modules``: the last one it loaded, which is this one once tests/faults is collected."""
    spec = importlib.util.spec_from_file_location("_beseg_tests_shared_conftest", TESTS / "conftest.py")
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    for name, value in vars(shared).items():
        fixture = hasattr(value, "_pytestfixturefunction") or type(value).__name__ == "FixtureFunctionDefinition"
        if not name.startswith("_") and not fixture and not isinstance(value, type(sys)) and name not in globals():
            globals()[name] = value


_reexport_shared_helpers()

SITECUSTOMIZE = r'''
import json, os, sys

_FAULT = os.environ.get("BESEG_FAULT")
if _FAULT:
    import importlib.abc, importlib.util, signal, time

    _fault = json.loads(_FAULT)
    _module, _attr = _fault["target"].split(":")

    def _fill(folder):
        try:
            with open(os.path.join(folder, ".ballast"), "ab") as f:
                block = b"\0" * (1 << 16)
                while True:
                    f.write(block)
                    f.flush()
        except OSError:
            pass

    def _act():
        if _fault["action"] == "fill":
            _fill(_fault["dir"])
        if _fault.get("marker"):
            with open(_fault["marker"], "w") as f:
                f.write(str(os.getpid()))
        if _fault["action"] == "hang":
            time.sleep(3600)
        elif _fault["action"] == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)

    def _patch(module):
        owner = module
        *path, name = _attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        real = getattr(owner, name)
        calls = [0]

        def wrapper(*args, **kwargs):
            calls[0] += 1
            hit = calls[0] == _fault.get("call", 1)
            if hit and _fault.get("when", "before") == "before":
                _act()
            result = real(*args, **kwargs)
            if hit and _fault.get("when") == "after":
                _act()
            return result

        setattr(owner, name, wrapper)

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != _module:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec

    if _module in sys.modules:
        _patch(sys.modules[_module])
    else:
        sys.meta_path.insert(0, _Finder())
'''


def fault_env(tmp: Path, fault: Mapping | None = None, **extra: str) -> dict[str, str]:
    """The environment of a faulted (or plain) child: this checkout first on the path, one thread, ``extra``.

    Args:
        tmp: a folder for the hook's ``sitecustomize.py``.
        fault: ``{"target": "module:attr", "call": k, "when": "before"|"after", "action": "hang"|"stop"|"fill",
            "marker": path, "dir": folder to fill}``; None for no fault.
        extra: more variables (lock timings...).
    """
    hooks = tmp / "hooks"
    hooks.mkdir(parents=True, exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k != "BESEG_FAULT"}
    env.update({"PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)]), "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", **extra})
    if fault is not None:
        env["BESEG_FAULT"] = json.dumps(dict(fault))
    return env


def beseg(argv: Sequence[str | Path], env: Mapping[str, str], log: Path | None = None) -> subprocess.Popen:
    """``python -m beseg.cli ARGV`` in its own process group (killed as a whole, as a scheduler or Ctrl-C does)."""
    out = open(log, "ab") if log is not None else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "beseg.cli", *map(str, argv)], env=dict(env), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_marker(proc: subprocess.Popen, marker: Path, timeout: float = 300, what: str = "the fault") -> int:
    """Wait until the child reaches the fault (returns the pid that wrote the marker); fail if it ends first."""
    deadline = time.monotonic() + timeout
    while not marker.exists() or not marker.read_text():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit code {proc.returncode}) before it reached {what}:\n{output(proc)}")
        if time.monotonic() > deadline:
            kill_group(proc)
            pytest.fail(f"the command did not reach {what} within {timeout:.0f} s")
        time.sleep(0.05)
    return int(marker.read_text())


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (``R``, ``S``, ``T`` stopped, ``Z`` zombie...), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2]


def wait_stopped(pid: int, timeout: float = 60) -> None:
    """Wait until process ``pid`` is stopped (SIGSTOP)."""
    _wait_state(pid, lambda state: state is not None and state in "Tt", "stop", timeout)


def wait_ended(pid: int, timeout: float = 120) -> None:
    """Wait until process ``pid`` has ended (gone, or a zombie its parent has not reaped yet)."""
    _wait_state(pid, lambda state: state in (None, "Z"), "end", timeout)


def _wait_state(pid: int, reached, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = process_state(pid)
        if reached(state):
            return
        if state is None:
            pytest.fail(f"process {pid} ended instead of reaching {what}")
        time.sleep(0.02)
    pytest.fail(f"process {pid} did not {what} within {timeout:.0f} s")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (its workers too) and reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def output(proc: subprocess.Popen) -> str:
    """What a finished child printed (stdout and stderr)."""
    if proc.stdout is None:
        return ""
    return proc.stdout.read().decode(errors="replace")[-4000:]


def run_to_end(argv: Sequence[str | Path], env: Mapping[str, str], timeout: float = 600) -> tuple[int, str]:
    """Run a command to its end; ``(exit code, output)``."""
    proc = beseg(argv, env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        said = proc.communicate()[0].decode(errors="replace")[-4000:]
        pytest.fail(f"beseg {' '.join(map(str, argv))} did not end within {timeout:.0f} s; it said:\n{said}")
    return proc.returncode, out.decode(errors="replace")


def temporary_files(*roots: Path) -> list[Path]:
    """Every temporary file beseg writes before a rename (``.<name>.<random>.tmp[.nii.gz]``) under ``roots``."""
    found = []
    for root in roots:
        for folder, _, files in os.walk(root):
            found += [Path(folder) / f for f in files if f.startswith(".") and (f.endswith(".tmp") or ".tmp." in f)]
    return found


def mount_tmpfs(folder: Path, size: str) -> bool:
    """Mount a small tmpfs on ``folder`` (root; CI runs as root); False where that is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MB tmpfs folder that a fault can fill (the ``fill`` action), removed afterwards; skips where no
    tmpfs can be mounted (not root), failing in CI, which runs as root."""
    folder = tmp_path / "disk"
    if not mount_tmpfs(folder, "64m"):
        if os.environ.get("CI"):
            pytest.fail("the full-disk faults need a tmpfs mount (CI runs as root)")
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    unmount(folder)
