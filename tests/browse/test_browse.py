"""`fastsae browse`: the one-pass feature statistics against a dense reference, the nearest
features against float64, the site's data, the command line and its errors, and the main job's
browser. (The site in a real browser: tests/browse/test_browse_chromium.py.)"""

import json
import re

import pytest
import torch

from fastsae.browse import FeatureStatsAccumulator, nearest_by_decoder, token_strings
from helpers.tiny_models import save_tiny_bert


def random_sparse_stream(n, d_sae, max_width, seed=0):
    """Rows of sparse activations as an SAE's encode_sparse gives them (values > 0, then
    zero-valued padding at latents the row does not hold), growing in scale along the stream so
    that the histograms have to widen. Returns (values [n, m], indices [n, m], dense [n, d_sae])."""
    g = torch.Generator().manual_seed(seed)
    values = torch.zeros(n, max_width)
    indices = torch.zeros(n, max_width, dtype=torch.int64)
    dense = torch.zeros(n, d_sae)
    for r in range(n):
        latents = torch.randperm(d_sae, generator=g)[:max_width]
        active = int(torch.randint(0, max_width + 1, (1,), generator=g))
        v = torch.rand(active, generator=g) * (0.05 + r / 10) * (1 + latents[:active] % 5)
        values[r, :active] = v
        indices[r] = latents
        dense[r, latents[:active]] = v
    return values, indices, dense


@pytest.mark.parametrize("splits", [[1, 2, 40, 3, 60, 51], [157], [5] * 31 + [2]])
def test_streaming_stats_match_a_dense_reference(splits):
    n, d_sae, k, before, after, n_bins = 157, 37, 5, 3, 2, 8
    values, indices, dense = random_sparse_stream(n, d_sae, max_width=6)
    positions = torch.arange(n) + 1000 * (torch.arange(n) >= 80)  # a gap: windows must not cross it
    acc = FeatureStatsAccumulator(d_sae, n_contexts=k, before=before, after=after, n_bins=n_bins)
    lo = 0
    for size in splits:
        # Batches of different widths, as encode_sparse gives for ReLU SAEs.
        width = int((values[lo : lo + size] > 0).sum(1).max()) if size else 0
        acc.update(values[lo : lo + size, : max(width, 1)], indices[lo : lo + size, : max(width, 1)], positions[lo : lo + size])
        lo += size
    assert lo == n
    stats = acc.finish()

    fired = dense > 0
    assert stats.n_tokens == n
    assert torch.equal(stats.counts, fired.sum(0))
    torch.testing.assert_close(stats.sums, dense.double().sum(0), rtol=1e-12, atol=1e-12)
    assert torch.equal(stats.max_values, dense.max(0).values)
    for f in range(d_sae):
        v = dense[fired[:, f], f]
        if v.numel() == 0:
            assert stats.histogram(f) == (0.0, []) and stats.top_positions[f, 0] == -1
            continue
        # The narrowest power-of-two bin width that holds the maximum in n_bins bins.
        width = 2.0 ** int(torch.frexp(v.max() / n_bins).exponent)
        assert v.max() < n_bins * width <= 2 * v.max() or width <= v.max() / (n_bins - 1)
        expected = torch.bincount((v / width).floor().long(), minlength=n_bins)
        got_width, got = stats.histogram(f)
        assert got_width == width and got == expected[: len(got)].tolist() and sum(got) == v.numel()

        best = v.sort(descending=True).values[:k]
        assert torch.equal(stats.top_values[f, : len(best)], best)
        assert (stats.top_values[f, len(best):] == -float("inf")).all()
        for j in range(len(best)):
            row = int((dense[:, f] == best[j]).nonzero()[0])
            assert stats.top_positions[f, j] == positions[row]
            expected_window = torch.full((before + 1 + after,), float("nan"))
            for o in range(-before, after + 1):
                if 0 <= row + o < n and positions[row + o] == positions[row] + o:
                    expected_window[o + before] = dense[row + o, f]
            torch.testing.assert_close(stats.context_acts[f, j], expected_window, equal_nan=True, rtol=0, atol=0)


def test_accumulator_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_bins"):
        FeatureStatsAccumulator(8, n_bins=48)
    with pytest.raises(ValueError, match="n_contexts"):
        FeatureStatsAccumulator(8, n_contexts=0)
    acc = FeatureStatsAccumulator(8)
    with pytest.raises(ValueError, match="positions"):
        acc.update(torch.ones(3, 2), torch.zeros(3, 2, dtype=torch.int64), torch.arange(4))


def test_nearest_by_decoder_matches_float64_in_chunks():
    W_dec = torch.randn(53, 7)
    features = torch.tensor([0, 52, 17, 3, 40, 11, 29])
    idx, cos = nearest_by_decoder(W_dec, features, n=4, chunk_rows=3)
    unit = torch.nn.functional.normalize(W_dec.double(), dim=1)
    sims = unit[features] @ unit.T
    sims[torch.arange(len(features)), features] = -2
    ref = sims.topk(4, dim=1)
    assert torch.equal(idx, ref.indices)
    torch.testing.assert_close(cos.double(), ref.values, rtol=0, atol=1e-6)


# ------------------------------------------------------------ with a tiny transformer

WORDS = ("[PAD] [UNK] [CLS] [SEP] [MASK] the a of to and is in it for def class return print import from with as "
         "if else while . , ( ) : = x y value list name ##s").split()
DOCS = ["the value of x is in the list . def name ( x ) : return x",
        "import list from the class , print the name of the value",
        "while x : if y : print ( x ) else : return the list of values"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is installed by the [train] and [test] extras")
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS, num_hidden_layers=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(" ".join(DOCS * 15))
    return path


def read_js(path, target):
    text = path.read_text()
    prefix = f"{target} = "
    assert text.startswith(prefix) and text.rstrip().endswith(";"), path
    return json.loads(text[len(prefix) :].rstrip()[:-1])


def test_site_data_names_the_right_tokens(tiny_bert, corpus, tmp_path):
    import fastsae
    from fastsae.browse import build_browser
    from fastsae.training.transformer import TransformerActivations

    src = TransformerActivations(tiny_bert, hook="encoder.layer.1", text=corpus, seq_len=16, seqs_per_chunk=3)
    sae = fastsae.SAE(d_in=24, d_sae=70, architecture="relu")
    index_html = build_browser(sae, src, tmp_path / "site", max_tokens=300, features=range(10), n_contexts=4)
    site = index_html.parent
    assert sorted(p.name for p in (site / "data").iterdir()) == ["features_00000.js", "index.js"]
    for name in ("index.html", "feature.html", "assets/index.js", "assets/feature.js", "assets/browser.css"):
        assert (site / name).is_file()
        assert not re.search(r"(src|href)=\"(https?:)?//", (site / name).read_text())  # nothing from the network

    index = read_js(site / "data" / "index.js", "window.FASTSAE_INDEX")
    cols = index["features"]
    assert cols["id"] == list(range(70)) and cols["page"] == [1] * 10 + [0] * 60
    assert index["meta"]["n_tokens"] == 300
    dense = torch.cat([sae.encode(src.load_chunk(i)) for i in range(len(src.chunk_sizes))])[:300]
    torch.testing.assert_close(torch.tensor(cols["density"]), (dense > 0).double().mean(0).float(), rtol=1e-3, atol=0)
    torch.testing.assert_close(torch.tensor(cols["max"]), dense.max(0).values, rtol=1e-3, atol=0)

    strings = {}
    shard = read_js(site / "data" / "features_00000.js", "window.FASTSAE_SHARDS[0]")
    assert sorted(map(int, shard["features"])) == list(range(10))
    checked = 0
    for f, record in shard["features"].items():
        f = int(f)
        assert record["count"] == int((dense[:, f] > 0).sum())
        assert len(record["neighbours"]) == 8 and all(n != f for n, _ in record["neighbours"])
        for c in record["contexts"]:
            # The highlighted token is the one at the top position; its activation is the context's.
            assert c["a"][c["h"]] == pytest.approx(c["v"], rel=5e-3)  # 3 significant digits
            row = int((dense[:, f] == dense[:, f].max()).nonzero()[0]) if c is record["contexts"][0] else None
            if row is not None:
                assert c["t"][c["h"]] == int(src.token_ids[row])
                assert c["v"] == pytest.approx(dense[row, f].item(), rel=1e-3)
                checked += 1
            strings.update(shard["tokens"])
    assert checked >= 5
    assert strings[str(WORDS.index("the"))] == " the" and strings[str(WORDS.index("("))] == " ("
    # Word pieces join the word before them.
    assert token_strings(src.tokenizer, [WORDS.index("##s"), WORDS.index("value")]) == {
        WORDS.index("##s"): "s", WORDS.index("value"): " value"}


def test_serve_listens_on_localhost_only(tmp_path):
    import threading
    import urllib.request

    from fastsae.browse import make_server

    (tmp_path / "index.html").write_text("<p>hello</p>")
    with make_server(tmp_path, 0) as server:
        assert server.server_address[0] == "127.0.0.1"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/index.html", timeout=10) as r:
                assert r.status == 200 and r.read() == b"<p>hello</p>"
        finally:
            server.shutdown()
            thread.join(10)


def run_cli(argv, capsys):
    from fastsae.cli import main

    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_main_job_writes_a_browser_and_browse_rebuilds_it_from_the_run(tiny_bert, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = run_cli(["train", "--model", str(tiny_bert), "--hook", "encoder.layer.1", "--text", str(corpus),
                            "--seq-len", "16", "--k", "3", "--d-sae", "48", "--tokens", "600", "--batch-size", "100",
                            "--activation-cache", str(tmp_path / "cache"), "--out", str(run), "--no-progress",
                            "--report-features", "0", "--browser-tokens", "200"], capsys)
    assert rc == 0, err
    assert f"browser of the features: {(run / 'browser' / 'index.html').resolve().as_uri()}" in out
    assert out.count("\nfeature ") == 0  # (lines starting so are the feature report's)
    assert read_js(run / "browser" / "data" / "index.js", "window.FASTSAE_INDEX")["meta"]["n_tokens"] == 200

    # From the run folder alone: model, hook, text and activation cache come from the run.
    site = tmp_path / "site"
    rc, out, err = run_cli(["browse", str(run), "--out", str(site), "--tokens", "250", "--features", "20"], capsys)
    assert rc == 0, err
    assert "browser of the features: file://" in out
    index = read_js(site / "data" / "index.js", "window.FASTSAE_INDEX")
    assert index["meta"]["n_tokens"] == 250 and sum(index["features"]["page"]) == 20
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the training run's cache, reused (same fingerprint)

    # A folder holding something else is not overwritten.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    rc, out, err = run_cli(["browse", str(run), "--out", str(tmp_path / "notes"), "--tokens", "50"], capsys)
    assert rc == 2 and "--out" in err and "notes" in err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_browse_names_what_is_wrong(tiny_bert, corpus, tmp_path, capsys):
    import fastsae

    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli(["browse", str(empty), "--out", str(tmp_path / "s1")], capsys)
    assert rc == 2 and str(empty) in err and "no SAE found" in err

    rc, _, err = run_cli(["browse", str(tmp_path / "missing"), "--out", str(tmp_path / "s1")], capsys)
    assert rc == 2 and "missing: no such run folder or SAE checkpoint" in err

    wide = fastsae.SAE(d_in=30, d_sae=40, architecture="topk", k=2).save(tmp_path / "wide_sae")
    common = ["--model", str(tiny_bert), "--hook", "encoder.layer.1", "--seq-len", "16", "--activation-cache", "none"]
    rc, _, err = run_cli(["browse", str(wide), "--out", str(tmp_path / "s2"), "--text", str(corpus), *common], capsys)
    assert rc == 2 and "width 24" in err and "d_in=30" in err
    assert not (tmp_path / "s2").exists()

    fits = fastsae.SAE(d_in=24, d_sae=40, architecture="topk", k=2).save(tmp_path / "sae")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n ")
    rc, _, err = run_cli(["browse", str(fits), "--out", str(tmp_path / "s3"), "--text", str(blank), *common], capsys)
    assert rc == 2 and "blank.txt" in err and "no non-empty documents" in err

    rc, _, err = run_cli(["browse", str(fits), "--out", str(tmp_path / "s3"), "--tokens", "0", *common], capsys)
    assert rc == 2 and "--tokens" in err


def test_the_command_leaves_autograd_on(tiny_bert, corpus, tmp_path, capsys):
    # The CLI runs in-process in the tests (and in notebooks): it must not switch grad mode off globally.
    import fastsae

    sae = fastsae.SAE(d_in=24, d_sae=40, architecture="topk", k=2).save(tmp_path / "sae")
    rc, _, err = run_cli(["browse", str(sae), "--out", str(tmp_path / "site"), "--model", str(tiny_bert), "--hook",
                          "encoder.layer.1", "--text", str(corpus), "--seq-len", "16", "--activation-cache", "none",
                          "--tokens", "100"], capsys)
    assert rc == 0, err
    assert torch.is_grad_enabled()
