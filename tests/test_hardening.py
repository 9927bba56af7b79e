"""Bad requests refused before writing, one writer per run, readers that never crash.

Each test is named for the behaviour it checks. The run store tests copy the
session's tiny study (``study_run``) and damage the copy, never the shared run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.cli import check_study_argv, main, show_payload
from core.options import commands
from core.orchestration import jobs
from core.storage import locks, store
from core.storage.errors import AtlasError
from tests.conftest import TINY_ARGS, csv_args, synthetic_reviews

REPO = Path(__file__).resolve().parents[1]


def _error_line(capsys: pytest.CaptureFixture) -> str:
    """The single stderr line of a refused command."""
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln]
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def _nothing_in(folder: Path) -> bool:
    """Whether a folder is absent or holds nothing but dot-entries."""
    return not folder.exists() or not [p for p in folder.iterdir() if not p.name.startswith(".")]


def _copy_run(study_run: Path, tmp_path: Path, with_checkpoints: bool = False) -> Path:
    """A private copy of the session's tiny run, to damage."""
    ignore = None if with_checkpoints else shutil.ignore_patterns(store.CHECKPOINTS_DIR)
    run = tmp_path / "cache" / study_run.name
    shutil.copytree(study_run, run, ignore=ignore)
    return run


def _run_args(csv: Path, cache: Path, name: str = "r", *extra: str) -> list[str]:
    return ["run", *TINY_ARGS, *csv_args(csv), "--cache", str(cache), "--name", name, *extra]


# -- row 1: run names ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc/x", "a/b c/d", "/tmp/absolute", "..", ".hidden", ""])
def test_a_name_that_is_not_one_plain_folder_is_refused(
    tmp_path: Path, reviews_csv: Path, capsys, name: str
) -> None:
    cache = tmp_path / "A" / "sub" / "cache"
    assert main(_run_args(reviews_csv, cache, name, "--until", "data")) == 2
    assert "run name" in _error_line(capsys)
    assert not (tmp_path / "A").exists() and not (tmp_path / "etc").exists()


# -- row 2: the cache folder -----------------------------------------------------------------------


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_cache_that_is_a_file_is_one_sentence(
    tmp_path: Path, reviews_csv: Path, capsys, below: str
) -> None:
    f = tmp_path / "f"
    f.write_text("hi\n")
    cache = f / below if below else f
    assert main(_run_args(reviews_csv, cache, "r", "--until", "data")) == 2
    assert "is a file" in _error_line(capsys)
    assert f.read_text() == "hi\n"


# -- row 3: a manifest that is JSON but not an object --------------------------------------------


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"text"', "{not json", '{"status": 3}'])
def test_list_command_survives_a_bad_manifest(
    study_run: Path, tmp_path: Path, capsys, content
) -> None:
    cache = tmp_path / "cache"
    _copy_run(study_run, tmp_path)
    (cache / "zzz").mkdir()
    (cache / "zzz" / store.MANIFEST).write_text(content)
    rows = {r["name"]: r for r in commands.list_runs(cache)}
    assert rows[study_run.name]["status"] == "complete"
    assert rows["zzz"]["status"] in ("unreadable", "3")
    assert main(["list", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert study_run.name in out and "zzz" in out
    assert main(["list", "--cache", str(cache), "--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} == {study_run.name, "zzz"}


def test_show_of_a_non_object_manifest_is_one_sentence(tmp_path: Path, capsys) -> None:
    run = tmp_path / "zzz"
    run.mkdir()
    (run / store.MANIFEST).write_text("[1, 2, 3]")
    assert main(["show", str(run)]) == 2
    assert str(run / store.MANIFEST) in _error_line(capsys)


# -- row 4: damaged files ------------------------------------------------------------------------


def test_corrupt_shapes_parquet_is_reported_not_raised(
    study_run: Path, tmp_path: Path, capsys
) -> None:
    run = _copy_run(study_run, tmp_path)
    size = (run / store.SHAPES).stat().st_size
    (run / store.SHAPES).write_bytes(np.random.default_rng(0).bytes(size))
    for args in (["show", str(run)], ["show", str(run), "--json"]):
        assert main(args) == 0
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
    payload = json.loads(captured.out)
    assert payload["status"] == "damaged"
    assert payload["stages"]["analyze"]["status"] == "damaged"
    problem = payload["problems"]["analyze"]
    assert str(run / store.SHAPES) in problem and "python -m core analyze" in problem
    assert "test_instances" not in payload
    with pytest.raises(AtlasError, match="not a readable Parquet"):
        store.read_parquet(run / store.SHAPES)


def test_truncated_tracin_is_not_complete(study_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy_run(study_run, tmp_path, with_checkpoints=True)
    raw = (run / store.TRACIN).read_bytes()
    (run / store.TRACIN).write_bytes(raw[: len(raw) // 2])
    assert main(["show", str(run), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["stages"]["tracin"]["status"] != "complete"
    assert "truncated" in payload["problems"]["tracin"]
    assert "python -m core tracin" in payload["problems"]["tracin"]
    assert main(["show", str(run)]) == 0
    assert "truncated" in capsys.readouterr().out
    with pytest.raises(AtlasError, match="truncated"):
        store.read_npy(run / store.TRACIN)


def test_loaders_check_shape_and_type(tmp_path: Path) -> None:
    path = tmp_path / "a.npy"
    store.write_npy(path, np.zeros((3, 4), dtype=np.float32))
    assert store.read_npy(path, shape=(3, None)).shape == (3, 4)
    with pytest.raises(AtlasError, match=r"expected \(4, \?\)"):
        store.read_npy(path, shape=(4, None))
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(AtlasError, match="Python objects"):
        store.read_npy(path)
    path.write_bytes(b"not an array at all")
    with pytest.raises(AtlasError, match="not a readable .npy"):
        store.read_npy(path)
    (tmp_path / "j.json").write_text("[1]")
    with pytest.raises(AtlasError, match="not an object"):
        store.read_json_object(tmp_path / "j.json")


def test_wrong_shape_logits_make_train_damaged(study_run: Path, tmp_path: Path) -> None:
    run = _copy_run(study_run, tmp_path)
    store.write_npy(run / store.LOGITS, np.zeros((3, 7, 2), dtype=np.float32))
    problems = store.verify_run(run, store.load_manifest(run))
    assert "shape (3, 7, 2)" in problems["train"]


# -- row 5: one writer per run ---------------------------------------------------------------------

_HOLDER = (
    "import sys, time\n"
    "from core.storage import locks\n"
    "lock = locks.hold(sys.argv[1])\n"
    "lock.__enter__()\n"
    "print('held', flush=True)\n"
    "time.sleep(120)\n"
)


def test_a_second_writer_exits_2_and_a_killed_ones_lock_is_taken_over(
    tmp_path: Path, reviews_csv: Path, capsys
) -> None:
    cache = tmp_path / "cache"
    run = cache / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert locks.is_locked(run) and locks.lock_owner(run) == holder.pid
        assert main(_run_args(reviews_csv, cache, "r", "--until", "data")) == 2
        assert f"already running (pid {holder.pid})" in _error_line(capsys)
        assert not (run / store.MANIFEST).exists()
        assert main(["analyze", str(run)]) == 2  # no manifest: not a run yet
    finally:
        holder.kill()
        holder.wait()
    # kill -9 left the lock file naming a dead pid: the next writer takes it over.
    assert (run / locks.LOCK_FILE).exists() and not locks.is_locked(run)
    assert main(_run_args(reviews_csv, cache, "r", "--until", "data")) == 0
    assert store.stage_complete(run, "data")
    assert not (run / locks.LOCK_FILE).exists()  # released at the end


def test_two_identical_runs_started_together_never_collide(
    tmp_path: Path, reviews_csv: Path
) -> None:
    cmd = [sys.executable, "-m", "core", *_run_args(reviews_csv, tmp_path / "cache", "r")]
    cmd += ["--until", "data"]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    results = [(p.returncode, err) for p, err in zip(procs, errors, strict=True)]
    for rc, err in results:
        assert "Traceback" not in err, err
        assert rc == 0 or (rc == 2 and "already running" in err), err
    assert 0 in [rc for rc, _ in results]
    assert store.stage_complete(tmp_path / "cache" / "r", "data")
    assert not (tmp_path / "cache" / "r" / locks.LOCK_FILE).exists()


def test_the_lock_guards_the_stage_commands_too(study_run: Path, tmp_path: Path, capsys):
    run = _copy_run(study_run, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        for command in ("analyze", "detect", "tracin"):
            assert main([command, str(run)]) == 2
            assert "already running" in _error_line(capsys)
        assert main(["show", str(run)]) == 0  # readers never wait for writers
    finally:
        holder.kill()
        holder.wait()


def test_a_sweep_being_written_is_not_written_twice(
    tmp_path: Path, reviews_csv: Path, capsys
) -> None:
    cache = tmp_path / "cache"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(cache / "s")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        tiny = [
            a for i, a in enumerate(TINY_ARGS) if "--flip-count" not in TINY_ARGS[i - 1 : i + 1]
        ]
        args = ["sweep", *tiny, *csv_args(reviews_csv), "--flip-rates", "0,0.1"]
        assert main([*args, "--seeds", "1", "--cache", str(cache), "--name", "s"]) == 2
        assert f"already running (pid {holder.pid})" in _error_line(capsys)
        assert not (cache / "s" / store.MANIFEST).exists()
    finally:
        holder.kill()
        holder.wait()


def test_locks_are_reentrant_and_leave_no_folder_behind(tmp_path: Path) -> None:
    folder = tmp_path / "new"
    with locks.hold(folder):
        assert locks.lock_owner(folder) == os.getpid()
        with locks.hold(folder):
            assert locks.is_locked(folder)
        assert locks.is_locked(folder)
    assert not folder.exists()  # created for the lock and nothing was written
    assert locks.lock_owner(folder) is None


def test_the_app_refuses_a_run_whose_lock_is_held(tmp_path: Path, monkeypatch) -> None:
    from ui import study

    monkeypatch.setenv(jobs.ENV_STUDY_CMD, f"{sys.executable} -c pass")
    with locks.hold(tmp_path / "busy"), pytest.raises(AtlasError, match="already running"):
        study.start(tmp_path, study.StudyRequest(name="busy"))
    assert not jobs.job(tmp_path, "busy").pid_file.exists()


# -- row 7 (core side): column names that look like options -------------------------------------


def test_a_column_name_like_an_option_is_refused_by_the_shared_check(
    reviews_csv: Path, tmp_path: Path, monkeypatch
) -> None:
    argv = ["run", "--dataset", str(reviews_csv), "--text-col=--cache=x", "--label-col", "y"]
    with pytest.raises(AtlasError, match="starts with '-'"):
        check_study_argv([*argv, "--cache", str(tmp_path / "c")])
    from ui import study

    monkeypatch.setenv(jobs.ENV_STUDY_CMD, f"{sys.executable} -c pass")
    req = study.StudyRequest(
        name="cols", dataset=None, data_file=str(reviews_csv), text_col="--cache=x", label_col="y"
    )
    with pytest.raises(AtlasError, match="starts with '-'"):
        study.start(tmp_path, req)
    assert not jobs.job(tmp_path, "cols").pid_file.exists()


# -- row 8: late failures ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--params", "last-x"], "TracIn parameter scope"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--epochs", "-2"], "--epochs"),
        (["--n-train", "0"], "--n-train"),
        (["--batch-size", "0"], "--batch-size"),
        (["--max-length", "100000"], "--max-length"),
        (["--seed", "-1"], "--seed"),
        (["--project", "0"], "--project"),
        (["--device", "tpu"], "--device"),
        (["--flip-rate", "-0.1"], "--flip-rate"),
    ],
)
def test_bad_settings_fail_before_any_stage(
    tmp_path: Path, reviews_csv: Path, capsys, extra: list[str], needle: str
) -> None:
    cache = tmp_path / "cache"
    assert main(_run_args(reviews_csv, cache, "r", *extra)) == 2
    assert needle in _error_line(capsys)
    assert _nothing_in(cache)


def test_cuda_without_a_gpu_fails_before_any_stage(
    tmp_path: Path, reviews_csv: Path, capsys
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cache = tmp_path / "cache"
    assert main(_run_args(reviews_csv, cache, "r", "--device", "cuda")) == 2
    assert "no CUDA GPU" in _error_line(capsys)
    assert _nothing_in(cache)


# -- row 9: temporary folders of killed processes ------------------------------------------------


def test_temporary_folders_of_killed_writers_are_cleaned(tmp_path: Path, reviews_csv: Path) -> None:
    cache = tmp_path / "cache"
    legacy = cache / ".atlas-k2j4x9"  # what a kill -9 during the data stage used to leave
    (legacy / "tokenizer").mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    mine = cache / "r" / f".atlas-{dead.stdout.strip()}-abc"  # a dead pid's, in the run folder
    (mine / "tokenizer").mkdir(parents=True)
    partial = cache / "r" / ".instances.parquet.x1y2.tmp"
    partial.write_bytes(b"half")
    live = cache / f".atlas-{os.getpid()}-busy"  # a live process's work: kept
    live.mkdir()
    assert main(_run_args(reviews_csv, cache, "r", "--until", "data")) == 0
    assert not legacy.exists() and not mine.exists() and not partial.exists()
    assert live.exists()
    assert store.stage_complete(cache / "r", "data")


def test_a_failed_data_stage_leaves_no_folder(tmp_path: Path, reviews_csv: Path, capsys):
    cache = tmp_path / "cache"
    args = _run_args(reviews_csv, cache, "r", "--until", "data")
    args[args.index("sentiment")] = "no_such_column"
    assert main(args) == 2
    assert "no_such_column" in _error_line(capsys)
    assert _nothing_in(cache) and not (cache / "r").exists()


# -- row 10: a stage whose output file is missing --------------------------------------------------


def test_a_missing_output_is_not_complete_and_run_remakes_it(
    study_run: Path, tmp_path: Path, capsys
) -> None:
    run = _copy_run(study_run, tmp_path, with_checkpoints=True)
    (run / store.SHAPES).unlink()
    assert not store.stage_complete(run, "analyze")
    assert main(["show", str(run), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["status"] != "complete"
    assert payload["stages"]["analyze"]["status"] != "complete"
    assert "does not exist" in payload["problems"]["analyze"]
    assert {r["name"]: r["status"] for r in commands.list_runs(run.parent)}[
        run.name
    ] == "incomplete"
    csv = study_run.parent.parent / "reviews.csv"  # the session run's data, same config
    before = (run / store.TRACIN).stat().st_mtime_ns
    assert main(_run_args(csv, run.parent, run.name)) == 0
    assert (run / store.SHAPES).exists()
    assert store.stage_complete(run, "analyze")
    assert (run / store.TRACIN).stat().st_mtime_ns == before  # only the missing stage ran
    capsys.readouterr()
    assert main(["show", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "complete"


def test_lost_instances_are_made_again(study_run: Path, tmp_path: Path) -> None:
    run = _copy_run(study_run, tmp_path, with_checkpoints=True)
    expected = store.load_instances(run)
    (run / store.INSTANCES).unlink()
    assert not store.stage_complete(run, "data")
    csv = study_run.parent.parent / "reviews.csv"
    assert main(_run_args(csv, run.parent, run.name, "--until", "data")) == 0
    assert store.load_instances(run).equals(expected)


# == issue 24: nothing silently wrong ===============================================================


def _bare_run(tmp_path: Path, status: str = "complete", **manifest: object) -> Path:
    """A run folder holding only a manifest: enough for the commands that lock first."""
    run = tmp_path / "cache" / "r"
    run.mkdir(parents=True)
    store.write_json(run / store.MANIFEST, {"kind": "run", "status": status, **manifest})
    return run


# -- issue 24 item 3: locks that follow nothing ----------------------------------------------------


def test_a_symlinked_lock_is_refused_and_its_target_untouched(tmp_path: Path, capsys) -> None:
    run = _bare_run(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (run / locks.LOCK_FILE).symlink_to(victim)
    assert main(["detect", str(run), "--detectors", "loss"]) == 2
    line = _error_line(capsys)
    assert "symbolic link" in line and str(run / locks.LOCK_FILE) in line
    assert victim.read_text() == "precious\n"
    assert (run / locks.LOCK_FILE).is_symlink()  # refused, not removed: the user looks first
    (run / locks.LOCK_FILE).unlink()
    (run / locks.LOCK_FILE).symlink_to(tmp_path / "not-yet")  # a dangling link creates nothing
    with pytest.raises(AtlasError, match="symbolic link"), locks.hold(run):
        pass
    assert not (tmp_path / "not-yet").exists()
    assert locks.lock_owner(run) is None


def test_a_lock_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    run = _bare_run(tmp_path)
    os.mkfifo(run / locks.LOCK_FILE)
    with pytest.raises(AtlasError, match="not a regular file"), locks.hold(run):
        pass
    (run / locks.LOCK_FILE).unlink()
    (run / locks.LOCK_FILE).mkdir()
    with pytest.raises(AtlasError, match="not a regular file"), locks.hold(run):
        pass


# -- issue 24 item 5: a run's state is what is true ------------------------------------------------


def test_a_running_manifest_nobody_holds_is_interrupted_with_its_resume_command(
    tmp_path: Path, capsys
) -> None:
    command = "python -m core run --preset quick --name r"
    run = _bare_run(tmp_path, "running", command=command, config={})
    (run / locks.LOCK_FILE).write_text('{"pid": 999999}')  # what kill -9 leaves behind
    row = {r["name"]: r for r in commands.list_runs(run.parent)}["r"]
    assert row["status"] == store.STATUS_INTERRUPTED
    assert command in row["note"]
    assert main(["list", "--cache", str(run.parent)]) == 0
    out = capsys.readouterr().out
    assert "interrupted" in out and command in out
    assert main(["show", str(run), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["status"] == "interrupted" and command in payload["note"]
    assert main(["show", str(run)]) == 0
    assert "[interrupted]" in capsys.readouterr().out
    with locks.hold(run):  # a live holder: running it is
        assert store.run_status(run, store.load_manifest(run)) == store.STATUS_RUNNING
        assert {r["name"]: r for r in commands.list_runs(run.parent)}["r"]["note"] is None


def test_a_failed_run_names_its_error_and_resume_command(tmp_path: Path, capsys) -> None:
    command = "python -m core run --preset quick --name r"
    run = _bare_run(tmp_path, "failed", command=command, error="tracin: out of memory")
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "[failed]" in out and "out of memory" in out and command in out


def test_the_app_reads_cores_status(tmp_path: Path) -> None:
    from ui import data, widgets

    run = _bare_run(tmp_path, "running", command="python -m core run --name r", config={})
    assert jobs.progress(run)["status"] == store.STATUS_INTERRUPTED
    assert "python -m core run --name r" in jobs.progress(run)["note"]
    assert "status **interrupted**" in widgets._run_caption(data.Run(run))
    with pytest.raises(data.MissingData, match="interrupted"):
        data.Run(run).require(store.TRACIN, "tracin")


def test_the_app_refuses_stage_arrays_of_the_wrong_shape_in_one_sentence(tmp_path: Path) -> None:
    from tests.runstore_factory import make_run
    from ui import data

    run_dir = make_run(tmp_path / "cache", epochs=2)
    run = data.Run(run_dir)
    n, te, tr = len(run.instances), len(run.test), len(run.train)
    assert run.logits().shape[1] == n and run.per_checkpoint().shape[1:] == (te, tr)
    assert run.tracin().shape == run.distances().shape == (te, tr)
    wrong = {
        store.LOGITS: (run.logits, (2, n + 1, 2), f"(epochs, {n}, 2)"),
        store.TRACIN_PER_CHECKPOINT: (run.per_checkpoint, (2, te), f"(k, {te}, {tr})"),
        store.TRACIN: (run.tracin, (tr, te), f"({te}, {tr}) (test × train)"),
        store.DISTANCES: (run.distances, (te, tr, 1), f"({te}, {tr}) (test × train)"),
    }
    for name, (read, shape, expected) in wrong.items():
        np.save(run_dir / name, np.zeros(shape, dtype=np.float32))
        with pytest.raises(AtlasError) as err:
            read()
        assert str(err.value) == f"{run_dir / name} has shape {shape}, expected {expected}."


# -- issue 24 item 4: damage is rebuilt or refused -------------------------------------------------


def _truncate(path: Path) -> bytes:
    """Cut a file to half its length; return what it held."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return raw


def test_the_tracin_command_remakes_a_truncated_matrix(
    study_run: Path, tmp_path: Path, capsys
) -> None:
    run = _copy_run(study_run, tmp_path, with_checkpoints=True)
    whole = _truncate(run / store.TRACIN)
    assert main(["tracin", str(run), "--device", "cpu"]) == 0
    assert "truncated" in capsys.readouterr().err  # said, not silent
    assert (run / store.TRACIN).read_bytes() == whole
    assert store.stage_problem(run, "tracin") is None


def test_run_remakes_a_truncated_matrix(study_run: Path, tmp_path: Path, capsys) -> None:
    run = _copy_run(study_run, tmp_path, with_checkpoints=True)
    whole = _truncate(run / store.TRACIN)
    csv = study_run.parent.parent / "reviews.csv"  # the session run's data, same config
    assert main(_run_args(csv, run.parent, run.name)) == 0
    assert (run / store.TRACIN).read_bytes() == whole
    capsys.readouterr()
    assert main(["show", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "complete"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_analyze_refuses_scores_that_are_not_finite(
    study_run: Path, tmp_path: Path, capsys, bad: float
) -> None:
    run = _copy_run(study_run, tmp_path, with_checkpoints=True)
    scores = np.array(store.read_npy(run / store.TRACIN))
    scores[0, :] = bad
    store.write_npy(run / store.TRACIN, scores)
    before = (run / store.SHAPES).read_bytes()
    assert main(["analyze", str(run), "--force"]) == 2
    line = _error_line(capsys)
    assert "NaN or infinite" in line and "tracin stage" in line and "python -m core tracin" in line
    assert (run / store.SHAPES).read_bytes() == before  # nothing analysed over them


# -- issue 24 item 8: smaller ones -----------------------------------------------------------------


def test_show_reports_a_deleted_checkpoint_and_tracin_does_not_blame_shipping(
    study_run: Path, tmp_path: Path, capsys
) -> None:
    run = _copy_run(study_run, tmp_path, with_checkpoints=True)
    shutil.rmtree(run / store.CHECKPOINTS_DIR / "epoch-01")
    assert main(["show", str(run), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["status"] == "damaged"
    assert str(run / store.CHECKPOINTS_DIR / "epoch-01") in payload["problems"]["train"]
    assert "python -m core run" in payload["problems"]["train"]
    assert store.missing_heavy_tier(run) == []  # a damaged local run, not a shipped one
    assert main(["tracin", str(run), "--device", "cpu"]) == 2
    line = _error_line(capsys)
    assert "epoch-01" in line and "shipped" not in line


def _whole_checkpoint(folder: Path) -> Path:
    """A checkpoint folder with every file training writes, each whole (and tiny)."""
    from core.learning.training import EPOCH_LOGITS, EPOCH_STATE

    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # no tensors
    np.savez(folder / EPOCH_LOGITS, train=np.zeros((1, 2)))
    (folder / EPOCH_STATE).write_text("{}")
    return folder


def test_training_resumes_only_after_an_unbroken_row_of_checkpoints(tmp_path: Path) -> None:
    from core.learning.training import completed_epochs

    for name in ("epoch-02", "epoch-03", "epoch-04.partial"):
        _whole_checkpoint(tmp_path / name)
    assert completed_epochs(tmp_path) == []  # epoch-01 lost: start again there
    _whole_checkpoint(tmp_path / "epoch-01")
    assert completed_epochs(tmp_path) == [1, 2, 3]  # a killed rename's .partial is no epoch
    # A file cut short is no checkpoint either: training starts again at it.
    weights = tmp_path / "epoch-02" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    assert completed_epochs(tmp_path) == [1]


def test_a_shard_refusal_names_the_option_not_an_internal_field() -> None:
    from core.influence.shards import options_difference

    common = {"scope": "all", "dtype": "float32", "chunk_size": 512, "checkpoints": []}
    factorized = {**common, "project": "factorized:64", "seed": 0, "identity": False}
    exact = {**common, "project": None, "seed": None}
    phrase = options_difference(factorized, exact)
    assert phrase == "--project factorized:64 (this request: no --project)"
    assert options_difference({**exact, "scope": "head"}, exact) == (
        "--params head (this request: --params all)"
    )
    test_only = options_difference({**factorized, "identity": True}, factorized)
    assert "True" not in test_only and "this request" not in test_only  # words, not a field


def _refused_file(tmp_path: Path, capsys, name: str, content: str, *extra: str) -> str:
    """Run the data stage on a file; return the one-sentence refusal (nothing is written)."""
    path = tmp_path / name
    path.write_text(content, "utf-8")
    cache = tmp_path / "cache"
    args = ["run", *TINY_ARGS, "--dataset", str(path), "--text-col", "review"]
    args += ["--label-col", "sentiment", *extra, "--cache", str(cache), "--until", "data"]
    assert main(args) == 2
    assert _nothing_in(cache)
    return _error_line(capsys)


def _jsonl_rows(n: int, row: str) -> str:
    """``n`` JSON lines of a synthetic review file, the first one replaced by ``row``."""
    rows = synthetic_reviews(n)
    lines = [json.dumps(r) for r in rows.to_dict("records")]
    return "\n".join([row, *lines[1:]]) + "\n"


def test_a_csv_naming_a_column_twice_is_refused(tmp_path: Path, capsys) -> None:
    rows = synthetic_reviews(200)
    body = "\n".join(f"{t},other {i},{s}" for i, (t, s) in enumerate(rows.to_numpy()))
    line = _refused_file(tmp_path, capsys, "two.csv", "review,review,sentiment\n" + body + "\n")
    assert "two columns named 'review'" in line and "columns 1 and 2" in line


def test_jsonl_with_a_repeated_key_is_refused(tmp_path: Path, capsys) -> None:
    row = '{"review": "great item", "sentiment": "pos", "sentiment": "neg"}'
    line = _refused_file(tmp_path, capsys, "dup.jsonl", _jsonl_rows(200, row))
    assert "line 1" in line and "'sentiment' twice" in line


@pytest.mark.parametrize("value", ['["neg"]', '{"v": "neg"}'])
def test_nested_json_values_are_not_labels(tmp_path: Path, capsys, value: str) -> None:
    row = '{"review": "great item", "sentiment": ' + value + "}"
    line = _refused_file(tmp_path, capsys, "nested.jsonl", _jsonl_rows(200, row))
    assert "row 1" in line and "column 'sentiment' holds a JSON" in line


@pytest.mark.parametrize("flag", ["--pos-min", "--neg-max"])
def test_rating_cuts_with_a_label_column_are_refused(
    tmp_path: Path, reviews_csv: Path, capsys, flag: str
) -> None:
    cache = tmp_path / "cache"
    assert main(_run_args(reviews_csv, cache, "r", flag, "4", "--until", "data")) == 2
    assert "apply to --rating-col" in _error_line(capsys)
    assert _nothing_in(cache)


# -- issue 24 item 7: I/O errors are sentences -----------------------------------------------------


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (PermissionError(13, "Permission denied"), "write access"),
        (OSError(30, "Read-only file system"), "writable path"),
        (OSError(28, "No space left on device"), "free some space"),
    ],
)
def test_an_os_error_while_writing_is_one_sentence_exit_1(
    tmp_path: Path, capsys, monkeypatch, error: OSError, needle: str
) -> None:
    import core.analysis.analyze

    run = _bare_run(tmp_path)
    error.filename = str(run / store.ANALYSIS)

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(core.analysis.analyze, "analyze_run", refuse)
    assert main(["analyze", str(run), "--force"]) == 1
    line = _error_line(capsys)
    assert str(run / store.ANALYSIS) in line and error.strerror in line and needle in line


def test_half_written_checkpoints_are_cleaned_on_the_next_start(tmp_path: Path) -> None:
    from core.learning.training import clean_partial, completed_epochs

    ckpts = tmp_path / "checkpoints"
    _whole_checkpoint(ckpts / "epoch-01")
    litter = [ckpts / "epoch-02.partial", ckpts / ".epoch-02.partial.k3j2x1"]
    for folder in litter:
        (folder / "weights").mkdir(parents=True)
    assert sorted(clean_partial(ckpts)) == sorted(litter)
    assert [p.name for p in ckpts.iterdir()] == ["epoch-01"]
    assert completed_epochs(ckpts) == [1]


# -- issue 24 item 1: provenance over the whole chain ----------------------------------------------

# A tiny run, smaller still than the session's: the chain tests train it more than once.
_CHAIN_ARGS = ["--n-train", "48", "--flip-count", "4", "--epochs", "2"]


def _chain_run(tmp_path: Path) -> tuple[list[str], Path, Path]:
    """A complete tiny run from its own CSV: (the command's argv, the CSV, the run folder)."""
    csv = tmp_path / "f.csv"
    synthetic_reviews(160, seed=2).to_csv(csv, index=False)
    argv = [*_run_args(csv, tmp_path / "cache", "r"), *_CHAIN_ARGS]
    assert main(argv) == 0
    return argv, csv, tmp_path / "cache" / "r"


def _invert_labels(csv: Path) -> None:
    """The issue's edit: every label of the file inverted."""
    import pandas as pd

    frame = pd.read_csv(csv)
    frame["sentiment"] = frame["sentiment"].map({"pos": "neg", "neg": "pos"})
    frame.to_csv(csv, index=False)


def _consistent(run: Path) -> None:
    """Every stage of ``run`` made from its inputs as they are now (never a mix)."""
    from core.storage import provenance

    assert provenance.stale_stages(run) == {}
    now = provenance.training_data(run)
    for entry in store.load_manifest(run)["checkpoints"]:
        state = json.loads((run / entry["path"] / "epoch_state.json").read_text())
        assert state["trained_on"] == now, entry["path"]
    record = provenance.read_record(run, "tracin")
    for entry in store.load_manifest(run)["checkpoints"]:
        assert (
            record["inputs"][entry["path"]]["sha1"]
            == provenance.fingerprint(run / entry["path"])["sha1"]
        )


@pytest.mark.usefixtures("one_torch_thread")
def test_an_edited_data_file_is_never_mixed_with_the_old_checkpoints(
    tmp_path: Path, capsys
) -> None:
    from core.storage import provenance

    argv, csv, run = _chain_run(tmp_path)
    _consistent(run)
    original = csv.read_bytes()
    tracin = (run / store.TRACIN).read_bytes()
    _invert_labels(csv)
    capsys.readouterr()
    # The same command: refused in one sentence naming the file and the two ways forward.
    assert main(argv) == 2
    line = _error_line(capsys)
    assert str(csv) in line and "restore" in line and "--name" in line
    assert (run / store.TRACIN).read_bytes() == tracin
    # list and show say which stage is stale, and why.
    assert main(["list", "--cache", str(run.parent)]) == 0
    assert f"stale: data ({csv} changed after data ran)" in capsys.readouterr().out
    # The second step: the data stage's file deleted too. Still refused, never mixed.
    (run / store.INSTANCES).unlink()
    assert main(argv) == 2
    assert "restore" in _error_line(capsys)
    assert store.run_status(run, store.load_manifest(run)) != store.STATUS_COMPLETE
    # The file restored: the same command rebuilds the same data and keeps the checkpoints.
    csv.write_bytes(original)
    checkpoints = provenance.fingerprint(run / store.CHECKPOINTS_DIR)["sha1"]
    assert main(argv) == 0
    _consistent(run)
    assert provenance.fingerprint(run / store.CHECKPOINTS_DIR)["sha1"] == checkpoints
    assert (run / store.TRACIN).read_bytes() == tracin


@pytest.mark.usefixtures("one_torch_thread")
def test_new_instances_retrain_from_the_first_epoch_and_say_so(tmp_path: Path, capsys) -> None:
    from core.storage import provenance

    argv, csv, run = _chain_run(tmp_path)
    old = store.load_instances(run)
    # The record of the source lost as well: only the checkpoints know their data.
    _invert_labels(csv)
    (run / store.INSTANCES).unlink()
    (run / provenance.PROVENANCE_DIR / "data.json").unlink()
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "trained on other data; training again from epoch 1" in err
    _consistent(run)
    assert not store.load_instances(run).equals(old)  # the edited file's data, retrained
    assert store.run_status(run, store.load_manifest(run)) == store.STATUS_COMPLETE


def test_tracin_and_analyze_refuse_checkpoints_of_other_instances(
    study_run: Path, tmp_path: Path, capsys
) -> None:
    run = _copy_run(study_run, tmp_path, with_checkpoints=True)
    frame = store.load_instances(run)
    frame["observed_label"] = 1 - frame["observed_label"]
    store.write_parquet(run / store.INSTANCES, frame)
    tracin = (run / store.TRACIN).read_bytes()
    for args in (["tracin", str(run), "--device", "cpu"], ["analyze", str(run), "--force"]):
        assert main(args) == 2
        line = _error_line(capsys)
        assert "train stage" in line and "stale" in line and "python -m core run" in line
    assert (run / store.TRACIN).read_bytes() == tracin
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "trained on another instances.parquet" in out


def test_plain_show_names_a_stale_clean_stage(study_run: Path, tmp_path: Path, capsys) -> None:
    from core.storage import provenance

    run = _copy_run(study_run, tmp_path)
    (run / store.CLEANING_DIR).mkdir()
    provenance.record_stage_inputs(run, "clean", {"detector": "loss"})
    store.write_parquet(run / store.DETECTORS, store.load_instances(run)[["id"]])
    assert main(["show", str(run)]) == 0
    assert f"clean          stale: {store.DETECTORS} appeared after clean ran" in (
        capsys.readouterr().out
    )


# -- issue 24 item 2: inputs that cannot crash the tokenizer ---------------------------------------


def _long_token_csv(tmp_path: Path) -> Path:
    """The issue's file: one unbroken 250,000-character word in the text of data row 7."""
    frame = synthetic_reviews(200)
    frame.loc[6, "review"] = "x" * 250_000
    path = tmp_path / "long.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_a_250000_character_word_is_one_sentence_before_any_tokenizer(
    tmp_path: Path, capsys, extra: list[str]
) -> None:
    csv = _long_token_csv(tmp_path)
    cache = tmp_path / "cache"
    # In a child process: on the old code MeCab's segmentation fault would end pytest too.
    argv = [sys.executable, "-m", "core", *_run_args(csv, cache, "r", "--until", "data"), *extra]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "Data row 7" in lines[0] and "250,000-character" in lines[0]
    assert _nothing_in(cache / "r")  # no folder left 'running', no lock, no temporaries


def test_the_upload_check_applies_the_same_text_rule(tmp_path: Path) -> None:
    from ui import study

    df = study.parse_upload(_long_token_csv(tmp_path).read_bytes(), "long.csv")
    problems, _ = study.validate_table(df, "review", label_col="sentiment")
    assert len(problems) == 1 and "Data row 7" in problems[0]


# -- issue 24 item 2: a native crash in a worker ---------------------------------------------------


def _error_lines(err: str) -> list[str]:
    """The ``error:`` lines of a command's stderr (progress bars left out); never a traceback."""
    assert "Traceback" not in err, err[-2000:]
    return [ln for ln in err.splitlines() if ln.startswith("error:")]


def test_a_worker_that_dies_of_sigsegv_is_one_sentence_and_the_run_resumable(
    study_run: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from core.execution.executors import ENV_CRASH

    run = _copy_run(study_run, tmp_path, with_checkpoints=True)
    whole = np.load(run / store.TRACIN)
    _truncate(run / store.TRACIN)  # the tracin stage is due again
    csv = study_run.parent.parent / "reviews.csv"
    argv = _run_args(csv, run.parent, run.name, "--executor", "processes", "--workers", "2")
    # The worker computing the first checkpoint's task dies as MeCab did: SIGSEGV, no word.
    monkeypatch.setenv(ENV_CRASH, "ckpt-00_chunks-0000-0000")
    capsys.readouterr()
    assert main(argv) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "worker process of the tracin stage" in line and "died of SIGSEGV" in line
    assert "rerun `python -m core run " in line and "--executor processes" in line
    # Not 'running': failed, with its error and the command that resumes it; the lock is free.
    assert locks.lock_owner(run) is None
    row = {r["name"]: r for r in commands.list_runs(run.parent)}[run.name]
    assert row["status"] == store.STATUS_FAILED
    assert "SIGSEGV" in row["note"] and "resume it with `python -m core run" in row["note"]
    assert main(["show", str(run), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["status"] != store.STATUS_COMPLETE
    assert payload["stages"]["tracin"]["status"] == store.STATUS_INTERRUPTED
    # Resumable: the same run (here in this process, to spare a second pool) completes.
    monkeypatch.delenv(ENV_CRASH)
    assert main(_run_args(csv, run.parent, run.name)) == 0
    assert store.run_status(run, store.load_manifest(run)) == store.STATUS_COMPLETE
    assert store.stage_problem(run, "tracin") is None
    np.testing.assert_allclose(np.load(run / store.TRACIN), whole, rtol=1e-5, atol=1e-7)


def test_a_stage_command_that_died_leaves_the_run_interrupted_not_complete(
    tmp_path: Path, capsys
) -> None:
    """`tracin` on a complete run, killed part-way: the manifest still says complete."""
    run = _bare_run(tmp_path, command="python -m core run --name r", config={})
    store.mark_stage(run, "tracin", store.STATUS_RUNNING)
    assert store.run_status(run, store.load_manifest(run)) == store.STATUS_INTERRUPTED
    assert main(["show", str(run)]) == 0
    out = capsys.readouterr().out
    assert "[interrupted]" in out and "tracin         interrupted" in out
    assert "python -m core run --name r" in out
    with locks.hold(run):  # while its command runs, it is running
        assert store.run_status(run, store.load_manifest(run)) == store.STATUS_RUNNING


# -- issue 24 item 7: a full disk while a checkpoint is saved, a read-only export --------------------


@pytest.mark.usefixtures("one_torch_thread")
def test_a_full_disk_while_saving_a_checkpoint_is_one_sentence_and_cleaned(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import transformers.modeling_utils
    from safetensors import SafetensorError

    csv = tmp_path / "f.csv"
    synthetic_reviews(160, seed=2).to_csv(csv, index=False)
    argv = [*_run_args(csv, tmp_path / "cache", "r"), *_CHAIN_ARGS, "--until", "train"]
    ckpts = tmp_path / "cache" / "r" / store.CHECKPOINTS_DIR
    written = []

    def full_disk(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"\0" * 64)  # what a full disk leaves: the start of a file
        written.append(filename)
        # The exception safetensors raises on ENOSPC (its wording, as seen on a full tmpfs).
        raise SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    capsys.readouterr()
    assert main(argv) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert line == (
        f"error: {ckpts / 'epoch-01'}: No space left on device; free some space, then rerun "
        "the same command to resume."
    )
    assert written and list(ckpts.iterdir()) == []  # the half-written folders went at once
    row = {r["name"]: r for r in commands.list_runs(ckpts.parent.parent)}["r"]
    assert row["status"] == store.STATUS_FAILED and "No space left on device" in row["note"]
    # Space freed; a kill during a save had also left its folders: the rerun removes them.
    monkeypatch.undo()
    for litter in (".epoch-02.partial.k3j2x1", "epoch-02.partial"):
        (ckpts / litter / "weights").mkdir(parents=True)
    assert main(argv) == 0
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch-01", "epoch-02"]
    assert store.stage_complete(ckpts.parent, "train")


def test_a_write_error_behind_a_librarys_wording_is_found() -> None:
    import errno

    from core.learning.models import disk_error

    # torch.save into a file object: its RuntimeError has the file's OSError as context.
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos"
            ) from None
    except RuntimeError as exc:
        exc.__suppress_context__ = False
        found = disk_error(exc, "/x/epoch-03")
    assert (found.errno, found.filename) == (errno.ENOSPC, "/x/epoch-03")
    found = disk_error(Exception("I/O error: Read-only file system (os error 30)"), "/x")
    assert found.errno == errno.EROFS and found.strerror == os.strerror(errno.EROFS)
    # Not a write error (a bug): nothing is invented, the exception is raised as it is.
    assert disk_error(RuntimeError("size mismatch for bert.embeddings"), "/x") is None
    assert disk_error(ValueError("(os error 99999)"), "/x") is None


def test_an_export_to_a_read_only_folder_names_the_file(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import errno
    import tempfile

    from tests.runstore_factory import make_run

    run = make_run(tmp_path / "cache")
    out = tmp_path / "mounted-ro" / "queue.csv"
    out.parent.mkdir()
    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):  # what a read-only mount answers there
        if dir is not None and Path(dir) == out.parent:
            raise OSError(errno.EROFS, "Read-only file system", str(out.parent / ".queue.tmp"))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert main(["export", str(run), "--detector", "loss", "--out", str(out)]) == 1
    assert _error_line(capsys) == (
        f"error: {out}: Read-only file system; choose a writable path (another --out or --cache)."
    )
    assert list(out.parent.iterdir()) == []


# -- issue 24 acceptance: a property test over kills, edits and damaged files ----------------------

# Random sequences, each from its seed: the run made from f.csv, then steps of (a perturbation:
# the data file edited, a stage file deleted or truncated, or none) followed by the run's own
# command, that command killed with SIGKILL at a random moment first for some steps. After each
# command: exit 0 and every stage byte-identical to a fresh run of the file as it is now, or
# exit 2 with one sentence; a run reported complete is never a mix. $ATLAS_PROPERTY_SEQUENCES
# asks for more sequences (a deeper search) than the suite's default.
_SEQUENCES = int(os.environ.get("ATLAS_PROPERTY_SEQUENCES", "4"))
_STEPS = 4
# Run metadata, not stage files: compared by the checks below, never damaged by the steps.
_METADATA = {store.MANIFEST, "provenance", "progress.json", store.TRACIN_SHARDS_DIR}
_KILLED_CHILD = (
    "import sys\n"
    "import core.analysis.geometry\n"
    "from tests.test_hardening import _umap_stand_in\n"
    "core.analysis.geometry._umap_2d = _umap_stand_in\n"
    "from core.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _umap_stand_in(x: np.ndarray, seed: int) -> np.ndarray:
    """PCA in place of UMAP for the property test: UMAP's first fit in each process compiles
    for ~20 s; the analyze stage's provenance, what the test is about, is the same."""
    from core.analysis import geometry

    return geometry._pca_2d(x, seed)


def _sha1(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(data).hexdigest()


class _Study:
    """One tiny study's data file, its run, and fresh reference runs of each content it held."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.csv = root / "f.csv"
        synthetic_reviews(160, seed=2).to_csv(self.csv, index=False)
        self.original = self.csv.read_bytes()
        self.contents = {_sha1(self.original): self.original}
        self.refs: dict[str, Path] = {}
        self.run = root / "cache" / "r"

    def argv(self, cache: Path) -> list[str]:
        return [*_run_args(self.csv, cache, "r"), *_CHAIN_ARGS]

    def reference(self, sha1: str) -> Path:
        """A fresh run of the content ``sha1`` the file held (the file is put back after)."""
        if sha1 not in self.refs:
            now = self.csv.read_bytes()
            self.csv.write_bytes(self.contents[sha1])
            cache = self.root / "refs" / sha1[:10]
            assert main(self.argv(cache)) == 0
            self.csv.write_bytes(now)
            self.refs[sha1] = cache / "r"
        return self.refs[sha1]

    def edit(self, rng) -> str:
        """Invert every label, change one row's text, or put the original file back."""
        import io

        import pandas as pd

        kind = rng.choice(["invert", "row", "restore"])
        if kind == "restore":
            self.csv.write_bytes(self.original)
            return "data file restored"
        frame = pd.read_csv(self.csv)
        if kind == "invert":
            frame["sentiment"] = frame["sentiment"].map({"pos": "neg", "neg": "pos"})
        else:
            row = rng.randrange(len(frame))
            frame.loc[row, "review"] = f"{frame.loc[row, 'review']} edited"
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False)
        data = buffer.getvalue().encode()
        self.contents[_sha1(data)] = data
        self.csv.write_bytes(data)
        return f"data file edited ({kind})"


def _stage_paths(run: Path) -> tuple[list[Path], list[Path]]:
    """(what a step may delete, what it may truncate) among the run's stage files."""
    files, folders = [], []
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run)
        if rel.parts[0] in _METADATA or any(p.startswith(".") for p in rel.parts):
            continue
        if path.is_file() and path.stat().st_size > 0:
            files.append(path)
        elif path.is_dir() and (
            path.parent.name == store.CHECKPOINTS_DIR or rel.parts == ("tokenizer",)
        ):
            folders.append(path)
    return files + folders, files


def _same_as(run: Path, ref: Path, context: str) -> None:
    """Every stage file of ``ref`` is in ``run`` with the same bytes (epoch timings aside)."""
    from core.learning.training import EPOCH_STATE, OPTIMIZER_STATE

    for path in sorted(ref.rglob("*")):
        rel = path.relative_to(ref)
        # The optimizer state only continues training, which a complete run never does
        # (a resume without it trains again: its weights are compared here).
        if not path.is_file() or rel.parts[0] in _METADATA or rel.name == OPTIMIZER_STATE:
            continue
        mine = run / rel
        assert mine.is_file(), f"{rel} missing after {context}"
        if rel.name == EPOCH_STATE:  # holds the epoch's wall time
            theirs, ours = (json.loads(p.read_text()) for p in (path, mine))
            assert {**ours, "seconds": 0} == {**theirs, "seconds": 0}, f"{rel} after {context}"
        else:
            assert mine.read_bytes() == path.read_bytes(), (
                f"{rel} differs from a fresh run of the same data after {context}"
            )


def _run_killed(argv: list[str], run: Path, delay: float) -> str:
    """The command in a child process, SIGKILLed ``delay`` s after it first writes to the run."""
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the same bits
    before = {p: p.stat().st_mtime_ns for p in (run, run / store.MANIFEST) if p.exists()}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD, *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline:
        if any(p.exists() and p.stat().st_mtime_ns != t for p, t in before.items()):
            break  # it has started writing: the interesting moments begin
        time.sleep(0.02)
    time.sleep(delay)
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
        child.wait()
        return f"killed -9 {delay:.2f} s into its writes"
    return f"finished before the kill (exit {child.returncode})"


def _check_outcome(study: _Study, rc: int, err: str, log: list[str]) -> None:
    """Exit 0 and the run equals a fresh one of the file as it is now; or exit 2 in one
    sentence, and a run reported complete is made from one content only (stale if edited).
    With the file the run was made from, only exit 0: damage is rebuilt, never a dead end."""
    context = "; ".join(log)
    assert "Traceback" not in err, f"{context}\n{err[-3000:]}"
    payload = show_payload(study.run)
    now = _sha1(study.csv.read_bytes())
    if now == _sha1(study.original):  # damage alone is rebuilt, never a refusal to go on
        assert rc == 0, f"exit {rc} after {context}\n{err[-3000:]}"
    if rc == 0:
        assert payload["status"] == store.STATUS_COMPLETE, context
        assert payload["problems"] == {} and payload["stale"] == {}, (context, payload["stale"])
        _same_as(study.run, study.reference(now), context)
        _consistent(study.run)
        return
    assert rc == 2, f"exit {rc} after {context}\n{err[-3000:]}"
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, (context, errors)
    if payload["status"] == store.STATUS_COMPLETE:
        from core.storage import provenance

        inputs = (provenance.read_record(study.run, "data") or {}).get("inputs") or {}
        made_from = next(iter(inputs.values()))["sha1"]
        if not set(payload["stale"]) - {"data"}:
            _same_as(study.run, study.reference(made_from), context)
        if made_from != now:
            assert "data" in payload["stale"], (context, payload["stale"])


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_random_kills_edits_and_damage_end_consistent_or_in_one_sentence_property_edits_and_damage_end_consistent_or_in_one_sentence(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import random

    import core.analysis.geometry

    monkeypatch.setattr(core.analysis.geometry, "_umap_2d", _umap_stand_in)
    study = _Study(tmp_path)
    baseline = study.reference(_sha1(study.original))
    for seed in range(_SEQUENCES):
        rng = random.Random(seed)
        shutil.rmtree(study.run.parent, ignore_errors=True)
        shutil.copytree(baseline, study.run)
        study.csv.write_bytes(study.original)
        argv = study.argv(study.run.parent)
        log = [f"sequence {seed}"]
        for _ in range(_STEPS):
            deletable, truncatable = _stage_paths(study.run)
            kind = rng.choice(["edit", "delete", "truncate", "truncate", "none"])
            if kind == "edit":
                log.append(study.edit(rng))
            elif kind == "delete" and deletable:
                target = rng.choice(deletable)
                shutil.rmtree(target) if target.is_dir() else target.unlink()
                log.append(f"deleted {target.relative_to(study.run)}")
            elif kind == "truncate" and truncatable:
                target = rng.choice(truncatable)
                data = target.read_bytes()
                target.write_bytes(data[: rng.randrange(len(data))])
                log.append(f"truncated {target.relative_to(study.run)}")
            if kind in ("delete", "truncate", "none") and rng.random() < 0.4:
                log.append(_run_killed(argv, study.run, rng.uniform(0.0, 3.0)))
            capsys.readouterr()
            rc = main(argv)
            log.append(f"run: exit {rc}")
            _check_outcome(study, rc, capsys.readouterr().err, log)


def test_an_unwritable_stage_file_names_itself_not_a_temporary(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """`chattr +i` on a file the command rewrites: the rename onto it fails with EPERM."""
    import errno

    from tests.runstore_factory import make_run

    run = make_run(tmp_path / "cache")
    target = run / store.CLEANING_DIR / "review_queue_loss.csv"
    real = os.replace

    def immutable(src, dst, *args, **kwargs):
        if Path(dst) == target:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", immutable)
    assert main(["export", str(run), "--detector", "loss"]) == 1
    assert _error_line(capsys) == (
        f"error: {target}: Operation not permitted; give this user write access (or remove the "
        "file's immutable flag) or choose another path."
    )
    assert not target.exists() and not list(target.parent.glob(".*.tmp"))  # no temporary left
