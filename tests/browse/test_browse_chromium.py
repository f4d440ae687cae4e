"""The feature browser in a real browser: headless Chromium (Debian's `chromium`) driven through
its DevTools protocol (tests/helpers/chromium.py), on a site built from a tiny BERT and opened from the
file system, as a user would. Skipped, with the reason, where Chromium is not installed
(.ci/install_browser.sh installs it)."""

import json
import re
import struct

import pytest
import torch

from helpers.chromium import Chromium, find_chromium

BROWSER = find_chromium()
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="Chromium not found (apt-get install chromium, or bash .ci/install_browser.sh)"
)

WORDS = ("[PAD] [UNK] [CLS] [SEP] [MASK] the a of to and is in it for def class return print import from with as "
         "if else while . , ( ) : = x y value list name ##s").split()
TEXT = " ".join(["the value of x is in the list . def name ( x ) : return x",
                 "import list from the class , print the name of the values",
                 "while x : if y : print ( x ) else : return the list of value"] * 12)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is installed by the [train] and [test] extras")
    from transformers import BertConfig, BertModel, BertTokenizer

    import fastsae
    from fastsae.browse import build_browser
    from fastsae.training.transformer import TransformerActivations

    root = tmp_path_factory.mktemp("browse_site")
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(root / "bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(root / "bert")
    (root / "corpus.txt").write_text(TEXT)
    src = TransformerActivations(root / "bert", hook="encoder.layer.0", text=root / "corpus.txt", seq_len=16)
    sae = fastsae.SAE(d_in=16, d_sae=96, architecture="topk", k=4)
    from fastsae.evals import evaluate

    return build_browser(sae, src, root / "site", n_contexts=5, metrics=evaluate(sae, src, max_tokens=200)).parent


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chrome = Chromium(BROWSER, tmp_path_factory.mktemp("chromium_profile"))
    yield chrome
    chrome.close()


def shard_of(site, feature):
    text = (site / "data" / f"features_{feature // 64:05d}.js").read_text()
    return json.loads(text[text.index("= ") + 2 :].rstrip().rstrip(";"))


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_index_lists_sorts_and_searches_the_features(site, browser, tmp_path):
    page = browser.page()
    page.goto((site / "index.html").as_uri())
    index = json.loads((site / "data" / "index.js").read_text().split("= ", 1)[1].rstrip().rstrip(";"))
    alive = [i for i, d in enumerate(index["features"]["density"]) if d > 0]
    assert page.eval("document.querySelectorAll('#features tbody tr').length") == min(200, len(alive))
    assert page.eval("document.getElementById('count').textContent").startswith(f"{min(200, len(alive))} of {len(alive)}")
    # Densest first by default; then by maximum activation, each way.
    shown = page.eval("[...document.querySelectorAll('#features tbody tr')].map(r => +r.dataset.feature)")
    densities = [index["features"]["density"][f] for f in shown]
    assert densities == sorted(densities, reverse=True)
    page.eval("document.querySelector('th[data-key=max]').click()")
    shown = page.eval("[...document.querySelectorAll('#features tbody tr')].map(r => +r.dataset.feature)")
    maxima = [index["features"]["max"][f] for f in shown]
    assert maxima == sorted(maxima, reverse=True) and maxima[0] > maxima[-1]
    page.eval("document.querySelector('th[data-key=max]').click()")
    assert page.eval("document.querySelector('th[data-key=max]').getAttribute('aria-sort')") == "ascending"

    # The search box keeps the features with a top token containing the query.
    page.eval("const s = document.getElementById('search'); s.value = 'list'; s.dispatchEvent(new Event('input'))")
    rows = page.eval("[...document.querySelectorAll('#features tbody tr')].map(r => [+r.dataset.feature, "
                     "[...r.querySelectorAll('.tok')].map(t => t.textContent)])")
    expected = [f for f in alive if any("list" in t.lower() for t in index["features"]["tokens"][f])]
    assert rows and sorted(f for f, _ in rows) == sorted(expected)
    assert all(any("list" in t for t in toks) for _, toks in rows)
    page.screenshot(tmp_path / "index.png")
    # The SAE's `fastsae eval` metrics, in a table above the features.
    metrics = dict(page.eval("[...document.querySelectorAll('#metrics tr')].map(r => [r.cells[0].textContent, "
                             "r.cells[1].textContent])"))
    assert page.eval("document.getElementById('metrics').hidden") is False
    assert float(metrics["explained_variance"]) == pytest.approx(index["meta"]["metrics"]["explained_variance"], rel=1e-3)
    assert metrics["n_tokens"] == "200" and "hidden_score" in metrics
    assert page.errors() == []


def test_a_feature_page_shows_its_contexts_with_the_token_highlighted(site, browser, tmp_path):
    page = browser.page()
    page.goto((site / "index.html").as_uri())
    feature = page.eval("+document.querySelector('#features tbody tr').dataset.feature")
    page.eval("document.querySelector('#features tbody tr a').click()")  # as a user opens it
    n = page.wait_for("document.querySelectorAll('.context').length")
    assert page.eval("location.hash") == f"#{feature}"
    shard = shard_of(site, feature)
    record = shard["features"][str(feature)]
    assert n == len(record["contexts"]) > 0

    rendered = page.eval("[...document.querySelectorAll('.context')].map(c => ({value: c.querySelector('.value')"
                         ".textContent, max: [...c.querySelectorAll('.t.max')].map(t => [t.textContent, "
                         "getComputedStyle(t).backgroundColor, getComputedStyle(t).outlineStyle]), "
                         "text: c.querySelector('.text').textContent}))")
    for context, shown in zip(record["contexts"], rendered):
        word = shard["tokens"][str(context["t"][context["h"]])]
        assert len(shown["max"]) == 1
        text, colour, outline = shown["max"][0]
        assert text == word.strip()  # the example's own token is the one highlighted
        assert re.match(r"rgba?\(234, 88, 12\b", colour) and outline == "solid"  # shaded, outlined
        assert shown["text"] == "".join(shard["tokens"][str(t)] for t in context["t"])
        assert float(shown["value"]) == pytest.approx(context["v"], rel=5e-3)
    assert page.eval("document.querySelectorAll('svg.hist rect').length") == len(record["hist"]["counts"])
    neighbours = page.eval("[...document.querySelectorAll('.neighbours a')].map(a => a.getAttribute('href'))")
    assert neighbours == [f"#{n}" for n, _ in record["neighbours"]]

    shot = page.screenshot(tmp_path / f"feature_{feature}.png")
    assert png_size(shot) == (1200, 900) and shot.stat().st_size > 10_000

    # A neighbour link switches the page to that feature without a reload.
    other = record["neighbours"][0][0]
    page.eval("document.querySelector('.neighbours a').click()")
    page.wait_for(f"document.querySelector('h1') && document.querySelector('h1').textContent === 'Feature {other}'")
    assert page.errors() == []
