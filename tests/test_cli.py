"""The CLI's shape: commands imported only when run, and which errors are one line and which are bugs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from beseg import cli
from beseg.errors import DataError


def _modules_after(args: list[str]) -> set[str]:
    """The modules a fresh interpreter has imported after ``beseg ARGS`` (exit by --help is fine)."""
    code = ("import sys\nfrom beseg.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('\\n'.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("args", [["--help"], ["score", "--help"]])
def test_help_imports_no_training_code(args):
    modules = _modules_after(args)
    assert "beseg.cli" in modules  # the probe ran
    assert "beseg.engine.trainer" not in modules and "torch" not in modules and "monai" not in modules


def test_a_command_imports_its_own_module_and_no_other():
    modules = _modules_after(["score", "--help"])
    assert "beseg.commands.score" in modules
    assert not any(f"beseg.commands.{c}" in modules for c in cli.COMMANDS if c != "score")


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_listed_command_has_a_module_with_its_options(command):
    parser = cli.build_parser(command)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([command, "--help"])
    assert exit_info.value.code == 0


def _fail_with(monkeypatch, error: BaseException) -> None:
    """Make ``beseg configs`` raise ``error``."""
    import beseg.commands.configs

    def run(args):
        raise error

    monkeypatch.setattr(beseg.commands.configs, "run", run)


def test_a_beseg_error_is_one_line(monkeypatch, capsys):
    _fail_with(monkeypatch, DataError("/data/x.nii.gz: not a NIfTI file"))
    assert cli.main(["configs"]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert err == "beseg configs: error: /data/x.nii.gz: not a NIfTI file\n"


def test_an_os_error_on_a_file_is_one_line(monkeypatch, capsys):
    _fail_with(monkeypatch, FileNotFoundError(2, "No such file or directory", "/data/missing.yaml"))
    assert cli.main(["configs"]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err.strip() == \
        "beseg configs: error: [Errno 2] No such file or directory: '/data/missing.yaml'"


def test_any_other_exception_is_a_bug_with_its_traceback(monkeypatch, capsys):
    _fail_with(monkeypatch, KeyError("spleen"))
    assert cli.main(["configs"]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'spleen'" in err
    assert "please report it" in err.splitlines()[-1]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_prints_the_traceback_of_a_user_error(monkeypatch, capsys, how):
    _fail_with(monkeypatch, DataError("bad folder"))
    if how == "env":
        monkeypatch.setenv("BESEG_DEBUG", "1")
    assert cli.main(["--debug", "configs"] if how == "flag" else ["configs"]) == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("beseg configs: error: bad folder\n")
