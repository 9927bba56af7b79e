"""The command line as a user meets it: one sentence per mistake, fast.

Each bad command runs in a fresh interpreter, as typed in a shell, and must end with
exit status 2, exactly one line on stderr, no usage block, no traceback and no files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import main
from tests.conftest import csv_args

REPO = Path(__file__).resolve().parents[1]
# Prints, after the command, which heavy libraries the command imported (scikit-learn is a
# second of the start-up on a loaded machine; torch and transformers many seconds).
_PROBE = (
    "import sys\n"
    "from core.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "heavy = ('sklearn', 'torch', 'transformers')\n"
    "print('imported:', *sorted(m for m in heavy if m in sys.modules))\n"
    "sys.exit(rc)\n"
)


def _probe(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``main(args)`` in a fresh interpreter and capture its output."""
    return subprocess.run(
        [sys.executable, "-c", _PROBE, *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _one_sentence(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused command."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in lines[0] and "usage:" not in lines[0]
    return lines[0]


def _one_line(capsys: pytest.CaptureFixture) -> str:
    """The single stderr line of a command refused in this process."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and "usage:" not in lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--epoch", "2"], "--epoch 2"),  # an abbreviation of --epochs is not taken
        (["run", "--no-such-option"], "--no-such-option"),
        (["run", "--epochs", "two"], "invalid int value"),
        (["run", "--preset", "huge"], "invalid choice"),
        (["nonsense"], "invalid choice"),
        ([], "required"),
        (["show"], "required"),
        (["analyze", "--s-min", "0.2"], "required"),
    ],
)
def test_usage_errors_are_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], needle: str
) -> None:
    if args[:1] == ["run"]:
        args = [*args, "--cache", str(tmp_path / "cache")]
    assert main(args) == 2
    line = _one_line(capsys)
    assert needle in line and "--help" in line
    assert not (tmp_path / "cache").exists()


def test_a_usage_error_in_a_shell_is_one_line(tmp_path: Path) -> None:
    line = _one_sentence(_probe(["run", "--epoch", "2"], tmp_path))
    assert line == "error: unrecognized arguments: --epoch 2; see `python -m core run --help`."


def test_abbreviated_options_are_refused_in_process(capsys) -> None:
    assert main(["run", "--epoch", "2"]) == 2
    assert "unrecognized arguments: --epoch 2" in capsys.readouterr().err
    assert main(["analyze", "x", "--force", "--s-m", "0.3"]) == 2
    assert "--s-m" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needle", "imported"),
    [
        (["--dataset", "missing.csv", "--text-col", "a", "--label-col", "y"], "missing.csv", ""),
        (["--lr", "inf"], "--lr", ""),
        (["--epochs", "-1"], "--epochs", ""),
        (["--params", "last-0"], "scope", ""),
        (["--name", "../escape"], "run name", ""),
        (["--text-col", "review"], "--dataset", ""),
        # the table of built-in datasets lives in core.inputs.datasets, which loads no model library
        (["--dataset", "no-such-builtin"], "built-in dataset", ""),
    ],
)
def test_bad_requests_are_refused_before_torch_is_imported(
    tmp_path: Path, args: list[str], needle: str, imported: str
) -> None:
    proc = _probe(["run", *args, "--cache", str(tmp_path / "cache")], tmp_path)
    assert needle in _one_sentence(proc)
    assert proc.stdout.strip() == "imported:" + imported  # never torch or transformers
    assert not (tmp_path / "cache").exists()


def test_a_bad_column_is_reported_before_torch_is_imported(
    tmp_path: Path, reviews_csv: Path
) -> None:
    args = ["run", *csv_args(reviews_csv), "--cache", str(tmp_path / "cache")]
    args[args.index("sentiment")] = "no_such_column"
    proc = _probe(args, tmp_path)
    assert "no_such_column" in _one_sentence(proc)
    assert proc.stdout.strip() == "imported: sklearn"  # reading the file, not torch


@pytest.mark.parametrize(
    "args",
    [
        ["analyze", "RUN", "--s-min", "nan"],
        ["analyze", "RUN", "--z-max", "0.5", "--s-min", "0.2"],
        ["analyze", "RUN", "--k", "0"],
        ["tracin", "RUN", "--params", "bogus"],
        ["tracin", "RUN", "--project", "-3"],
        ["clean", "RUN", "--detector", "loss", "--action", "exclude", "--k", "0"],
        ["export", "RUN", "--detector", "loss", "--top", "-1"],
        ["sweep", "--seeds", "0"],
        ["sweep", "--flip-rates", "0,inf"],
    ],
)
def test_bad_numbers_of_the_other_commands_are_one_sentence(
    study_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str]
) -> None:
    args = [str(study_run) if a == "RUN" else a for a in args]
    if args[0] == "sweep":
        args += ["--cache", str(tmp_path / "cache")]
    before = sorted(p.name for p in study_run.iterdir())
    assert main(args) == 2
    _one_line(capsys)
    assert sorted(p.name for p in study_run.iterdir()) == before
    assert not (tmp_path / "cache").exists()


def test_help_still_works(tmp_path: Path) -> None:
    proc = _probe(["run", "--help"], tmp_path)
    assert proc.returncode == 0 and "--epochs" in proc.stdout


def test_the_atlas_console_script_is_python_m_core(tmp_path: Path) -> None:
    atlas = Path(sys.executable).parent / "atlas"
    assert atlas.exists(), "run `make setup` (pip install -e .) to install the atlas script"
    proc = subprocess.run(
        [str(atlas), "list", "--cache", str(tmp_path / "none")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "No runs in" in proc.stdout
    proc = subprocess.run(
        [str(atlas), "run", "--epoch", "2"], cwd=tmp_path, capture_output=True, text=True
    )
    assert "atlas run --help" in _one_sentence(proc)


def test_the_packages_import_from_any_folder_without_path_patches(tmp_path: Path) -> None:
    code = "import core.cli, ui.study; print(core.cli.__file__)"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parent == REPO / "core" / "cli"


def test_show_into_a_closed_pipe_ends_quietly():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    # The reader is gone before the command writes a byte (like `| head` that has read
    # enough), so every write meets a closed pipe.
    proc = subprocess.Popen(
        [sys.executable, "-m", "core", "show", "cache/demo"],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_atlas_app_builds_the_streamlit_command_on_loopback(tmp_path: Path, monkeypatch, capsys):
    """`atlas app` is checked through its dry path and a stubbed exec; no server starts."""
    import core
    from core import cli

    repo = Path(core.__file__).resolve().parents[1]
    argv, env = cli.app_command(str(tmp_path), 8600)
    assert argv == [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(repo / "app.py"),
        "--server.port",
        "8600",
        "--server.address",
        "localhost",
    ]
    assert env["ATLAS_CACHE"] == str(tmp_path.resolve())

    assert main(["app", "--cache", str(tmp_path), "--port", "8600", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"ATLAS_CACHE={tmp_path.resolve()} ")
    assert "streamlit run" in printed and "--server.address localhost" in printed

    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    assert main(["app", "--cache", str(tmp_path)]) == 0
    ((path, run_argv, run_env),) = calls
    assert path == sys.executable and run_argv[-3:] == ["8501", "--server.address", "localhost"]
    assert run_env["ATLAS_CACHE"] == str(tmp_path.resolve())
    assert "http://localhost:8501" in capsys.readouterr().err

    # Without --cache: $ATLAS_CACHE, else ./cache, else the checkout's demo runs.
    monkeypatch.delenv("ATLAS_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.app_command(None)[1]["ATLAS_CACHE"] == str(repo / "cache")
    (tmp_path / "cache").mkdir()
    assert cli.app_command(None)[1]["ATLAS_CACHE"] == str((tmp_path / "cache").resolve())
    monkeypatch.setenv("ATLAS_CACHE", str(tmp_path / "elsewhere"))
    assert cli.app_command(None)[1]["ATLAS_CACHE"] == str((tmp_path / "elsewhere").resolve())

    assert main(["app", "--port", "99999", "--dry-run"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err
