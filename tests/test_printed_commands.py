"""Every command the README and the app print works, as printed, in the README's shell.

README: every ``python -m core`` line of its code blocks and every inline `python -m core …`
span is a key of :data:`README_COMMANDS`, whose value lists what a user would type for it
(placeholders filled in: ``cache/<run>`` is a tiny complete run, ``DIM`` a dimension, the
Rakuten file a small stand-in with the same columns). A README command missing from the
table fails the first test, so no printed command goes unchecked.

App: every page is rendered on three stores (a fresh clone's shipped runs, small files only;
a tiny complete run with checkpoints and no interventions yet; an empty store) and every
command it shows in a code block or in inline code is collected and run.

Commands that train for minutes (``run`` and ``sweep`` of a built-in preset) run with
``--dry-run``, which makes every check they make before working and writes nothing; all others
run fully, each on its own copy of the tiny run. A command passes when it exits 0 without an
error line.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from conftest import synthetic_reviews

REPO = Path(__file__).resolve().parents[1]
RUN = "cache/<run>"

# README line → what is typed for it ("{run}" is a fresh copy of the tiny complete run).
README_COMMANDS: dict[str, list[str]] = {
    "python -m core app [--cache DIR] [--port N]": [
        "python -m core app",
        "python -m core app --cache cache --port 8600",
    ],
    "python -m core run --preset quick": ["python -m core run --preset quick"],
    "python -m core run --preset paper": ["python -m core run --preset paper"],
    "python -m core run --preset paper --dry-run": ["python -m core run --preset paper --dry-run"],
    "python -m core list": ["python -m core list"],
    f"python -m core show {RUN} [--json]": [
        "python -m core show {run}",
        "python -m core show {run} --json",
    ],
    f"python -m core tracin {RUN} [--params all|no-word-embeddings|last-N|head] "
    "[--project DIM|factorized:K --seed S]": [
        "python -m core tracin {run}",
        "python -m core tracin {run} --params head",
        "python -m core tracin {run} --params last-1 --project 8 --seed 1",
        "python -m core tracin {run} --params all --project factorized:4 --seed 1",
    ],
    f"python -m core tracin {RUN} --compare --params head": [
        "python -m core tracin {run} --compare --params head"
    ],
    f"python -m core analyze {RUN} [--checkpoint -1 --s-min 0.24 --z-max -0.05 --trim 0.05 "
    "--k 10 --force]": [
        "python -m core analyze {run}",
        "python -m core analyze {run} --checkpoint -1 --s-min 0.24 --z-max -0.05 --trim 0.05 "
        "--k 10 --force",
    ],
    f"python -m core detect {RUN}": ["python -m core detect {run}"],
    f"python -m core claims {RUN} [--json]": [
        "python -m core claims {run}",
        "python -m core claims {run} --json",
    ],
    "python -m core claims RUN|GROUP|SWEEP [--json]": [
        "python -m core claims {run}",
        "python -m core claims cache/sweep-quick --json",
    ],
    f"python -m core clean {RUN} --detector self_influence --action exclude|relabel|reweight "
    "--k 40 [--seeds 3]": [
        "python -m core clean {run} --detector self_influence --action exclude --k 40",
        "python -m core clean {run} --detector self_influence --action relabel --k 40 --seeds 1",
        "python -m core clean {run} --detector self_influence --action reweight --k 40 --seeds 1",
    ],
    f"python -m core export {RUN} --detector self_influence --what review|cleaned "
    "[--out file.csv]": [
        "python -m core export {run} --detector self_influence --what review",
        "python -m core export {run} --detector self_influence --what cleaned --out file.csv",
    ],
    "python -m core sweep --preset quick --flip-rates 0,0.025,0.05,0.1,0.2,0.3,0.4 --seeds 3 "
    "[--workers N]": [
        "python -m core sweep --preset quick --flip-rates 0,0.025,0.05,0.1,0.2,0.3,0.4 --seeds 3",
        "python -m core sweep --preset quick --flip-rates 0,0.025,0.05,0.1,0.2,0.3,0.4 "
        "--seeds 3 --workers 2",
    ],
    # Run on a cluster: a Ray head started by the test stands in for the cluster ("auto" joins
    # it), a temporary folder for the shared /shared/atlas.
    "python -m core tracin /shared/atlas/<run> --executor ray --ray-address auto": [
        "python -m core tracin {shared_run} --executor ray --ray-address auto"
    ],
    # CI has no GPU: --device cuda is refused there in one sentence, so --device auto stands in.
    "python -m core sweep --preset paper --flip-rates 0,0.025,0.05,0.1,0.2,0.3,0.4 --seeds 5 "
    "--executor ray --ray-address auto --cache /shared/atlas --device cuda": [
        "python -m core sweep --preset paper --flip-rates 0,0.025,0.05,0.1,0.2,0.3,0.4 --seeds 5 "
        "--executor ray --ray-address auto --cache {shared} --device auto"
    ],
    "python -m core fetch": ["python -m core fetch"],
    "python -m core run --preset paper --dataset rakuten_reviews.tsv --text-col レビュー本文 "
    "--rating-col 評価ポイント --pos-min 4 --neg-max 2": [
        "python -m core run --preset paper --dataset rakuten_reviews.tsv --text-col レビュー本文 "
        "--rating-col 評価ポイント --pos-min 4 --neg-max 2"
    ],
    # The model folder is the user's; a saved small BERT stands in for it.
    "python -m core run --preset paper --model /models/bert-base-japanese-v3 --dataset "
    "rakuten_reviews.tsv --text-col レビュー本文 --rating-col 評価ポイント": [
        "python -m core run --preset paper --model {model} --dataset rakuten_reviews.tsv "
        "--text-col レビュー本文 --rating-col 評価ポイント"
    ],
    "python -m core run --preset paper --detect --name demo-full": [
        "python -m core run --preset paper --detect --name demo-full"
    ],
    # How the demo was made; typed on a fresh clone it finds the run complete and writes
    # nothing (test_the_demos_recorded_command_finds_it_complete_and_writes_nothing).
    "python -m core run --preset paper --name demo --detect": [
        "python -m core run --preset paper --name demo --detect"
    ],
    "python -m core run --preset quick --name es-quick": [
        "python -m core run --preset quick --name es-quick"
    ],
    "python -m core error-study RUN": ["python -m core error-study {run}"],
    "python -m core error-study cache/<run> [--methods last-2,head,dense:256,factorized:16,"
    "factorized:64] [--test-subset misclassified+random:20] [--checkpoints 1,4,7,10] "
    "[--dtype fp32|bf16]": [
        "python -m core error-study {run} --methods last-2,head,dense:256,factorized:16,"
        "factorized:64 --test-subset misclassified+random:20 --checkpoints 1,3 --dtype fp32",
    ],
    # The runs the README's error-study figures come from; the tiny run stands in for them.
    "python -m core error-study cache/demo --methods last-2,factorized:16,factorized:64,head "
    "--test-subset misclassified+random:20": [
        "python -m core error-study {run} --methods last-2,factorized:16,factorized:64,head "
        "--test-subset misclassified+random:20"
    ],
    "python -m core error-study cache/es-quick --methods last-2,last-1,head,dense:256,"
    "factorized:16,factorized:64 --test-subset all": [
        "python -m core error-study {run} --methods last-2,last-1,head,dense:256,factorized:16,"
        "factorized:64 --test-subset all"
    ],
    "python -m core show cache/demo --json": ["python -m core show cache/demo --json"],
    # The extension section adds a detector named final_margin; without that edit the same
    # option is checked with a detector that exists.
    f"python -m core detect {RUN} --detectors final_margin": [
        "python -m core detect {run} --detectors loss"
    ],
}

# Commands that train for minutes, or start a server that runs until stopped, are checked with
# --dry-run (every check, nothing written, nothing started).
LONG = ("run", "sweep", "app")


def readme_commands() -> set[str]:
    """Every ``python -m core`` command of the README and docs/: code-block lines and inline spans."""
    found: set[str] = set()
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text("utf-8")
        # Every fenced block, whatever its language, so fences pair up; only shell blocks count.
        for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
            if lang not in ("", "bash", "sh"):
                continue
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("python -m core"):
                    found.add(" ".join(line.split()))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`(python -m core[^`]*)`", prose):
            span = " ".join(span.split())
            if "…" not in span and len(span.split()) > 4:  # not a bare command name
                found.add(span)
    return found


def command_argv(line: str) -> list[str]:
    """The argv of a printed command in this venv (``python`` is the venv's interpreter)."""
    words = shlex.split(line)
    if words[:3] == ["python", "-m", "core"]:
        words = [sys.executable, "-m", "core", *words[3:]]
    elif words[:1] == ["atlas"]:
        words = [str(Path(sys.executable).with_name("atlas")), *words[1:]]
    else:
        raise AssertionError(f"not a CLI command: {line}")
    sub = words[3] if words[1] == "-m" else words[1]
    if sub in LONG and "--dry-run" not in words:
        words.append("--dry-run")
    return words


def run_printed(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run one printed command as a user would in the README's shell, from ``cwd``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        command_argv(line), cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"`{line}` failed ({proc.returncode}): {proc.stderr[-800:]}"
    assert not re.search(r"^(error|Traceback)", proc.stderr, re.M), proc.stderr[-800:]
    return proc


@pytest.fixture(scope="module")
def detected_run(study_run: Path, tmp_path_factory) -> Path:
    """The session's tiny complete run with its detectors, in a folder of its own."""
    from core.cli import main

    run = tmp_path_factory.mktemp("detected") / "tiny"
    shutil.copytree(study_run, run)
    assert main(["detect", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-machine Ray cluster (``ray start --head``), as the README's cluster section makes."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        pytest.skip("Ray is not installed (pip install -r requirements-ray.txt)")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
    temp = tmp_path_factory.mktemp("ray")
    start = [ray, "start", "--head", "--num-cpus", "2", "--include-dashboard", "false"]
    subprocess.run([*start, "--temp-dir", str(temp)], env=env, check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)


@pytest.fixture(scope="module")
def project(detected_run: Path, tmp_path_factory) -> Path:
    """A working folder as the README's shell sees it: cache/ with the shipped runs as a fresh
    clone has them (tracked files only) and the README's input files."""
    root = tmp_path_factory.mktemp("project")
    shipped = subprocess.run(
        ["git", "ls-files", "cache"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in shipped:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    # A Rakuten-style export: Japanese column names, 1–5 stars (3 is dropped by the rule).
    rows = synthetic_reviews(300, seed=4)
    stars = [5 if s == "pos" else 1 for s in rows["sentiment"]]
    pd.DataFrame({"レビュー本文": rows["review"], "評価ポイント": stars}).to_csv(
        root / "rakuten_reviews.tsv", sep="\t", index=False
    )
    return root


def _fresh_copy(run: Path, where: Path) -> Path:
    dest = where / "cache" / "tiny"
    shutil.copytree(run, dest)
    return dest


def _model_folder(where: Path) -> Path:
    """A saved small BERT classifier with its tokenizer: a stand-in for the user's model."""
    from conftest import tiny_bert
    from transformers import BertTokenizerFast

    folder = where / "bert-model"
    vocab = where / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    vocab.write_text("\n".join(words), "utf-8")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    tiny_bert(len(words)).save_pretrained(folder)
    return folder


def test_every_readme_command_is_in_the_table():
    printed = readme_commands()
    assert len(printed) >= 15
    missing = sorted(printed - set(README_COMMANDS))
    assert not missing, f"README commands without a check here: {missing}"
    gone = sorted(set(README_COMMANDS) - printed)
    assert not gone, f"checks of commands the README no longer prints: {gone}"


def test_long_commands_run_dry_and_write_nothing(project):
    argv = command_argv("python -m core run --preset quick")
    assert argv[-1] == "--dry-run" and argv[0] == sys.executable
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    proc = run_printed("python -m core run --preset quick", project)
    assert "nothing was written" in proc.stdout and "1,600 train" in proc.stdout
    assert sorted(p.relative_to(project) for p in project.rglob("*")) == before


@pytest.mark.parametrize(
    "line", [v for variants in README_COMMANDS.values() for v in variants], ids=lambda s: s[15:70]
)
def test_readme_command_works_as_printed(line, project, detected_run, tmp_path, request):
    cwd = tmp_path / "work"
    cwd.mkdir()
    for name in ("cache", "rakuten_reviews.tsv"):
        src = project / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, cwd / name)
    run = _fresh_copy(detected_run, cwd)
    model = _model_folder(tmp_path) if "{model}" in line else None
    shared = tmp_path / "shared" / "atlas"
    shared_run = None
    if "{shared_run}" in line:
        request.getfixturevalue("ray_head")
        shared_run = shared / "tiny"
        shutil.copytree(run, shared_run)
        for name in ("tracin.npy", "tracin_shards"):  # TracIn to compute, on the cluster
            path = shared_run / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    line = line.format(run=run.relative_to(cwd), model=model, shared=shared, shared_run=shared_run)
    proc = run_printed(line, cwd)
    if " export " in line:
        written = Path(proc.stdout.strip().splitlines()[-1])
        assert (cwd / written).is_file()
    if " clean " in line:
        assert (run / "cleaning" / "results.json").is_file()


# -- the app ---------------------------------------------------------------------------------


def app_commands(cache_dir: Path, monkeypatch, cwd: Path) -> set[str]:
    """Every command the app's pages show for a store: code blocks and inline code."""
    from streamlit.testing.v1 import AppTest

    from ui.pages import PAGES

    monkeypatch.setenv("ATLAS_CACHE", str(cache_dir))
    monkeypatch.chdir(cwd)  # the app prints paths relative to where it was started
    found: set[str] = set()
    for page in PAGES:
        at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
        at.run()
        if page.script:
            at.switch_page(page.script)
            at.run()
        assert not at.exception, [e.value for e in at.exception]
        texts = [c.value for c in at.code]
        for kind in ("markdown", "info", "warning", "caption", "error", "success"):
            texts += [
                el.value for el in at.get(kind) if isinstance(getattr(el, "value", None), str)
            ]
        for text in texts:
            for line in text.splitlines():
                if line.strip().startswith(("python -m core", "atlas ")):
                    found.add(line.strip())
            for span in re.findall(r"`((?:python -m core|atlas) [^`]*)`", text):
                found.add(span.strip())
    return {c for c in found if "…" not in c and "RUN" not in c}


def test_app_commands_work_where_they_are_shown(project, detected_run, tmp_path, monkeypatch):
    # A fresh clone: the shipped runs without checkpoints or tokenizer.
    shown = app_commands(project / "cache", monkeypatch, project)
    # A tiny complete local run, before any intervention.
    local = tmp_path / "local"
    shutil.copytree(detected_run, local / "cache" / "tiny")
    shown_local = app_commands(local / "cache", monkeypatch, local)
    # An empty store.
    (tmp_path / "empty" / "cache").mkdir(parents=True)
    shown_empty = app_commands(tmp_path / "empty" / "cache", monkeypatch, tmp_path / "empty")

    kinds = {shlex.split(c)[3] for c in shown | shown_local | shown_empty}
    assert {"run", "sweep", "clean"} <= kinds, kinds
    # The shipped demo needs a full copy before retraining; the page says how.
    assert "python -m core run --preset paper --detect --name demo-full" in shown
    assert "python -m core clean cache/tiny --detector self_influence --action exclude --k 40" in (
        shown_local
    )

    jobs = [
        (where, line)
        for where, commands in (
            (project, shown),
            (local, shown_local),
            (tmp_path / "empty", shown_empty),
        )
        for line in sorted(commands)
    ]

    def run_in_copy(job: tuple[int, tuple[Path, str]]) -> None:
        index, (where, line) = job
        work = tmp_path / f"run-here-{index}"
        shutil.copytree(where, work, symlinks=True)
        # A command for a full copy (…-full) works once the recreate command has run: the
        # tiny complete run stands in for that copy.
        for name in re.findall(r"cache/([\w.-]+-full)\b", line):
            shutil.copytree(detected_run, work / "cache" / name)
            # The stand-in has 3 checkpoints where the real copy has the shipped run's.
            line = re.sub(r"--checkpoints \S+", "--checkpoints 1,3", line)
        run_printed(line, work)
        shutil.rmtree(work)

    # Each command runs in a fresh Python on its own copy, so two at a time (one torch thread
    # each) is what a 2-core CI machine allows; this was the suite's slowest test run serially.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(run_in_copy, enumerate(jobs)))


@pytest.mark.parametrize(
    "line",
    [
        "python -m core tracin cache/demo",
        "python -m core clean cache/demo --detector self_influence --action exclude --k 40",
        "python -m core tracin cache/ja-demo --compare --params head",
    ],
)
def test_shipped_runs_name_the_command_that_recreates_them(line, project, tmp_path):
    work = tmp_path / "clone"
    shutil.copytree(project, work)
    before = {p: p.stat().st_mtime_ns for p in (work / "cache").rglob("*") if p.is_file()}
    proc = subprocess.run(command_argv(line), cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    recreate = re.search(r"`(python -m core run [^`]+)`", message)
    assert recreate and "--name " + line.split()[4].split("/")[1] + "-full" in recreate.group(1)
    after = {p: p.stat().st_mtime_ns for p in (work / "cache").rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing touched
    run_printed(recreate.group(1), work)  # the command it names works (checked dry)


def test_the_demos_recorded_command_finds_it_complete_and_writes_nothing(project, tmp_path):
    """The command the demo's manifest records, typed for real (not --dry-run) on a fresh
    clone: the run is complete with today's paper preset, so it prints the run and changes
    nothing (no retraining, no rewritten manifest)."""
    work = tmp_path / "clone"
    shutil.copytree(project, work)
    line = store_command(work / "cache" / "demo")
    assert line == "python -m core run --preset paper --name demo --detect"
    before = {p: p.read_bytes() for p in (work / "cache").rglob("*") if p.is_file()}
    argv = command_argv(line)[:-1]  # without the --dry-run added to long commands
    proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-800:]
    assert proc.stdout.strip().splitlines()[-1] == str(Path("cache") / "demo")
    assert {p: p.read_bytes() for p in (work / "cache").rglob("*") if p.is_file()} == before


def store_command(run: Path) -> str:
    """The command a run's manifest records."""
    return json.loads((run / "manifest.json").read_text("utf-8"))["command"]
