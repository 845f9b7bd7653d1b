"""The CLI shell: help, version, one-line errors and --debug."""

from pathlib import Path

from typer.testing import CliRunner

from ditcli import __version__
from ditcli.cli.app import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "sample", "fid", "convert", "classes"):
        assert command in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"dit {__version__}"


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = runner.invoke(app, ["convert", "--info", str(tmp_path / "missing.pt")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.pt" in lines[0]
    assert "Traceback" not in result.output


def test_debug_shows_the_exception(tmp_path):
    result = runner.invoke(app, ["--debug", "convert", "--info", str(tmp_path / "missing.pt")])
    assert result.exit_code != 0 and result.exception is not None and not isinstance(result.exception, SystemExit)


def test_python_dash_m(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ditcli", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and __version__ in out.stdout


def test_nothing_reads_outside_the_repository():
    """A user's clone has no shared folder beside it: the package and the tests must carry all they read."""
    root = Path(__file__).resolve().parents[1]
    folder = "sha" + "red"  # spelt in two so that this file does not match itself
    outside = ("..", f"/{folder}"), ("/ ", f'"{folder}"')
    offenders = [
        str(path.relative_to(root))
        for folder in ("ditcli", "tests", "benchmarks")
        for path in (root / folder).rglob("*.py")
        if any("".join(pattern) in path.read_text() for pattern in outside)
    ]
    assert offenders == []


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(monkeypatch):
    """Only a UserError (or a path the system refused) is the user's: a ValueError raised inside a command is a bug,
    and leaves the shell as itself, with its traceback, not as `error:` and exit code 2."""
    from ditcli.data.classes import ClassTable
    from ditcli.errors import UserError, UserValueError

    def raising(exc):
        def imagenet():
            raise exc
        return staticmethod(imagenet)

    monkeypatch.setattr(ClassTable, "imagenet", raising(ValueError("a bug's message")))
    result = runner.invoke(app, ["classes"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError), result.output
    assert "error:" not in result.output and result.exc_info[2] is not None  # the traceback Python prints
    for exc in (UserError("the user's mistake", "how to fix it"), UserValueError("the user's mistake", "how to fix it")):
        monkeypatch.setattr(ClassTable, "imagenet", raising(exc))
        result = runner.invoke(app, ["classes"])
        assert result.exit_code == 2 and result.output == "error: the user's mistake (how to fix it)\n", result.output
        assert isinstance(result.exception, SystemExit)
