"""The app renders every page on a host without torch or transformers (the hosted demo's case).

A subprocess installs an import hook that refuses ``torch`` and ``transformers`` (and
everything below them), as if requirements-app.txt were all that is installed, then runs
every page of the one page list (``ui/pages.py``) under Streamlit's AppTest against a run
store. The Run-a-study page must say that the host has no compute stack instead of failing.

The same check runs in a real app-only environment:
``python -m venv /tmp/appenv && /tmp/appenv/bin/pip install -r requirements-app.txt &&
/tmp/appenv/bin/python tests/test_no_torch.py cache`` (exit status 0 when every page renders).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.conftest import python_lines

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "transformers")

CHECK = r"""
import importlib.abc, json, os, sys

BLOCKED = ("torch", "transformers")


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named '{name}' (refused by the test)", name=name)
        return None


sys.meta_path.insert(0, Refuse())
repo = sys.argv[1]
sys.path.insert(0, repo)
os.environ["ATLAS_CACHE"] = sys.argv[2]
os.environ.pop("ATLAS_STUDY_CMD", None)
os.environ.pop("ATLAS_READONLY", None)
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the import hook did not refuse torch")

from streamlit.testing.v1 import AppTest

from ui.pages import PAGES

report = {}
for spec in PAGES:
    at = AppTest.from_file(os.path.join(repo, "app.py"), default_timeout=90)
    at.run()
    if spec.script:
        at.switch_page(spec.script)
        at.run()
    texts = [str(e.value) for kind in ("markdown", "info", "warning", "error", "caption")
             for e in getattr(at, kind)]
    report[spec.key] = {
        "exceptions": [str(e.value) for e in at.exception],
        "errors": [str(e.value) for e in at.error],
        "charts": len(at.get("vega_lite_chart")),
        "no_compute_notice": any("no compute stack" in t for t in texts),
    }
report["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(report))
"""


def check_pages(cache: Path, python: str = sys.executable) -> dict:
    """Run every page with torch and transformers refused; the per-page report."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATLAS_STUDY_CMD", "ATLAS_READONLY")}
    return json.loads(python_lines(CHECK, REPO, cache, env=env, timeout=600, python=python)[-1])


def problems(report: dict) -> list[str]:
    """What is wrong in a report (empty when every page rendered as it should)."""
    bad = [f"{k} imported" for k in report.get("loaded", [])]
    for key, page in report.items():
        if key == "loaded":
            continue
        bad += [f"{key}: exception {e[:200]}" for e in page["exceptions"]]
        bad += [f"{key}: error {e[:200]}" for e in page["errors"]]
        if key not in ("study",) and page["charts"] == 0:
            bad.append(f"{key}: no chart")
    if not report.get("study", {}).get("no_compute_notice"):
        bad.append("study: no notice that the host has no compute stack")
    return bad


def test_every_page_renders_without_torch_and_transformers(tmp_path):
    import runstore_factory as factory

    from ui.pages import PAGES

    cache = factory.make_store(tmp_path / "cache")
    report = check_pages(cache)
    assert set(report) - {"loaded"} == {p.key for p in PAGES}
    assert problems(report) == []


def test_the_check_notices_a_page_that_needs_torch():
    report = {
        "loaded": ["torch"],
        "home": {"exceptions": [], "errors": [], "charts": 1, "no_compute_notice": False},
        "study": {
            "exceptions": ["ModuleNotFoundError: torch"],
            "errors": [],
            "charts": 0,
            "no_compute_notice": False,
        },
    }
    found = problems(report)
    assert "torch imported" in found and any(f.startswith("study: exception") for f in found)
    assert "study: no notice that the host has no compute stack" in found


if __name__ == "__main__":  # the same check in another environment, on a given store
    found = problems(check_pages(Path(sys.argv[1] if len(sys.argv) > 1 else "cache").resolve()))
    print("\n".join(found) or "every page rendered without torch and transformers")
    raise SystemExit(1 if found else 0)


def test_hosting_files_agree_with_the_app():
    import tomllib

    from ui import study

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text("utf-8"))
    assert config["server"]["headless"] is True
    assert config["browser"]["gatherUsageStats"] is False
    assert config["server"]["maxUploadSize"] == study.DEFAULT_MAX_UPLOAD_MB
    reqs = (REPO / "requirements-app.txt").read_text("utf-8").lower()
    names = {ln.split(">")[0].split("=")[0].split("<")[0].strip() for ln in reqs.splitlines()}
    names.discard("")
    names = {n for n in names if not n.startswith("#")}
    assert not names & {"torch", "transformers", "umap-learn", "fugashi", "cleanlab"}
    assert {"streamlit", "altair", "pandas", "pyarrow"} <= names
    docker = (REPO / "Dockerfile").read_text("utf-8")
    assert "requirements-app.txt" in docker and "ATLAS_READONLY=1" in docker
    assert "requirements.txt" not in docker.replace("requirements-app.txt", "")
