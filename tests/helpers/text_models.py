"""Fixtures for the tests that run a tiny model on text: a corpus over `tiny_models.CODE_WORDS` and
a GPT-2 of width TEXT_WIDTH over that vocabulary (import them into a test module to use them)."""

import pytest

from helpers.tiny_models import CODE_WORDS, save_tiny_gpt2, write_corpus

TEXT_WIDTH = 24  # the tiny models' hidden width


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    pytest.importorskip("transformers")
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), CODE_WORDS, width=TEXT_WIDTH)


def kept_windows(src, max_tokens: int):
    """(ids, attention, keep) of `src`'s windows one at a time, as `fastsae eval` reads them: `keep`
    marks the window's real tokens, cut off once `max_tokens` have been kept in all."""
    n_seen = 0
    for w in range(src.n_windows):
        ids, attention, keep = src.window_inputs(w, w + 1)
        keep = keep & (keep.cumsum(1) <= max_tokens - n_seen)
        if not keep.any():
            return
        n_seen += int(keep.sum())
        yield ids, attention, keep
