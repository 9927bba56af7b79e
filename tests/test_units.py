"""Independent units beside TracIn's tasks: sweep cells and detector 2's retraining.

Each is a frozen ``plan`` item that a ``compute`` call runs anywhere the folder is reachable;
what is already done is not planned again. The cleaning arms are tested in test_cleaning.py,
TracIn's tasks in test_tracin.py.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import runstore_factory as factory

from core.cleaning import detectors
from core.inputs.config import PRESETS
from core.orchestration import sweep
from core.storage import store


def test_sweep_plan_lists_the_cells_not_trained_yet(tmp_path: Path):
    base = PRESETS["quick"].replace(seed=3)
    cells = sweep.plan_cells(tmp_path, base, [0.0, 0.1], 2)
    assert [(c.flip_rate, c.seed) for c in cells] == [(0.0, 3), (0.0, 4), (0.1, 3), (0.1, 4)]
    assert pickle.loads(pickle.dumps(cells)) == cells  # ready for another process
    done = tmp_path / sweep.CELLS_DIR / sweep.cell_name(0.1, 3)
    done.mkdir(parents=True)
    store.write_json(done / store.MANIFEST, {"kind": "run", "status": "complete"})
    store.write_npy(done / store.LOGITS, np.zeros((1, 2, 2), np.float32))
    store.mark_stage(done, "train", store.STATUS_COMPLETE)
    left = sweep.plan_cells(tmp_path, base, [0.0, 0.1], 2)
    assert [(c.flip_rate, c.seed) for c in left] == [(0.0, 3), (0.0, 4), (0.1, 4)]


def test_retraining_is_planned_until_its_result_is_cached(tmp_path: Path):
    run = factory.make_model_run(tmp_path)
    (unit,) = detectors.plan_retraining(run)
    assert unit.run == str(run) and pickle.loads(pickle.dumps(unit)) == unit
    cache = run / detectors.WORK_DIR / detectors.INFLUENCE_CACHE
    cache.parent.mkdir(parents=True)
    np.savez(cache, key=np.asarray("made for other labels"), matrix=np.zeros((1, 1)))
    assert detectors.plan_retraining(run) == [unit]  # a stale cache is not reused
    np.savez(cache, key=np.asarray(unit.key), matrix=np.zeros((1, 1)))
    assert detectors.plan_retraining(run) == []
    assert detectors.compute_retraining(unit) == cache  # present: nothing retrained
