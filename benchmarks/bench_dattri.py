"""Benchmark against dattri 0.3.0: exact TracIn and LoGra (identity Hessian) vs ours.

dattri is a benchmark-only dependency and lives in its own virtual environment, never in the
project's (requirements-bench.txt says how to make it). This script runs in the project's venv;
it prepares checkpoints and data in a temporary folder, runs our engines in one subprocess of
this interpreter and dattri's attributors in another of the dattri venv's interpreter (so
neither imports the other), and compares the scores they write as .npy files.

Setting (the same checkpoints, data and loss for both sides): the quick preset's tiny BERT
architecture trained from scratch for ``--k`` epochs (AdamW lr 1e-3, batch 32, a checkpoint per
epoch, as benchmarks/bench_factorized.py trains it) on Zipf-token sentences whose label is
carried by a few tokens, 2.5 % of training labels flipped; TracIn weights every checkpoint by
lr 1e-3; per-instance cross-entropy, model in eval mode; the training instance's observed label,
the test instance's true label.

- exact: our ``TracInCP`` (scope 'all') against dattri's ``TracInAttributor`` with the
  identity projection (dattri projects to 512 dimensions by default, even when
  ``projector_kwargs`` is None; ``proj_type='identity'`` turns it off), over all parameters:
  max relative difference of the test × train matrix and per-test-row Spearman.
- the floor: one batched forward and backward pass per checkpoint over the test and training
  instances (checkpoint loads included, no weight gradient, no hook, no projection), which
  any method computing per-example gradients does at least; both sides' times are also
  printed as multiples of it.
- projected, at equal projection size: our ``factorized:K`` (``FactorizedTracIn``, K per side,
  K² per weight matrix) against dattri's ``LoGraAttributor(hessian='Identity',
  proj_dim=K²)`` (K per side). dattri's LoGra handles one checkpoint and ``nn.Linear`` layers
  only, so it runs once per checkpoint and its scores are summed with the lr weights; ours
  covers every parameter (linear, embedding and LayerNorm). Both are scored against exact
  all-parameter TracIn, and dattri's LoGra also against dattri's exact TracIn restricted to
  the linear layers' parameters (the quantity it estimates). Times: ours / theirs, wall and
  CPU; dattri's LoGra is timed cold (first use in its process, incl. its ``torch.compile`` of
  the compressor) and warm (the same work again in the same process).

Setup (once) and run:

    python3 -m venv .venv-dattri
    echo 'torch==2.13.0' > /tmp/torch-pin.txt
    .venv-dattri/bin/pip install -c /tmp/torch-pin.txt -r requirements-bench.txt
    .venv/bin/python benchmarks/bench_dattri.py [--n-train 400 --n-test 40 --k 3 --ks 8,16,32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Passive OpenMP waiting: spinning threads thrash a shared 2-core machine (see bench_tracin).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATTRI_PYTHON = ROOT / ".venv-dattri" / "bin" / "python"
LR = 1e-3  # the quick preset's learning rate (bench_factorized.LR)
BATCH = 32


# --------------------------------------------------------------------------- shared


def _inputs(folder: Path) -> tuple[list[tuple[str, float]], dict, dict]:
    """Checkpoints (path, lr), train and test tensors written by :func:`prepare`."""
    meta = json.loads((folder / "meta.json").read_text())
    ckpts = [(p, lr) for p, lr in meta["checkpoints"]]
    return ckpts, torch.load(folder / "train.pt"), torch.load(folder / "test.pt")


def _timed(fn):
    """(result, wall seconds, CPU seconds) of ``fn()``."""
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - start_cpu


# ------------------------------------------------------------------------ our side


def prepare(folder: Path, args: argparse.Namespace) -> None:
    """Data and trained checkpoints, with bench_factorized's data and training (or a run's)."""
    if args.run:
        from bench_tracin import run_data

        ckpts, *datasets = run_data(args.run, args.k, args.n_train, args.n_test)
        for name, data in zip(("train", "test"), datasets, strict=True):
            data = {key: v.clone() for key, v in data.items()}  # not the whole run's storage
            data.setdefault("token_type_ids", torch.zeros_like(data["input_ids"]))
            torch.save(data, folder / f"{name}.pt")
        meta = {"checkpoints": [[str(Path(p).resolve()), lr] for p, lr in ckpts]}
        (folder / "meta.json").write_text(json.dumps(meta))
        return
    from bench_factorized import FLIP_RATE, _train, polar_data

    torch.save(polar_data(args.n_train, 1, FLIP_RATE), folder / "train.pt")
    torch.save(polar_data(args.n_test, 2), folder / "test.pt")
    _train(folder, args.k, save=True)
    ckpts = [[str(folder / f"epoch-{i + 1:02d}"), LR] for i in range(args.k)]
    (folder / "meta.json").write_text(json.dumps({"checkpoints": ckpts}))


def floor_pass(ckpts: list[tuple[str, float]], train: dict, test: dict) -> None:
    """The least any per-example-gradient method does: per checkpoint, load it and run one
    batched forward and backward (to the word embeddings' output, no weight gradient, no
    hook, no projection) over the test and training instances, batched as ours are."""
    import torch.nn.functional as F

    from core.influence import EncodedData
    from core.influence.engine import default_loader
    from core.influence.factorized import MAX_ROWS, TOKENS_PER_BATCH

    cpu = torch.device("cpu")
    held: list[torch.Tensor] = []  # the embedding output of the current batch
    for path, _ in ckpts:
        model = default_loader(path, cpu)
        for p in model.parameters():
            p.requires_grad_(False)
        handle = model.get_input_embeddings().register_forward_hook(
            lambda _m, _a, out: held.append(out.requires_grad_(True)) or out
        )
        for data in (EncodedData(test, "test"), EncodedData(train, "train")):
            for rows in data.token_batches(np.arange(data.n), TOKENS_PER_BATCH, MAX_ROWS):
                batch = data.take(rows, cpu)
                add = (1.0 - batch["attention_mask"].float()) * torch.finfo(torch.float32).min
                with torch.enable_grad():
                    logits = model(
                        input_ids=batch["input_ids"],
                        attention_mask=add[:, None, None, :],
                        token_type_ids=batch.get("token_type_ids"),
                    ).logits
                    loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
                    torch.autograd.grad(loss, held.pop())
        handle.remove()


def ours(folder: Path, ks: list[int]) -> dict:
    """Our exact all-parameter TracIn and factorized:K; scores saved as .npy."""
    from core.influence import TracInCP
    from core.influence.factorized import FactorizedTracIn

    ckpts, train, test = _inputs(folder)
    rows = {}
    floor_pass(ckpts, train, test)  # warm: first calls of the model's kernels
    _, wall, cpu = _timed(lambda: floor_pass(ckpts, train, test))
    rows["floor"] = {"seconds": wall, "cpu": cpu}
    runs = [("ours_exact", lambda: TracInCP(ckpts, scope="all"))]
    runs += [(f"ours_f{k}", lambda k=k: FactorizedTracIn(ckpts, k=k)) for k in ks]
    for name, make in runs:
        result, wall, cpu = _timed(lambda make=make: make().compute(train, test))
        np.save(folder / f"{name}.npy", result.matrix)
        rows[name] = {"seconds": wall, "cpu": cpu}
    return rows


# ---------------------------------------------------------------------- dattri side


class _Rows(torch.utils.data.Dataset):
    """Instances as dicts (LoGra's batches) or tuples (TracInAttributor's)."""

    def __init__(self, data: dict, as_dict: bool) -> None:
        self.data, self.as_dict = data, as_dict
        self.keys = ("input_ids", "attention_mask", "token_type_ids", "labels")

    def __len__(self) -> int:
        return int(self.data["labels"].shape[0])

    def __getitem__(self, i: int):
        if self.as_dict:
            return {key: self.data[key][i] for key in self.keys}
        return tuple(self.data[key][i] for key in self.keys)


def _load_hf(model, path):
    """dattri's checkpoints_load_func: a saved Hugging Face classifier, eval mode."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def theirs(folder: Path, ks: list[int], exact_too: bool = True) -> dict:
    """dattri's exact TracIn (all and linear-only parameters) and LoGra; scores as .npy."""
    from dattri.algorithm.logra import LoGraAttributor
    from dattri.algorithm.tracin import TracInAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader

    ckpts, train, test = _inputs(folder)
    paths, lrs = [p for p, _ in ckpts], torch.tensor([lr for _, lr in ckpts])
    model = _load_hf(None, paths[0])
    rows = {}

    def per_example_loss(params, data):
        # One instance under vmap: TracIn's per-instance cross-entropy. A precomputed 4-D
        # additive key mask, because transformers' 2-D mask helper cannot be vmapped.
        ids, mask, types, label = (x.unsqueeze(0) for x in data)
        add = (1.0 - mask.float()) * torch.finfo(torch.float32).min
        out = torch.func.functional_call(
            model,
            params,
            args=(),
            kwargs={
                "input_ids": ids,
                "attention_mask": add[:, None, None, :],
                "token_type_ids": types,
            },
        )
        return torch.nn.functional.cross_entropy(out.logits, label)

    def exact(layer_name):
        task = AttributionTask(
            loss_func=per_example_loss,
            model=model,
            checkpoints=paths,
            checkpoints_load_func=_load_hf,
        )
        attributor = TracInAttributor(
            task=task,
            weight_list=lrs,
            normalized_grad=False,
            projector_kwargs={"proj_type": "identity", "proj_dim": -1},
            layer_name=layer_name,
            device="cpu",
        )
        train_loader = DataLoader(_Rows(train, False), batch_size=BATCH, shuffle=False)
        test_loader = DataLoader(_Rows(test, False), batch_size=BATCH, shuffle=False)
        return attributor.attribute(train_loader, test_loader).T.numpy()

    linear = [
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        for p, _ in m.named_parameters()
    ]
    for name, layers in (("dattri_exact", None), ("dattri_exact_linear", linear)):
        if not exact_too:
            break
        scores, wall, cpu = _timed(lambda layers=layers: exact(layers))
        np.save(folder / f"{name}.npy", scores)
        rows[name] = {"seconds": wall, "cpu": cpu}

    def batch_loss(model, batch, device):
        # LoGra's loss: the batch-mean cross-entropy (dattri rescales by the batch size).
        batch = {key: v.to(device) for key, v in batch.items()}
        return model(**batch).loss

    def logra(k: int) -> np.ndarray:
        total = None
        for path, lr in ckpts:
            task = AttributionTask(
                loss_func=batch_loss,
                model=_load_hf(None, path),
                checkpoints=path,
                checkpoints_load_func=_load_hf,
            )
            attributor = LoGraAttributor(
                task=task,
                hessian="Identity",
                proj_dim=k * k,
                offload="cpu",
                device="cpu",
                # Its batch_metadata.json goes here (else into the working directory), and a
                # fresh folder per attributor so no metadata of another run is picked up.
                cache_dir=tempfile.mkdtemp(dir=folder),
            )
            train_loader = DataLoader(_Rows(train, True), batch_size=BATCH, shuffle=False)
            test_loader = DataLoader(_Rows(test, True), batch_size=BATCH, shuffle=False)
            attributor.cache(train_loader)
            part = lr * attributor.attribute(train_loader, test_loader).T.numpy()
            total = part if total is None else total + part
        return total

    for k in ks:
        for when in ("cold", "warm"):
            scores, wall, cpu = _timed(lambda k=k: logra(k))
            rows[f"dattri_logra{k}_{when}"] = {"seconds": wall, "cpu": cpu}
        np.save(folder / f"dattri_logra{k}.npy", scores)
    return rows


# ------------------------------------------------------------------------ report


def _run(python: Path, role: str, folder: Path, args: argparse.Namespace) -> dict:
    """A worker in a subprocess of ``python``; its JSON line."""
    cmd = [str(python), __file__, "--_worker", role, "--_dir", str(folder), "--ks", args.ks]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_dattri_exact:
        cmd += ["--no-dattri-exact"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{role} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _agreement(ref: np.ndarray, other: np.ndarray) -> str:
    """Per-test-row Spearman (median, min) and top-10 proponent overlap (median)."""
    from core.influence import scope_error

    s = scope_error(ref, other, ks=(10,))["summary"]
    return (
        f"ρ median {s['spearman']['median']:.3f}, min {s['spearman']['min']:.3f}, "
        f"top-10 overlap median {s['top10_overlap']['median']:.2f}"
    )


def main() -> None:
    """Prepare, run both sides in their own processes, print agreement and time ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--k", type=int, default=3, help="checkpoints (= training epochs)")
    ap.add_argument("--ks", default="8,16,32", help="projection sizes K (K² per weight matrix)")
    ap.add_argument("--run", type=Path, help="a trained run: its first k checkpoints, instances")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--dattri-python", type=Path, default=DATTRI_PYTHON)
    ap.add_argument(
        "--no-dattri-exact",
        action="store_true",
        help="skip dattri's exact TracInAttributor runs (about 50× ours; the projected "
        "comparison and its timings do not need them)",
    )
    ap.add_argument(
        "--workdir", type=Path, help="keep inputs and scores here; a finished folder is re-reported"
    )
    ap.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)
    ap.add_argument("--_dir", dest="dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    if args.worker == "ours":
        print(json.dumps(ours(args.dir, ks)))
        return
    if args.worker == "theirs":
        print(json.dumps(theirs(args.dir, ks, exact_too=not args.no_dattri_exact)))
        return
    if not args.dattri_python.exists():
        sys.exit(
            f"{args.dattri_python} is missing: make the dattri venv (see this file's docstring)."
        )
    version = subprocess.run(
        [
            str(args.dattri_python),
            "-c",
            "import importlib.metadata as m; print(m.version('dattri'))",
        ],
        capture_output=True,
        text=True,
    ).stdout.strip()
    one, five, _ = os.getloadavg()
    source = f"run {args.run} (its first checkpoints and instances)" if args.run else None
    print(
        f"dattri {version or '?'} vs ours; "
        f"{source or f'tiny BERT (quick-preset architecture) trained {args.k} epochs'}, "
        f"n_train={args.n_train} n_test={args.n_test} checkpoints={args.k}; "
        f"device cpu, float32, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}; load average {one:.1f} / {five:.1f} on {os.cpu_count()} CPUs"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "rows.json").exists():
            rows = json.loads((folder / "rows.json").read_text())
        else:
            prepare(folder, args)
            rows = _run(Path(sys.executable), "ours", folder, args)
            rows.update(_run(args.dattri_python, "theirs", folder, args))
            (folder / "rows.json").write_text(json.dumps(rows))
        names = {
            name.replace("_cold", "")
            for name in rows
            if not name.endswith("_warm") and name != "floor"
        }
        m = {name: np.load(folder / f"{name}.npy") for name in names}
        exact = m["ours_exact"]
        t = rows
        if "dattri_exact" in m:
            theirs_exact = m["dattri_exact"]
            rel = np.abs(theirs_exact - exact).max() / np.abs(exact).max()
            print(
                f"exact, all parameters: ours {t['ours_exact']['seconds']:.1f} s "
                f"({t['ours_exact']['cpu']:.1f} s CPU), dattri TracInAttributor "
                f"{t['dattri_exact']['seconds']:.1f} s ({t['dattri_exact']['cpu']:.1f} s CPU); "
                f"ours/theirs {t['ours_exact']['seconds'] / t['dattri_exact']['seconds']:.2f} "
                f"wall, {t['ours_exact']['cpu'] / t['dattri_exact']['cpu']:.2f} CPU"
            )
            print(
                f"  agreement: max |ours − dattri| / max |ours| = {rel:.2e}; "
                f"{_agreement(exact, theirs_exact)}"
            )
            print(
                f"dattri exact over the Linear layers' parameters only: "
                f"{t['dattri_exact_linear']['seconds']:.1f} s; against exact all: "
                f"{_agreement(exact, m['dattri_exact_linear'])}"
            )
        else:
            print(
                f"exact, all parameters: ours {t['ours_exact']['seconds']:.1f} s "
                f"({t['ours_exact']['cpu']:.1f} s CPU); dattri's exact runs skipped "
                "(--no-dattri-exact)"
            )
        for k in ks:
            o, cold, warm = t[f"ours_f{k}"], t[f"dattri_logra{k}_cold"], t[f"dattri_logra{k}_warm"]
            print(
                f"K={k} (K²={k * k} per weight matrix): ours factorized:{k} {o['seconds']:.1f} s "
                f"({o['cpu']:.1f} s CPU); dattri LoGra cold {cold['seconds']:.1f} s "
                f"({cold['cpu']:.1f} s CPU), warm {warm['seconds']:.1f} s "
                f"({warm['cpu']:.1f} s CPU); ours/theirs {o['seconds'] / cold['seconds']:.2f} "
                f"cold, {o['seconds'] / warm['seconds']:.2f} warm (wall), "
                f"{o['cpu'] / warm['cpu']:.2f} warm (CPU); target ≤ 0.33"
            )
            if "floor" in t:
                f = t["floor"]["seconds"]
                print(
                    f"  one forward+backward pass (the floor of any per-example method) "
                    f"{f:.2f} s: ours {o['seconds'] / f:.2f}× it, dattri warm "
                    f"{warm['seconds'] / f:.2f}× it; ⅓ of dattri warm = "
                    f"{warm['seconds'] / 3:.2f} s"
                    + (" is below the floor" if warm["seconds"] / 3 < f else "")
                )
            print(f"  ours vs exact all:          {_agreement(exact, m[f'ours_f{k}'])}")
            print(f"  dattri LoGra vs exact all:  {_agreement(exact, m[f'dattri_logra{k}'])}")
            if "dattri_exact_linear" in m:
                print(
                    f"  dattri LoGra vs dattri exact (linear layers): "
                    f"{_agreement(m['dattri_exact_linear'], m[f'dattri_logra{k}'])}"
                )
        one, five, _ = os.getloadavg()
        print(f"load average at the end {one:.1f} / {five:.1f}")


if __name__ == "__main__":
    main()
