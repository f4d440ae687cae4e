"""The static site: index.html and feature.html (from assets/), their data as JavaScript files
under data/ (loaded with <script>, which works from file:// where fetch() is blocked), no CDN.

    SITE/
      index.html, feature.html, assets/{browser.css,index.js,feature.js}
      data/index.js               every feature's density, max and mean activation, top tokens
      data/features_NNNNN.js      `shard_size` features each: histogram, neighbours, contexts
      site.json                   what was written from what (also marks the folder as ours)
"""

from __future__ import annotations

import bisect
import json
import math
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastsae.browse.stats import FeatureStats, nearest_by_decoder

ASSETS = Path(__file__).parent / "assets"
PAGES = ("index.html", "feature.html")
SCRIPTS = ("browser.css", "index.js", "feature.js")
MARKER = "site.json"


def token_strings(tokenizer, ids: Sequence[int]) -> dict[int, str]:
    """How each token reads inside running text, its leading space included: WordPiece's "##ing"
    -> "ing", "the" -> " the"; byte-level BPE's "Ġthe" -> " the"; SentencePiece's "▁the" -> " the".
    Found by letting the tokenizer join the token to a word before it."""
    out = {}
    for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
        try:
            joined = tokenizer.convert_tokens_to_string(["a", tok])
        except Exception:  # a tokenizer without a joiner: show the raw token
            joined = "a " + str(tok)
        out[int(i)] = joined[1:] if joined.startswith("a") else " " + str(tok)
    return out


def _significant(t: Tensor, digits: int):
    """`t` as nested lists of floats rounded to `digits` significant digits (NaN, inf kept), done
    in float64 so each prints as its short decimal (0.107, not 0.10700000077)."""
    x = t.double()
    finite = torch.isfinite(x) & (x != 0)
    exponent = torch.where(finite, x.abs().clamp_min(1e-300).log10().floor(), 0.0)
    shift = (digits - 1) - exponent  # by powers of ten, exact in float64 either way
    up, down = torch.pow(10.0, shift.clamp_min(0)), torch.pow(10.0, (-shift).clamp_min(0))
    return torch.where(finite, torch.round(x * up / down) * down / up, x).tolist()


def _js_assign(target: str, value) -> str:
    # ensure_ascii escapes U+2028/2029 too, so the literal is valid JavaScript whatever the text.
    return f"{target} = {json.dumps(value, ensure_ascii=True, separators=(',', ':'))};\n"


def _prepare_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file, expected a folder for the site")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ValueError(f"--out: {out} is not empty and holds no fastsae site ({MARKER}); choose a new or empty folder")
    shutil.rmtree(out / "data", ignore_errors=True)  # shards of an earlier, wider site
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / "assets").mkdir(exist_ok=True)
    for name in PAGES:
        shutil.copyfile(ASSETS / name, out / name)
    for name in SCRIPTS:
        shutil.copyfile(ASSETS / name, out / "assets" / name)


def write_site(
    stats: FeatureStats,
    out,
    token_ids: Tensor,
    tokenizer,
    W_dec: Tensor,
    features: Optional[Sequence[int]] = None,
    title: str = "SAE",
    summary: str = "",
    metrics: Optional[dict] = None,
    n_neighbours: int = 8,
    n_top_tokens: int = 5,
    shard_size: int = 64,
) -> Path:
    """Write the site for `stats` (a pass over `token_ids`) into folder `out`; `features`: those
    given a page (default all; the index lists every feature either way); `metrics`: a `fastsae eval`
    result (`fastsae.evals.evaluate`), whose scalar metrics the index shows. Returns index.html's path."""
    out = Path(out)
    d_sae = stats.d_sae
    if W_dec.shape[0] != d_sae:
        raise ValueError(f"W_dec: expected {d_sae} rows (the statistics' d_sae), got {tuple(W_dec.shape)}")
    pages = torch.arange(d_sae) if features is None else torch.as_tensor(list(features), dtype=torch.int64).unique()
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= d_sae):
        raise ValueError(f"features: expected indices in [0, {d_sae}), got {int(pages.min())}..{int(pages.max())}")
    _prepare_folder(out)

    n_stream = len(token_ids)
    positions = stats.top_positions
    offsets = torch.arange(-stats.before, stats.after + 1)
    window = positions[:, :, None] + offsets  # [d_sae, K, width] stream positions
    in_stream = (positions[:, :, None] >= 0) & (window >= 0) & (window < n_stream)
    window_ids = torch.where(in_stream, token_ids[window.clamp(0, max(0, n_stream - 1))], -1)
    shown = torch.zeros(d_sae, dtype=torch.bool)
    shown[pages] = True
    centre = window_ids[:, :, stats.before]
    used = torch.cat([window_ids[shown].flatten(), centre.flatten()]).unique()
    strings = token_strings(tokenizer, used[used >= 0].tolist())

    # The index: every feature, top tokens from its top contexts (most frequent first).
    top_tokens = []
    for row in centre.tolist():
        counts: dict[str, int] = {}
        for t in row:
            if t >= 0:
                s = strings[t].strip() or strings[t]
                counts[s] = counts.get(s, 0) + 1
        top_tokens.append(sorted(counts, key=lambda s: -counts[s])[:n_top_tokens])
    index = {
        "meta": {"title": title, "summary": summary, "d_sae": d_sae, "n_tokens": stats.n_tokens,
                 "metrics": {k: (v if math.isfinite(v) else None) for k, v in (metrics or {}).items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)}},
        "shard_size": shard_size,
        "features": {
            "id": list(range(d_sae)),
            "density": _significant(stats.density, 4),
            "max": _significant(stats.max_values, 4),
            "mean": _significant(stats.mean_values, 4),
            "tokens": top_tokens,
            "page": shown.int().tolist(),
        },
    }
    (out / "data" / "index.js").write_text(_js_assign("window.FASTSAE_INDEX", index), encoding="utf-8")

    # Per-feature pages: everything turned into Python lists once, then plain loops.
    neighbours, cosines = nearest_by_decoder(W_dec, pages, n_neighbours)
    neighbours_of, cosines_of = neighbours.tolist(), _significant(cosines, 4)
    page_list = pages.tolist()
    row_of = {f: j for j, f in enumerate(page_list)}
    # A window leaves the stream only at its ends: each context is the slice [lead, lead + count).
    page_ids = window_ids[pages]
    valid = page_ids >= 0
    leads_of = (valid.cumsum(-1) == 0).sum(-1).tolist()
    lengths_of = valid.sum(-1).tolist()
    page_acts = stats.context_acts[pages]
    unknown_of = (page_acts.isnan() & valid).any(-1).tolist()
    ids_of = page_ids.tolist()
    acts_of = _significant(page_acts, 3)
    values_of = _significant(stats.top_values[pages], 4)
    positions_of = positions[pages].tolist()
    hist_of = stats.hist[pages].tolist()
    width_of = torch.ldexp(torch.ones(len(page_list), dtype=torch.float64), stats.hist_exponent[pages]).tolist()
    counts_of = stats.counts[pages].tolist()
    for lo in range(0, d_sae, shard_size):
        feats = [f for f in page_list[bisect.bisect_left(page_list, lo) :] if f < lo + shard_size]
        if not feats:
            continue
        shard_tokens: dict[int, str] = {}
        records = {}
        for f in feats:
            r = row_of[f]
            hist = hist_of[r]
            last = len(hist)
            while last and hist[last - 1] == 0:
                last -= 1
            hist = hist[:last]
            contexts = []
            for j, value in enumerate(values_of[r]):
                if positions_of[r][j] < 0:
                    break
                lead, stop = leads_of[r][j], leads_of[r][j] + lengths_of[r][j]
                ids, acts = ids_of[r][j][lead:stop], acts_of[r][j][lead:stop]
                if unknown_of[r][j]:  # NaN (across a gap in the stream) -> null: unknown
                    acts = [None if a != a else a for a in acts]
                contexts.append({"v": value, "t": ids, "a": acts, "h": stats.before - lead})
                for t in ids:
                    shard_tokens[t] = strings[t]
            nb, cs = neighbours_of[r], cosines_of[r]
            records[f] = {
                "count": counts_of[r],
                "hist": {"width": width_of[r] if hist else 0.0, "counts": hist},
                "neighbours": [[n, c] for n, c in zip(nb, cs)],
                "contexts": contexts,
            }
        shard = {"features": records, "tokens": shard_tokens}
        path = out / "data" / f"features_{lo // shard_size:05d}.js"
        path.write_text(_js_assign(f"window.FASTSAE_SHARDS[{lo // shard_size}]", shard), encoding="utf-8")
    (out / MARKER).write_text(json.dumps({"title": title, "summary": summary, "d_sae": d_sae,
                                          "n_tokens": stats.n_tokens, "pages": int(shown.sum())}, indent=1) + "\n")
    return out / "index.html"


def make_server(folder, port: int = 8000):
    """An HTTP server for `folder` on 127.0.0.1 only (never every interface); port 0: any free one."""
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve(folder, port: int = 8000) -> None:
    """Serve `folder` on http://127.0.0.1:PORT/ until interrupted."""
    with make_server(folder, port) as httpd:
        print(f"serving {folder} at http://127.0.0.1:{httpd.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
