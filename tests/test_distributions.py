"""The two distributions of this repository: ``beseg`` (``pyproject.toml``) and ``beseg-runtime`` (``runtime/``).

Both are built with ``python -m build`` (an sdist, and the wheel built from it) and checked with
``twine check``; the runtime's wheel is then installed alone in a fresh virtual environment, with its
dependencies from the package index, where torch and beseg cannot be imported, and its
``beseg-predict`` labels an exported phantom model as ``beseg predict`` does (Dice >= 0.999 per case
and class, same shape and affine: tests/test_export.py's comparison).

The subprocesses run without this machine's pip configuration (``PIP_*`` variables and pip.conf:
``PIP_CONFIG_FILE`` is the null device, ``pip install --isolated``) and without PYTHONPATH, so the fresh
environment sees only what the wheel and its declared dependencies bring, as a user's machine would.
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("build")
pytest.importorskip("twine")
pytest.importorskip("onnxscript")  # beseg export, for the model the fresh environment runs

from test_export import assert_equivalent, assert_thin_scans_segmented, runs  # noqa: E402,F401 - runs: a fixture

from beseg.cli import main  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
#: What beseg-runtime may depend on, and nothing else.
RUNTIME_DEPENDENCIES = {"onnxruntime", "numpy", "nibabel", "scipy"}


def clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH and this machine's pip configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}


def start(args: list[str | Path], cwd: Path) -> subprocess.Popen:
    """Start a command in ``cwd`` with :func:`clean_env`, its output captured (see :func:`finish`)."""
    return subprocess.Popen([str(a) for a in args], cwd=cwd, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    """Wait for ``proc``; its output, or a failure with the output's end."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == 0, f"{' '.join(proc.args)}: exit {proc.returncode}\n{out[-4000:]}"
    return out


def run(args: list[str | Path], cwd: Path, timeout: int = 600) -> str:
    """Run a command in ``cwd`` with :func:`clean_env`; its output (stdout and stderr), or a failure."""
    return finish(start(args, cwd), timeout)


def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as z:
        return email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))


def entry_points(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """Both projects built by ``python -m build`` (sdist, then the wheel from the sdist) into one folder."""
    out = tmp_path_factory.mktemp("dist")
    builds = [start([sys.executable, "-m", "build", "--outdir", out, project], cwd=out) for project in (ROOT / "runtime", ROOT)]
    for build in builds:  # side by side: most of the time goes to fetching setuptools and unpacking
        finish(build)
    found = {p.name: p for p in out.iterdir()}
    wheels = {name.split("-")[0]: p for name, p in found.items() if name.endswith(".whl")}
    assert set(wheels) == {"beseg", "beseg_runtime"} and len(found) == 4, sorted(found)
    return {"folder": out, "beseg": wheels["beseg"], "runtime": wheels["beseg_runtime"]}


def test_both_distributions_build_pass_twine_check_and_hold_their_own_packages(dists):
    files = sorted(dists["folder"].iterdir())
    checked = run([sys.executable, "-m", "twine", "check", "--strict", *files], cwd=dists["folder"])
    assert checked.count("PASSED") == 4, checked
    with zipfile.ZipFile(dists["runtime"]) as z:
        runtime_tops = {n.split("/")[0] for n in z.namelist()}
    with zipfile.ZipFile(dists["beseg"]) as z:
        beseg_files = z.namelist()
    assert runtime_tops == {"beseg_runtime", "beseg_runtime-0.1.0.dist-info"}
    assert {n.split("/")[0] for n in beseg_files} == {"beseg", "beseg-0.1.0.dist-info"}  # no runtime module twice
    assert "beseg/configs/task09_segresnet_be.yaml" in beseg_files and "beseg/deploy/__init__.py" not in beseg_files
    # the runtime depends on onnxruntime, numpy, nibabel and scipy only, and brings beseg-predict
    runtime_meta = metadata(dists["runtime"])
    from packaging.requirements import Requirement

    assert {Requirement(r).name for r in runtime_meta.get_all("Requires-Dist")} == RUNTIME_DEPENDENCIES
    assert "beseg-predict = beseg_runtime.cli:main" in entry_points(dists["runtime"])
    assert "beseg-predict" not in entry_points(dists["beseg"])
    # beseg requires a range of beseg-runtime that holds the version built here
    needed = [Requirement(r) for r in metadata(dists["beseg"]).get_all("Requires-Dist")]
    runtime_req = next(r for r in needed if r.name == "beseg-runtime")
    assert runtime_req.specifier.contains(runtime_meta["Version"]) and not runtime_req.marker


def test_the_runtime_wheel_alone_has_no_torch_and_predicts_like_beseg_predict(dists, runs, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    install = start([venv / "bin" / "pip", "install", "--isolated", "-q", dists["runtime"]], cwd=tmp_path)
    # meanwhile, an exported phantom model and beseg predict's labels
    assert main(["export", str(runs["run0"]), "--out", str(tmp_path / "model")]) == 0
    assert main(["predict", str(runs["run0"]), str(runs["images"]), "--out", str(tmp_path / "torch")]) == 0
    finish(install)
    # neither torch (nor MONAI) nor beseg is there: the wheel and its four dependencies only (-I: not
    # the working folder, whose "torch" output folder would import as a namespace package, nor PYTHON*)
    found = run([venv / "bin" / "python", "-I", "-c", """
import importlib.util, beseg_runtime
print(beseg_runtime.__file__)
print([m for m in ("torch", "monai", "beseg") if importlib.util.find_spec(m)])
"""], cwd=tmp_path).splitlines()
    assert Path(found[0]).is_relative_to(venv) and found[1] == "[]", found
    torch = subprocess.run([venv / "bin" / "python", "-I", "-c", "import torch"], cwd=tmp_path, env=clean_env(),
                           capture_output=True, text=True)
    assert torch.returncode == 1 and "No module named 'torch'" in torch.stderr
    # the fresh environment's beseg-predict gives beseg predict's labels
    run([venv / "bin" / "beseg-predict", tmp_path / "model", runs["images"], "--out", tmp_path / "onnx", "--quiet"],
        cwd=tmp_path)
    assert_equivalent(tmp_path / "torch", tmp_path / "onnx", [0, 1])
    assert_thin_scans_segmented(tmp_path / "onnx", runs["images"], runs["thin"], [0, 1])
