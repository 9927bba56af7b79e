"""Executors (core/execution/executors.py): the same files whichever runs the tasks, resume, retries.

The Ray tests start one local Ray instance (2 CPUs, no dashboard) for the module and are
skipped, with the reason, only when Ray is not installed (`make test` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from runstore_factory import make_checkpoint_run
from tracin_reference import saved_checkpoints

from core.cli import main
from core.execution.executors import PROGRESS, Work, check_executor, run_tasks
from core.orchestration.sweep import SWEEP_TABLE
from core.storage import store
from core.storage.errors import AtlasError
from tests.conftest import TINY_ARGS, csv_args, python_lines, synthetic_reviews

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = (
    store.TRACIN,
    store.TRACIN_PER_CHECKPOINT,
    store.SELF_INFLUENCE,
    store.GRAD_NORMS_TRAIN,
    store.GRAD_NORMS_TEST,
)
# 12 training instances in chunks of 4 at 3 checkpoints: 9 tasks of one chunk each.
CHUNK = 4


def _same_files(a: Path, b: Path) -> None:
    for name in OUTPUTS:
        x, y = np.load(a / name), np.load(b / name)
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), name


# ------------------------------------------------------------------ without Ray


def test_choosing_ray_without_ray_is_one_sentence_before_torch(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from core.cli import main\n"
        f"rc = main(['tracin', {str(tmp_path)!r}, '--executor', 'ray'])\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    # The run folder does not exist: the executor check must not be what reports that.
    (tmp_path / store.MANIFEST).write_text("{}")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.stdout.split() == ["2", "False"]
    err = out.stderr.strip().splitlines()
    assert err == [
        "error: --executor ray needs Ray, which is not installed here: "
        "pip install -r requirements-ray.txt."
    ]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "threads"}, "--executor must be one of"),
        ({"kind": "local", "workers": 2}, "needs --executor processes or ray"),
        ({"kind": "processes", "workers": -1}, "--workers must be"),
        ({"kind": "processes", "address": "auto"}, "--ray-address applies to --executor ray"),
        ({"kind": "local", "shared": "no"}, "--ray-shared applies to --executor ray"),
    ],
)
def test_executor_options_are_checked(kwargs, match) -> None:
    with pytest.raises(AtlasError, match=match):
        check_executor(**kwargs)


@pytest.mark.parametrize(
    "checkpoints, chunks, workers, expected",
    [
        (10, 4, 1, 4),  # one worker: a whole checkpoint per task
        (10, 4, 2, 4),  # 10 tasks already give 2 workers 5 each
        (10, 4, 8, 2),  # 16 tasks wanted: two per checkpoint
        (3, 3, 2, 2),  # 4 wanted: two per checkpoint, of 2 and 1 chunks
        (2, 32, 16, 2),  # 32 wanted: 16 per checkpoint
        (2, 3, 64, 1),  # more workers than chunks: one chunk each
        (10, 1, 8, 1),
        (10, 4, None, 1),  # a cluster that sizes itself: the finest tasks
    ],
)
def test_default_chunks_per_task_gives_each_worker_two_tasks(
    checkpoints, chunks, workers, expected
) -> None:
    from core.influence import default_chunks_per_task

    got = default_chunks_per_task(checkpoints, chunks, workers)
    assert got == expected
    tasks = checkpoints * -(-chunks // got)
    if workers is not None and got > 1:
        assert tasks >= 2 * workers  # enough tasks ...
        assert checkpoints * -(-chunks // (got - 1)) > tasks  # ... and no more than needed


def test_expected_workers_follows_the_executor(monkeypatch) -> None:
    from core.execution.executors import expected_workers

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert expected_workers(check_executor("local")) == 1
    assert expected_workers(check_executor("processes")) == 4
    assert expected_workers(check_executor("processes", 3)) == 3
    assert expected_workers(check_executor("ray")) == 8  # a local instance: one per core
    assert expected_workers(check_executor("ray", 5, address="auto")) == 5
    assert expected_workers(check_executor("ray", address="auto")) is None


def test_sweep_jobs_and_workers_must_agree(tmp_path: Path, capsys) -> None:
    tiny = [a for a in TINY_ARGS if a not in ("--flip-count", "8")]
    args = ["sweep", *tiny, "--cache", str(tmp_path), "--name", "sw", "--seeds", "1"]
    assert main([*args, "--jobs", "2", "--executor", "processes", "--workers", "3"]) == 2
    assert "--jobs 2 and --workers 3 disagree" in capsys.readouterr().err
    assert main([*args, "--jobs", "3", "--workers", "2"]) == 2  # --workers alone is --jobs
    assert "--jobs 3 and --workers 2 disagree" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> list[tuple[Path, float]]:
    return saved_checkpoints(tmp_path_factory.mktemp("exec-ckpt"))


@pytest.fixture(scope="module")
def local_run(ckpts, tmp_path_factory) -> Path:
    """The reference: the tracin stage in this process with one torch thread."""
    import torch

    from core.influence import run_tracin

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = make_checkpoint_run(tmp_path_factory.mktemp("exec-local"), ckpts)
        run_tracin(run, device="cpu", progress=False, chunk_size=CHUNK)
    finally:
        torch.set_num_threads(before)
    return run


def test_process_pool_gives_the_local_files_and_reports_workers(ckpts, local_run, tmp_path):
    from core.influence import run_tracin

    run = make_checkpoint_run(tmp_path, ckpts)
    spec = check_executor("processes", 2)
    run_tracin(run, device="cpu", progress=False, chunk_size=CHUNK, executor=spec)
    _same_files(local_run, run)
    report = json.loads((run / PROGRESS).read_text())
    assert report["executor"] == "processes" and report["state"] == "complete"
    # Two workers, 3 checkpoints of 3 chunks: the default cuts each checkpoint in two tasks.
    assert report["done"] == report["total"] == 6
    assert sum(w["tasks"] for w in report["workers"]) == 6
    tracin = store.load_manifest(run)["tracin"]
    assert tracin["executor"] == "processes"
    # Each worker process reports its own peak; the manifest keeps the largest.
    peaks = [w["peak_rss_mb"] for w in report["workers"]]
    assert all(p > 0 for p in peaks) and report["worker_peak_rss_mb"] == max(peaks)
    assert all(w["cpu_seconds_per_task"] > 0 for w in report["workers"])
    assert tracin["worker_peak_rss_mb"] == max(peaks)


def _probe(task: int) -> tuple[str | None, int]:
    """A pool task: the variable the test sets, and the process that forked this worker."""
    return os.environ.get("ATLAS_TEST_PROBE"), os.getppid()


def _probe_name(task: int) -> str:
    return f"probe-{task}"


def _probe_root(task: int) -> str:
    return "."


def _probe_retarget(task: int, folder: str) -> int:
    return task


def _probe_files(task: int) -> list[str]:
    return []


PROBE = Work(
    "probe",
    _probe,
    _probe_name,
    _probe_files,
    _probe_files,
    root=_probe_root,
    retarget=_probe_retarget,
)


def test_pool_workers_fork_from_one_server_and_see_the_drivers_environment(monkeypatch):
    """Two pools in one process: their workers are forks of the same fork server (which imported
    torch and the engine once), and each task sees the driver's environment of its call, not
    the server's of when it started."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork server on this platform: workers are spawned")
    spec = check_executor("processes", 2)
    monkeypatch.setenv("ATLAS_TEST_PROBE", "first")
    first = run_tasks(PROBE, [0, 1, 2], spec, progress=False)
    monkeypatch.setenv("ATLAS_TEST_PROBE", "second")
    second = run_tasks(PROBE, [0, 1, 2], spec, progress=False)
    monkeypatch.delenv("ATLAS_TEST_PROBE")
    third = run_tasks(PROBE, [0, 1, 2], spec, progress=False)
    assert [v for v, _ in first + second + third] == ["first"] * 3 + ["second"] * 3 + [None] * 3
    parents = {ppid for _, ppid in first + second + third}
    assert len(parents) == 1 and os.getpid() not in parents


def test_a_failing_local_task_is_named(ckpts, tmp_path, monkeypatch, capsys):
    run = make_checkpoint_run(tmp_path, ckpts)
    monkeypatch.setenv("ATLAS_TEST_FAIL_TASK", "ckpt-01_chunks-0000-0000")
    capsys.readouterr()
    rc = main(["tracin", str(run), "--device", "cpu", "--chunks-per-task", "1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 1 and len(err) == 1
    assert err[0].startswith("error: Task ckpt-01_chunks-0000-0000 (tracin) failed: RuntimeError")
    # Checkpoint 0's shards (finished before) stay for the rerun.
    assert (run / store.TRACIN_SHARDS_DIR / "ckpt-00_chunk-0000.npy").exists()


# ------------------------------------------------------------------ the same bits whatever the cut

# Texts up to 24 words in chunks of 32: batches large enough that ATen's CPU kernels cut the
# attention's softmax backward among threads. Before every block ran on a fixed thread count
# (core.influence.THREADS), the local run on 2 torch threads and the 1-thread workers of a pool
# gave other last bits with these instances, in both engines (checked on that code).
# 128 training instances: 4 chunks per checkpoint.
WIDE = {"n_train": 128, "n_test": 8, "max_words": 24, "max_length": 32}
WIDE_CHUNK = 32
ENGINES = [None, "factorized:4"]  # the exact engine and the factorized projection


def _wide_run(root: Path, ckpts, project, executor="local", workers=0, per_task=None) -> Path:
    """A wide run's TracIn computed with one cut of the work: executor, workers, chunks per task."""
    from core.influence import run_tracin

    run = make_checkpoint_run(root, ckpts, **WIDE)
    spec = check_executor(executor, workers)
    run_tracin(
        run,
        project=project,
        device="cpu",
        progress=False,
        chunk_size=WIDE_CHUNK,
        executor=spec,
        chunks_per_task=per_task,
    )
    return run


def _differing(reference: Path, run: Path) -> list[str]:
    """The output files of ``run`` that are not bit for bit those of ``reference``."""
    out = []
    for name in OUTPUTS:
        a, b = np.load(reference / name), np.load(run / name)
        if not (a.dtype == b.dtype == np.float32 and np.array_equal(a, b)):
            out.append(name)
    return out


@pytest.fixture(scope="module")
def wide_local(ckpts, tmp_path_factory) -> dict[str | None, Path]:
    """The reference per engine: the tracin stage here, torch on 2 threads (a laptop's default)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return {
            project: _wide_run(tmp_path_factory.mktemp("wide-local"), ckpts, project)
            for project in ENGINES
        }
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("project", ENGINES)
def test_the_bits_do_not_depend_on_how_the_work_is_cut(ckpts, wide_local, tmp_path, project):
    """Matrix, per-checkpoint stack, self-influence and both gradient norms are identical
    (np.array_equal) whatever the executor, the worker count, the chunks per task and the
    driver's torch threads."""
    import torch

    cuts = {
        # (executor, workers, chunks per task, the driver's torch threads)
        "local, 1 thread, a chunk per task": ("local", 0, 1, 1),
        "processes, 1 worker (all the cores)": ("processes", 1, None, 2),
        "processes, 2 workers, a chunk per task": ("processes", 2, 1, 2),
        "processes, 2 workers, 2 chunks per task": ("processes", 2, 2, 2),
    }
    before = torch.get_num_threads()
    differing = {}
    try:
        for i, (name, (executor, workers, per_task, threads)) in enumerate(cuts.items()):
            torch.set_num_threads(threads)
            run = _wide_run(tmp_path / str(i), ckpts, project, executor, workers, per_task)
            differing[name] = _differing(wide_local[project], run)
    finally:
        torch.set_num_threads(before)
    assert differing == {name: [] for name in cuts}


# ------------------------------------------------------------------ Ray


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module: 2 CPUs, no dashboard."""
    ray = pytest.importorskip(
        "ray", reason="Ray is not installed (pip install -r requirements-ray.txt)"
    )
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    import logging

    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    yield ray
    ray.shutdown()


_TWO_NODES = r"""
import json, os, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from core.execution.executors import Resources, Work, check_executor, run_tasks

def where(task):
    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}

work = Work(
    stage="probe",
    compute=where,
    name=lambda t: f"task-{t['i']}",
    root=lambda t: t["root"],
    retarget=lambda t, folder: {**t, "root": folder},
    inputs=lambda t: ["manifest.json"],
    outputs=lambda t: [],
)
root = sys.argv[1]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
cluster.add_node(num_cpus=1, num_gpus=1)  # a GPU in Ray's books only
cluster.wait_for_nodes()
ray.init(address=cluster.address, log_to_driver=False)
tasks = [{"i": i, "root": root} for i in range(6)]
spec = check_executor("ray", 2)
cpu = run_tasks(work, tasks, spec, resources=Resources(cpus=1), progress=False, folder=root)
cpu_report = json.loads((Path(root) / "progress.json").read_text())
gpu = run_tasks(work, tasks, spec, resources=Resources(cpus=1, gpus=1), progress=False)
# TracIn with --device cuda from this GPU-less driver: the driver checks on its CPU, Ray sends
# every task to the GPU node, and there the task finds no CUDA and says so.
from core.storage.errors import AtlasError
from core.influence import run_tracin
try:
    run_tracin(sys.argv[2], device="cuda", progress=False, executor=spec, chunk_size=4)
    tracin_error = None
except AtlasError as exc:
    tracin_error = str(exc)
tracin_progress = json.loads((Path(sys.argv[2]) / "progress.json").read_text())
print(json.dumps({
    "tracin_error": tracin_error,
    "tracin_progress": tracin_progress,
    "cpu_nodes": sorted({r["node"] for r in cpu}),
    "gpu": gpu,
    "gpu_node": [n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")],
    "nodes": len([n for n in ray.nodes() if n["Alive"]]),
    "shared": cpu_report["shared"],
}))
# More GPUs per task than the cluster has: one sentence, not a wait for a node forever.
try:
    run_tasks(work, tasks, spec, resources=Resources(cpus=1, gpus=2), progress=False)
    print("no error")
except AtlasError as exc:
    print(exc)
ray.shutdown()
cluster.shutdown()
"""


def test_a_mixed_two_node_cluster_runs_gpu_tasks_on_its_gpu_node(ckpts, tmp_path) -> None:
    """Two Ray nodes on this machine (``ray.cluster_utils.Cluster``), one with a GPU in
    Ray's books: tasks declaring a GPU all run on that node, with the GPU made visible to
    them; CPU tasks spread over both nodes; a GPU-less driver hands ``--device cuda`` to the
    tasks; more GPUs per task than the cluster has are refused in one sentence. In a
    subprocess: its own Ray cluster."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements-ray.txt)")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the driver would use it")
    (tmp_path / "manifest.json").write_text("{}")
    run = make_checkpoint_run(tmp_path / "tiny", ckpts)
    env = {**os.environ, "RAY_DISABLE_DOCKER_CPU_WARNING": "1", "PYTHONPATH": str(REPO)}
    *_, line, refused = python_lines(_TWO_NODES, tmp_path, run, env=env, timeout=300)
    got = json.loads(line)
    assert got["nodes"] == 2 and got["shared"] is True  # both nodes see this folder
    assert len(got["cpu_nodes"]) == 2  # one CPU each: two tasks at once need both nodes
    assert len(got["gpu_node"]) == 1
    assert {r["node"] for r in got["gpu"]} == set(got["gpu_node"])
    assert all(r["gpus"] == "0" for r in got["gpu"])
    # The driver got past its own checks (the tasks ran: progress.json) and the task on the
    # GPU node reported its missing CUDA, naming the device.
    assert got["tracin_progress"]["executor"] == "ray"
    assert got["tracin_progress"]["task_resources"]["gpus"] == 1
    assert got["tracin_error"] == ("--device cuda was requested but no CUDA GPU is available here.")
    assert refused == (
        "Each task asks for 2 GPUs (--device cuda) but the Ray cluster has 1; add a node with "
        "a GPU or use --device cpu."
    )


@pytest.mark.parametrize("shared", ["auto", "no"])
def test_ray_gives_the_local_matrix_bitwise(ray_session, ckpts, local_run, tmp_path, shared):
    """Shared folder (tasks write in place) or not (tasks return shards, the driver writes)."""
    from core.influence import run_tracin

    run = make_checkpoint_run(tmp_path, ckpts)
    spec = check_executor("ray", 2, shared=shared)
    run_tracin(run, device="cpu", progress=False, chunk_size=CHUNK, executor=spec)
    _same_files(local_run, run)
    report = json.loads((run / PROGRESS).read_text())
    assert report["executor"] == "ray" and report["done"] == report["total"] == 6
    assert report["shared"] is (shared == "auto")
    assert report["task_resources"]["cpus"] == 1 and report["task_resources"]["memory_mb"] > 0
    assert all(w["tasks_per_min"] > 0 and w["peak_rss_mb"] > 0 for w in report["workers"])
    assert store.load_manifest(run)["tracin"]["worker_peak_rss_mb"] > 0


@pytest.mark.parametrize("project", ENGINES)
def test_ray_gives_the_bits_of_every_other_cut(ray_session, ckpts, wide_local, tmp_path, project):
    """Ray with 2 workers, a chunk per task (and in one worker 2 chunks) as the local run."""
    cuts = {"ray, 2 workers, a chunk per task": 1, "ray, 2 workers, 2 chunks per task": 2}
    differing = {}
    for i, (name, per_task) in enumerate(cuts.items()):
        run = _wide_run(tmp_path / str(i), ckpts, project, "ray", 2, per_task)
        differing[name] = _differing(wide_local[project], run)
    assert differing == {name: [] for name in cuts}


def test_ray_through_the_cli(ray_session, ckpts, local_run, tmp_path, capsys):
    run = make_checkpoint_run(tmp_path, ckpts)
    # The run's own chunk size is 512 (one chunk): this checks the CLI path, not the split.
    args = ["tracin", str(run), "--device", "cpu", "--executor", "ray", "--workers", "2"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run)
    assert store.load_manifest(run)["tracin"]["executor"] == "ray"
    matrix = np.load(run / store.TRACIN)
    assert matrix.shape == np.load(local_run / store.TRACIN).shape
    np.testing.assert_allclose(matrix, np.load(local_run / store.TRACIN), rtol=1e-5, atol=1e-7)


def test_a_cluster_without_gpus_is_refused_before_the_run_changes(
    ray_session, ckpts, local_run, tmp_path
):
    """``--device cuda`` on a GPU-less cluster: one sentence, and the complete run is as it
    was (its stage entry, options and shards) instead of marked running with new options."""
    import torch

    from core.influence import run_tracin

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the driver would use it")
    run = tmp_path / "tiny"
    shutil.copytree(local_run, run)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    with pytest.raises(AtlasError) as info:
        run_tracin(
            run, scope="head", device="cuda", progress=False, executor=check_executor("ray", 2)
        )
    assert str(info.value) == (
        "Each task asks for 1 GPU (--device cuda) but the Ray cluster has 0; add a node with "
        "a GPU or use --device cpu."
    )
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_a_failing_ray_task_is_retried_then_named(
    ray_session, ckpts, local_run, tmp_path, monkeypatch, capsys
):
    from core.influence import plan, run_tracin

    run = make_checkpoint_run(tmp_path, ckpts)
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    name = "ckpt-01_chunks-0001-0001"
    monkeypatch.setenv("ATLAS_TEST_FAIL_DIR", str(attempts))
    # Fails its first attempt only: Ray's retry makes the command succeed.
    monkeypatch.setenv("ATLAS_TEST_FAIL_TASK", f"{name}:1")
    spec = check_executor("ray", 2)
    one = {"chunk_size": CHUNK, "chunks_per_task": 1}
    run_tracin(run, device="cpu", progress=False, executor=spec, **one)
    assert len(list(attempts.iterdir())) == 2
    _same_files(local_run, run)

    # Fails every attempt: the command ends naming the task; finished shards stay.
    for f in attempts.iterdir():
        f.unlink()
    run = make_checkpoint_run(tmp_path / "again", ckpts)
    monkeypatch.setenv("ATLAS_TEST_FAIL_TASK", name)
    with pytest.raises(AtlasError) as info:
        run_tracin(run, device="cpu", progress=False, executor=spec, **one)
    text = str(info.value)
    assert text.startswith(f"Task {name} (tracin) failed after 3 attempts: RuntimeError")
    assert "\n" not in text
    assert len(list(attempts.iterdir())) == 3
    shards = run / store.TRACIN_SHARDS_DIR
    assert not (shards / "ckpt-01_chunk-0001.npy").exists()
    left = plan(run, chunk_size=CHUNK, chunks_per_task=1)
    assert name in [t.name for t in left]
    assert json.loads((run / PROGRESS).read_text())["state"] == "failed"
    # A rerun (on one machine) computes what is missing and gives the same files.
    monkeypatch.delenv("ATLAS_TEST_FAIL_TASK")
    import torch

    torch.set_num_threads(1)
    run_tracin(run, device="cpu", progress=False, chunk_size=CHUNK)
    _same_files(local_run, run)


def test_a_killed_driver_resumes_with_only_the_missing_shards(
    ray_session, ckpts, local_run, tmp_path
):
    """The driver is SIGKILLed after 3 finished tasks; the rerun computes only the rest."""
    from core.influence import plan, run_tracin

    run = make_checkpoint_run(tmp_path, ckpts)
    plan(run, chunk_size=CHUNK)  # the run's shard folder uses chunks of 4
    address = ray_session.get_runtime_context().gcs_address
    code = (
        "import sys\n"
        "from core.execution.executors import check_executor\n"
        "from core.influence import run_tracin\n"
        f"run_tracin({str(run)!r}, device='cpu', progress=False, chunk_size={CHUNK}, "
        f"chunks_per_task=1, executor=check_executor('ray', 1, address={address!r}))\n"
    )
    env = {**os.environ, "ATLAS_TEST_STOP_AFTER": "3"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, timeout=300
    )
    assert out.returncode == -9, out.stderr.decode()[-2000:]
    assert not (run / store.TRACIN).exists()
    shards = run / store.TRACIN_SHARDS_DIR
    done = sorted(p.name for p in shards.glob("ckpt-*_chunk-*.npy"))
    assert len(done) >= 3
    pending = plan(run, chunk_size=CHUNK, chunks_per_task=1)
    assert len(pending) == 9 - len(done)
    # Rerun: only the missing shards are scheduled (the report counts the tasks it ran).
    run_tracin(
        run,
        device="cpu",
        progress=False,
        chunk_size=CHUNK,
        chunks_per_task=1,
        executor=check_executor("ray", 2),
    )
    report = json.loads((run / PROGRESS).read_text())
    assert report["total"] == report["done"] == len(pending)
    _same_files(local_run, run)


def test_ray_sweep_gives_the_local_table(ray_session, tmp_path, one_torch_thread):
    csv = tmp_path / "reviews.csv"
    synthetic_reviews(160, seed=4).to_csv(csv, index=False)
    tiny = [a for a in TINY_ARGS if a not in ("--flip-count", "8")]
    base = ["sweep", *tiny, "--epochs", "1", "--n-train", "64", *csv_args(csv)]
    base += ["--flip-rates", "0,0.125", "--seeds", "2", "--cache", str(tmp_path)]
    assert main([*base, "--name", "here"]) == 0
    assert main([*base, "--name", "ray", "--executor", "ray", "--workers", "2"]) == 0
    here = pd.read_parquet(tmp_path / "here" / SWEEP_TABLE)
    there = pd.read_parquet(tmp_path / "ray" / SWEEP_TABLE)
    assert len(here) == 4
    pd.testing.assert_frame_equal(here, there, check_exact=True)
    report = json.loads((tmp_path / "ray" / PROGRESS).read_text())
    assert report["stage"] == "sweep" and report["done"] == 4
    assert store.load_manifest(tmp_path / "ray")["executor"] == "ray"
