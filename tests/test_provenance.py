"""Provenance: stages know their inputs, stale results are recomputed or reported, nothing is
deleted silently, checkpoints are known by content, and a retried stage resets the run's status.

Each test below fails on the code before ``core.storage.provenance`` existed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.cli import main, show_payload
from core.options import commands
from core.storage import provenance, store
from core.storage.errors import AtlasError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def run(study_run: Path, tmp_path: Path) -> Path:
    """A private copy of the session's tiny complete study run."""
    dest = tmp_path / "cache" / "tiny"
    shutil.copytree(study_run, dest)
    return dest


def _interrupt_tracin(run: Path, monkeypatch, after: int) -> list[str]:
    """Start the tracin stage and kill it (KeyboardInterrupt) at checkpoint load ``after``."""
    import core.learning.models

    real = core.learning.models.load_classifier
    calls: list[str] = []

    def flaky(path, device="cpu"):
        calls.append(Path(path).name)
        if len(calls) == after:
            raise KeyboardInterrupt
        return real(path, device)

    monkeypatch.setattr(core.learning.models, "load_classifier", flaky)
    return calls


def _drop_tracin_outputs(run: Path) -> None:
    """Make the run's tracin stage incomplete (as after a kill during its first pass)."""
    for name in store.STAGE_OUTPUTS["tracin"]:
        (run / name).unlink()
    manifest = store.load_manifest(run)
    manifest["stages"]["tracin"]["status"] = store.STATUS_RUNNING
    store.write_json(run / store.MANIFEST, manifest)


def test_tracin_with_other_params_makes_analyze_rerun(run: Path, capsys):
    shapes_before = (run / store.SHAPES).read_bytes()
    assert provenance.stale_stages(run) == {}
    assert main(["tracin", str(run), "--params", "head", "--device", "cpu"]) == 0
    # The analysis and detection were made from the old matrix: reported, not silently kept.
    stale = show_payload(run)["stale"]
    assert "analyze" in stale and store.TRACIN in stale["analyze"]
    assert "analyze" in commands.list_runs(run.parent)[0]["stale"]
    capsys.readouterr()
    assert main(["analyze", str(run)]) == 0
    assert "already complete" not in capsys.readouterr().err
    assert (run / store.SHAPES).read_bytes() != shapes_before
    assert "analyze" not in show_payload(run)["stale"]


def test_shards_of_other_options_are_refused_not_deleted(run: Path, monkeypatch):
    from core.influence import run_tracin

    _drop_tracin_outputs(run)
    _interrupt_tracin(run, monkeypatch, after=3)  # the check, checkpoint 1, dies at 2
    with pytest.raises(KeyboardInterrupt):
        run_tracin(run, device="cpu", progress=False)
    shards = run / store.TRACIN_SHARDS_DIR
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    assert any(name.startswith("ckpt-00_chunk") for name in before)
    monkeypatch.undo()
    with pytest.raises(AtlasError, match=r"--params all \(this request: --params head\)"):
        run_tracin(run, scope="head", device="cpu", progress=False)
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before


def test_resume_with_an_absolute_cache_path_keeps_the_shards(run: Path, monkeypatch):
    from core.influence import run_tracin

    _drop_tracin_outputs(run)
    monkeypatch.chdir(run.parent.parent)
    relative = Path(run.parent.name) / run.name
    _interrupt_tracin(run, monkeypatch, after=3)
    with pytest.raises(KeyboardInterrupt):
        run_tracin(relative, device="cpu", progress=False)
    assert (run / store.TRACIN_SHARDS_DIR / "ckpt-00_chunk-0000.npy").exists()
    monkeypatch.undo()
    monkeypatch.chdir(run.parent.parent)
    calls = _interrupt_tracin(run, monkeypatch, after=-1)
    run_tracin(run.resolve(), device="cpu", progress=False)
    # Only the check and the checkpoints without shards were loaded: the shards were kept.
    assert calls == ["epoch-01", "epoch-02", "epoch-03"]
    assert store.stage_complete(run, "tracin")


def test_a_retried_stage_resets_the_failed_status(run: Path, monkeypatch):
    import core.learning.models

    manifest = store.load_manifest(run)
    manifest.update(status=store.STATUS_FAILED, error="tracin: out of memory")
    manifest["stages"]["tracin"] = {"status": store.STATUS_FAILED}
    store.write_json(run / store.MANIFEST, manifest)
    real = core.learning.models.load_classifier
    seen = []

    def watch(path, device="cpu"):
        seen.append({k: store.load_manifest(run).get(k) for k in ("status", "error")})
        return real(path, device)

    monkeypatch.setattr(core.learning.models, "load_classifier", watch)
    assert main(["tracin", str(run), "--device", "cpu"]) == 0
    # While it runs again the run is not 'failed' with the old error ...
    assert seen[-1] == {"status": store.STATUS_RUNNING, "error": None}
    # ... and once it has finished the run is complete again.
    after = store.load_manifest(run)
    assert after["status"] == store.STATUS_COMPLETE and not after.get("error")
    assert show_payload(run)["status"] == store.STATUS_COMPLETE


def test_fingerprints_follow_content_not_paths_or_times(tmp_path: Path):
    a = tmp_path / "a.npy"
    np.save(a, np.arange(10, dtype=np.float32))
    fp = provenance.fingerprint(a)
    b = tmp_path / "sub" / "b.npy"
    b.parent.mkdir()
    shutil.copy(a, b)
    os.utime(b, ns=(1, 1))
    assert provenance.fingerprint(b)["sha1"] == fp["sha1"]
    np.save(b, np.arange(10, dtype=np.float32) + 1)
    assert provenance.fingerprint(b)["sha1"] != fp["sha1"]
    assert provenance.fingerprint(tmp_path / "absent") is None
    # A folder's fingerprint changes with any file in it.
    folder = provenance.fingerprint(tmp_path / "sub")
    (tmp_path / "sub" / "c.txt").write_text("x")
    assert provenance.fingerprint(tmp_path / "sub")["sha1"] != folder["sha1"]


def test_big_files_are_fingerprinted_by_samples(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(provenance, "FULL_HASH_BYTES", 1 << 20)
    path = tmp_path / "big.bin"
    data = np.random.default_rng(0).bytes(8 << 20)
    path.write_bytes(data)
    first = provenance.fingerprint(path)["sha1"]
    changed = bytearray(data)
    changed[len(data) // 2 : len(data) // 2 + (4 << 20)] = bytes(4 << 20)  # a rewritten middle
    path.write_bytes(bytes(changed))
    assert provenance.fingerprint(path)["sha1"] != first


def test_every_stage_records_its_arguments_and_inputs(run: Path):
    for stage in ("data", "train", "tracin", "analyze"):
        record = json.loads((run / provenance.PROVENANCE_DIR / f"{stage}.json").read_text())
        assert record["stage"] == stage and isinstance(record["args"], dict)
        assert set(record["inputs"]) == set(provenance.stage_inputs(run, stage))
    tracin = json.loads((run / provenance.PROVENANCE_DIR / "tracin.json").read_text())
    assert tracin["args"]["params"] == "all"
    assert any(name.startswith(store.CHECKPOINTS_DIR) for name in tracin["inputs"])
    # Paths are relative to the run: the record survives moving the run folder.
    assert all(not Path(name).is_absolute() for name in tracin["inputs"])


def test_unchanged_inputs_are_recognised_without_reading_them(tmp_path: Path, monkeypatch):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(5, dtype=np.float32))
    recorded = provenance.fingerprint(path)
    provenance._MEMO.clear()

    def no_reading(*args):
        raise AssertionError("content read although size and time are unchanged")

    monkeypatch.setattr(provenance, "_file_digest", no_reading)
    assert provenance.same_content(recorded, path) is True
    monkeypatch.undo()
    np.save(path, np.arange(5, dtype=np.float32) * 2)  # same size, new content and time
    assert provenance.same_content(recorded, path) is False


def test_a_changed_user_data_file_makes_the_data_stage_stale(tmp_path: Path, reviews_csv: Path):
    run = tmp_path / "run"
    run.mkdir()
    store.write_json(
        run / store.MANIFEST,
        {"kind": "run", "status": "complete", "config": {"data_file": str(reviews_csv)}},
    )
    store.mark_stage(run, "data", store.STATUS_COMPLETE)
    assert provenance.stale_stages(run) == {}
    reviews_csv.write_text(reviews_csv.read_text() + "one more review,pos\n")
    assert "reviews.csv changed" in provenance.stale_stages(run)["data"]
