"""`fastsae.evals` and `fastsae eval`: the activation metrics against SAELens' own eval functions
(real sae-lens, on the same SAE saved by fastsae and loaded by SAELens) and against float64 references
computed here; chunk-size independence; the CE/KL path on a tiny random causal LM (GPT-2 config);
the encoder path on a tiny random BERT; the command end to end; errors that name what is wrong."""

import json
import math

import pytest
import torch
from helpers.eval_reference import randomized, reference_metrics

import fastsae
from fastsae import SAE
from fastsae.evals import ACTIVATION_KEYS, ActivationMetrics, activation_metrics, downstream_metrics, evaluate
from fastsae.training.data import ActivationFiles, save_activations
from helpers.text_models import TEXT_WIDTH, corpus, kept_windows, tiny_gpt2  # noqa: F401  (fixtures)
from helpers.tiny_models import CODE_WORDS, save_tiny_bert

D_IN, D_SAE, K = 16, 64, 4
HOOK = "blocks.0.hook_resid_post"


def random_sae(arch="topk", **kw):
    sae = SAE(d_in=D_IN, d_sae=D_SAE, architecture=arch, metadata={"hook_name": HOOK},
              **({"k": K} if arch == "topk" else {}), **kw)
    return randomized(sae)


def acts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A large mean component: the case where an uncentred or float32 variance goes wrong.
    return torch.randn(n, D_IN, generator=g) + 3.0


def reference(sae, x):
    """The metrics from dense float64 tensors, straight from the definitions in README."""
    with torch.no_grad():
        return reference_metrics(sae.encode(x), sae.decode(sae.encode(x)), x)


class Rows:
    """A minimal activation source over a tensor, in chunks of `chunk` rows."""

    def __init__(self, x, chunk):
        self.x, self.chunk = x, chunk

    @property
    def d_in(self):
        return self.x.shape[1]

    @property
    def chunk_sizes(self):
        return [len(c) for c in self.x.split(self.chunk)]

    def load_chunk(self, i):
        return self.x.split(self.chunk)[i]


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu"])
def test_metrics_equal_float64_reference(arch):
    sae = random_sae(arch)
    x = acts(600)
    got = activation_metrics(sae, Rows(x, 128), batch_rows=100).compute()
    ref = reference(sae, x)
    assert 0 < got["l0"] < D_SAE and 0 < ref["dead_fraction"] + 1  # not vacuous
    for key in ACTIVATION_KEYS:
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    assert got["n_tokens"] == 600
    hist = got["density_histogram"]
    assert sum(hist["counts"]) + hist["dead"] == D_SAE


def test_metrics_do_not_depend_on_chunk_or_batch_size(tmp_path):
    sae = random_sae()
    x = acts(1000)
    save_activations(tmp_path / "a.safetensors", x)
    results = [activation_metrics(sae, ActivationFiles(tmp_path / "a.safetensors", chunk_rows=c), batch_rows=b).compute()
               for c, b in ((1000, 4096), (97, 13), (256, 1000), (1, 1))]
    for other in results[1:]:
        for key in ACTIVATION_KEYS:
            # The SAE computes in float32, whose matmuls round differently with the batch's size.
            assert other[key] == pytest.approx(results[0][key], rel=1e-6, abs=1e-9), key
    # The float64 accumulation itself: the same batch outputs added in different groupings agree
    # to float64 rounding.
    from fastsae.evals import reconstruct

    x_hat, values, indices = reconstruct(sae, x)
    sums = []
    for size in (1000, 333, 64, 7):
        acc = ActivationMetrics(D_IN, D_SAE)
        for part in zip(x.split(size), x_hat.split(size), values.split(size), indices.split(size)):
            acc.add(*part)
        sums.append(acc.compute())
    for other in sums[1:]:
        for key in ACTIVATION_KEYS:
            assert other[key] == pytest.approx(sums[0][key], rel=1e-12, abs=1e-14), key
    # A token budget reads only the first rows.
    head = activation_metrics(sae, ActivationFiles(tmp_path / "a.safetensors", chunk_rows=97), max_tokens=300).compute()
    assert head["n_tokens"] == 300
    assert head["mse"] == pytest.approx(reference(sae, x[:300])["mse"], rel=1e-6)


def test_explained_variance_is_mean_centred_and_exact_for_a_perfect_reconstruction():
    acc = ActivationMetrics(3, 2)
    x = torch.tensor([[1e4, 1.0, 2.0], [1e4 + 1, 3.0, 2.0], [1e4 - 1, 2.0, 2.0]], dtype=torch.float64)
    acc.add(x, x.clone(), torch.ones(3, 2))
    m = acc.compute()
    assert m["explained_variance"] == 1.0 and m["fvu"] == 0.0 and m["mse"] == 0.0
    acc = ActivationMetrics(3, 2)
    for row in range(3):  # predicting the mean explains nothing (to float64 rounding despite the 1e4 offset)
        acc.add(x[row : row + 1], x.mean(0, keepdim=True), torch.ones(1, 2))
    assert acc.compute()["explained_variance"] == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(acc.mean, x.mean(0), rtol=0, atol=1e-12)


# ------------------------------------------------------------ against SAELens' eval functions


class FakeStore:
    """Batches of token ids, each id naming a row of the activations (column 0: a BOS token)."""

    def __init__(self, n_rows, ctx, bos):
        self.next, self.ctx, self.bos = 0, ctx, bos

    def get_batch_tokens(self, n):
        ids = torch.arange(self.next, self.next + n * (self.ctx - 1)).reshape(n, self.ctx - 1)
        self.next += n * (self.ctx - 1)
        return torch.cat([torch.full((n, 1), self.bos), ids], dim=1)


class FakeModel:
    def __init__(self, table):
        self.table = table

    def run_with_cache(self, tokens, **_):
        return None, {HOOK: self.table[tokens]}


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_activation_metrics_equal_saelens(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is an optional test dependency")
    from sae_lens.evals import get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    ours = random_sae(arch)
    theirs = sae_lens.SAE.load_from_disk(str(ours.save(tmp_path / "sae")))
    n_batches, prompts, ctx = 3, 4, 9
    n_rows = n_batches * prompts * (ctx - 1)
    table = torch.cat([acts(n_rows), torch.full((1, D_IN), 50.0)])  # the last row: the BOS token's, to be excluded
    bos = n_rows

    def run(n, p):
        return get_sparsity_and_variance_metrics(
            theirs, FakeModel(table), FakeStore(n_rows, ctx, bos), ActivationScaler(), n_batches=n,
            compute_l2_norms=True, compute_sparsity_metrics=True, compute_variance_metrics=True,
            compute_featurewise_density_statistics=True, eval_batch_size_prompts=p, model_kwargs={}, ignore_tokens=[bos])

    metrics, features = run(n_batches, prompts)
    got = activation_metrics(ours, Rows(table[:n_rows], 7), batch_rows=5).compute()
    pairs = {"explained_variance": "explained_variance", "mse": "mse", "cosine_similarity": "cossim",
             "l2_ratio": "l2_ratio", "l0": "l0", "l1": "l1"}
    for key, theirs_key in pairs.items():
        assert got[key] == pytest.approx(metrics[theirs_key], rel=2e-5, abs=1e-6), key
    density = torch.tensor(features["feature_density"], dtype=torch.float64)
    assert got["dead_fraction"] == (density == 0).double().mean().item()
    assert got["dense_fraction"] == (density > 0.1).double().mean().item()
    # SAELens averages relative_reconstruction_bias's per-batch ratios; over one batch it is ours.
    one, _ = run(1, n_batches * prompts)
    assert got["relative_reconstruction_bias"] == pytest.approx(one["relative_reconstruction_bias"], rel=2e-5)


# ------------------------------------------------------------ downstream, tiny transformers

WORDS, WIDTH = CODE_WORDS, TEXT_WIDTH


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    pytest.importorskip("transformers")
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS, hidden_size=WIDTH, num_hidden_layers=2)


def identity_sae(d):
    """A ReLU SAE with latents relu(x) and relu(-x): a perfect reconstruction."""
    sae = SAE(d_in=d, d_sae=2 * d, architecture="relu")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_causal_lm_ce_and_kl(tiny_gpt2, corpus):
    from transformers import AutoModelForCausalLM

    from fastsae.training.transformer import TransformerActivations

    src = TransformerActivations(tiny_gpt2, hook="h.0", text=corpus, seq_len=12, seqs_per_chunk=3)
    perfect = evaluate(identity_sae(WIDTH), src, batch_windows=4)
    assert perfect["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["ce_loss_with_sae"] == pytest.approx(perfect["ce_loss_without_sae"], abs=1e-5)
    assert perfect["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["ce_loss_score"] == pytest.approx(1.0, abs=1e-4) and perfect["kl_div_score"] == pytest.approx(1.0, abs=1e-4)

    sae = SAE(d_in=WIDTH, d_sae=48, architecture="topk", k=3)
    got = evaluate(sae, src, max_tokens=50, batch_windows=2)
    assert got["n_tokens"] == 50 and math.isfinite(got["ce_loss_score"]) and got["kl_div_with_sae"] > 0
    assert got["ce_loss_with_ablation"] != got["ce_loss_without_sae"]

    # The CE loss against a plain reference: the model run on each window, the hook's output
    # replaced by hand at the window's tokens.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2)).eval()
    mean = activation_metrics(sae, src, max_tokens=50).mean
    again = downstream_metrics(sae, src, mean, max_tokens=50, batch_windows=3, model=model)
    assert again["ce_loss_with_sae"] == pytest.approx(got["ce_loss_with_sae"], rel=1e-6)  # the batch of windows does not matter
    nll = []
    for ids, attention, keep in kept_windows(src, 50):

        def replace(_m, _i, out, keep=keep):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            with torch.no_grad():
                h[keep] = sae(h[keep])
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = model.transformer.h[0].register_forward_hook(replace)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits.double()
        handle.remove()
        logp = logits.log_softmax(-1)
        end = int(attention.sum())
        for i in range(end - 1):
            if keep[0, i]:
                nll.append(-logp[0, i, ids[0, i + 1]].item())
    assert got["ce_loss_with_sae"] == pytest.approx(sum(nll) / len(nll), rel=1e-6)
    assert got["n_predictions"] == len(nll)


def test_encoder_recovered_score(tiny_bert, corpus):
    from fastsae.training.transformer import TransformerActivations

    src = TransformerActivations(tiny_bert, hook="encoder.layer.0", text=corpus, seq_len=12, seqs_per_chunk=3)
    perfect = evaluate(identity_sae(WIDTH), src)
    assert perfect["hidden_score"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["hidden_cosine_with_sae"] == pytest.approx(1.0, abs=1e-6)
    got = evaluate(SAE(d_in=WIDTH, d_sae=48, architecture="topk", k=2), src, max_tokens=40)
    assert got["hidden_mse_with_sae"] > 0 and got["hidden_score"] < 1 and "ce_loss_score" not in got


# ------------------------------------------------------------ the command


def run_cli(argv, capsys):
    from fastsae.cli import main

    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_on_an_activation_file(tmp_path, capsys):
    sae = random_sae()
    folder = sae.save(tmp_path / "sae")
    x = acts(500)
    save_activations(tmp_path / "acts.safetensors", x)
    rc, out, err = run_cli(["eval", str(folder), "--data", str(tmp_path / "acts.safetensors"), "--json",
                            str(tmp_path / "m.json"), "--tokens", "400", "--batch-rows", "64"], capsys)
    assert rc == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    ref = reference(fastsae.load(folder), x[:400])
    for key in ACTIVATION_KEYS:
        assert m[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    assert "explained variance" in out and "ce_loss_score" not in m


def test_cli_on_a_causal_lm(tiny_gpt2, corpus, tmp_path, capsys):
    sae = SAE(d_in=WIDTH, d_sae=48, architecture="topk", k=3, metadata={"hook_name": "h.1"})
    folder = sae.save(tmp_path / "sae")
    rc, out, err = run_cli(["eval", str(folder), "--model", str(tiny_gpt2), "--hook", "h.1", "--text", str(corpus),
                            "--seq-len", "12", "--tokens", "60", "--activation-cache", "none", "--json",
                            str(tmp_path / "m.json")], capsys)
    assert rc == 0, err
    m = json.loads((tmp_path / "m.json").read_text())
    for key in ACTIVATION_KEYS + ("ce_loss_score", "ce_loss_score_mean_ablation", "kl_div_with_sae", "kl_div_score"):
        assert key in m and math.isfinite(m[key]), key
    assert "CE loss" in out and "KL" in out


def test_cli_names_what_is_wrong(tiny_gpt2, corpus, tmp_path, capsys):
    folder = random_sae().save(tmp_path / "sae")
    rc, _, err = run_cli(["eval", str(tmp_path / "nothing"), "--data", "x.safetensors"], capsys)
    assert rc == 2 and "nothing" in err
    rc, _, err = run_cli(["eval", str(folder), "--data", str(tmp_path / "missing.safetensors")], capsys)
    assert rc == 2 and "missing.safetensors" in err
    save_activations(tmp_path / "wide.safetensors", torch.randn(10, D_IN + 1))
    rc, _, err = run_cli(["eval", str(folder), "--data", str(tmp_path / "wide.safetensors")], capsys)
    assert rc == 2 and f"d_in={D_IN}" in err and f"width {D_IN + 1}" in err
    common = ["--model", str(tiny_gpt2), "--text", str(corpus), "--seq-len", "12", "--activation-cache", "none"]
    rc, _, err = run_cli(["eval", str(folder), "--hook", "h.9"] + common, capsys)
    assert rc == 2 and "'h.9'" in err
    rc, _, err = run_cli(["eval", str(folder), "--hook", "h.0"] + common, capsys)  # width 24, SAE 16
    assert rc == 2 and f"d_in={D_IN}" in err and f"width {WIDTH}" in err
    with pytest.raises(ValueError, match="width"):
        activation_metrics(random_sae(), Rows(torch.randn(4, D_IN + 2), 2))


# ------------------------------------------------------------ fastsae train and fastsae browse show them


def read_index(site):
    text = (site / "data" / "index.js").read_text()
    prefix = "window.FASTSAE_INDEX = "
    assert text.startswith(prefix)
    return json.loads(text[len(prefix) :].rstrip()[:-1])


def test_train_prints_the_metrics_and_the_browser_shows_them(tiny_gpt2, corpus, tmp_path, capsys):
    from fastsae.evals import tail_chunk

    run = tmp_path / "run"
    rc, out, err = run_cli(["train", "--model", str(tiny_gpt2), "--hook", "h.0", "--text", str(corpus), "--seq-len", "12",
                            "--k", "3", "--d-sae", "48", "--tokens", "400", "--batch-size", "100", "--activation-cache",
                            "none", "--out", str(run), "--no-progress", "--report-features", "0", "--browser-tokens", "100",
                            "--eval-tokens", "50"], capsys)
    assert rc == 0, err
    assert "eval (`fastsae eval`) on the data's last" in out and "explained variance" in out and "CE loss" in out
    summary = json.loads((run / "summary.json").read_text())["eval"]
    assert 50 <= summary["n_tokens"] and math.isfinite(summary["ce_loss_score"])
    shown = read_index(run / "browser")["meta"]["metrics"]
    assert shown["explained_variance"] == summary["explained_variance"] and "ce_loss_score" in shown

    # fastsae eval on the run folder: the run's model, hook and text; the same numbers on the same tokens.
    rc, out, err = run_cli(["eval", str(run), "--tokens", "50", "--json", str(tmp_path / "m.json")], capsys)
    assert rc == 0, err
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["n_tokens"] == 50 and math.isfinite(again["kl_div_score"])

    rc, out, err = run_cli(["browse", str(run), "--out", str(tmp_path / "site"), "--tokens", "100", "--eval-tokens", "40"],
                           capsys)
    assert rc == 0, err
    shown = read_index(tmp_path / "site")["meta"]["metrics"]
    assert shown["n_tokens"] == 40 and "kl_div_score" in shown

    class Sizes:
        chunk_sizes = [10, 10, 5]

    assert [tail_chunk(Sizes, n) for n in (1, 5, 6, 15, 25, 99)] == [2, 2, 1, 1, 0, 0]


def test_train_on_activation_files_prints_the_metrics(tmp_path, capsys):
    save_activations(tmp_path / "acts.safetensors", acts(600))
    rc, out, err = run_cli(["train", "--data", str(tmp_path / "acts.safetensors"), "--k", "3", "--d-sae", "32",
                            "--tokens", "600", "--batch-size", "100", "--out", str(tmp_path / "run"), "--no-progress",
                            "--eval-tokens", "200"], capsys)
    assert rc == 0, err
    assert "eval (`fastsae eval`) on the data's last 200 tokens" in out and "CE loss" not in out
    m = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]
    assert m["n_tokens"] == 200 and 0 <= m["dead_fraction"] <= 1
    # And `fastsae eval RUN` reopens the run's activation files.
    rc, out, err = run_cli(["eval", str(tmp_path / "run"), "--tokens", "600"], capsys)
    assert rc == 0, err
    assert "on 600 tokens" in out


def test_json_output_is_strict():
    from fastsae.cli.eval import nan_as_null as _finite

    assert _finite({"a": math.nan, "b": [1.0, math.inf], "c": {"d": 2}}) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


def test_streaming_reads_only_the_chunks_the_budget_needs():
    class Counting(Rows):
        loaded = []

        def load_chunk(self, i):
            self.loaded.append(i)
            return super().load_chunk(i)

    src = Counting(acts(1000), 100)
    m = activation_metrics(random_sae(), src, max_tokens=250, batch_rows=64).compute()
    assert m["n_tokens"] == 250 and src.loaded == [0, 1, 2]
    src.loaded = []
    assert activation_metrics(random_sae(), src, max_tokens=150, first_chunk=8).n == 150 and src.loaded == [8, 9]


def test_downstream_equals_saelens_get_downstream_reconstruction_metrics(tiny_gpt2, corpus, tmp_path):
    """SAELens' CE and KL with the HF model behind TransformerLens' calling convention: the same
    tokens, the SAE spliced at the same positions (SAELens' ignore_tokens: the special tokens)."""
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is an optional test dependency")
    from sae_lens.evals import get_downstream_reconstruction_metrics
    from sae_lens.training.activation_scaler import ActivationScaler
    from transformers import AutoModelForCausalLM

    from fastsae.training.transformer import TransformerActivations

    src = TransformerActivations(tiny_gpt2, hook="h.1", text=corpus, seq_len=12, seqs_per_chunk=3)
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2)).eval()
    sae = SAE(d_in=WIDTH, d_sae=48, architecture="topk", k=3, metadata={"hook_name": "h.1"})
    n_windows, per_batch = 6, 2  # full windows only: TransformerLens runs no attention mask

    class Store:
        next = 0

        def get_batch_tokens(self, n):
            ids, attention, _ = src.window_inputs(self.next, self.next + n)
            assert bool(attention.all())
            self.next += n
            return ids

    class Model:  # HookedRootModule's calls that get_recons_loss makes
        def _run(self, tokens, hook_fn=None):
            handle = None
            if hook_fn is not None:
                def fn(_m, _i, out):
                    h = out[0] if isinstance(out, tuple) else out
                    h = hook_fn(h, None)
                    return (h, *out[1:]) if isinstance(out, tuple) else h
                handle = lm.transformer.h[1].register_forward_hook(fn)
            try:
                logits = lm(input_ids=tokens).logits
            finally:
                if handle is not None:
                    handle.remove()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
            return logits, loss.reshape(tokens.shape[0], -1)

        def __call__(self, tokens, **_):
            return self._run(tokens)

        def run_with_hooks(self, tokens, fwd_hooks, **_):
            return self._run(tokens, fwd_hooks[0][1])

    theirs = get_downstream_reconstruction_metrics(
        sae_lens.SAE.load_from_disk(str(sae.save(tmp_path / "sae"))), Model(), Store(), ActivationScaler(), compute_kl=True, compute_ce_loss=True, n_batches=n_windows // per_batch,
        eval_batch_size_prompts=per_batch, ignore_tokens=[src.tokenizer.cls_token_id, src.tokenizer.sep_token_id])
    mean = activation_metrics(sae, src, max_tokens=n_windows * src.window).mean
    ours = downstream_metrics(sae, src, mean, max_tokens=n_windows * src.window, batch_windows=4, model=lm)
    assert ours["kl_div_with_sae"] > 1e-3 and ours["n_predictions"] == n_windows * src.window  # not vacuous
    for key in ("ce_loss_without_sae", "ce_loss_with_sae", "kl_div_with_sae"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
    # (SAELens zero-ablates every position, the special tokens too; we ablate the tokens the SAE replaces.)
