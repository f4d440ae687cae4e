"""`fastsae eval` and the feature browser on transcoders: the activation metrics compare the output
sae(x) (skip term included) with the target y, against float64 definitions, with d_out != d_in and
with a skip connection; downstream, the output of hook_out's module is replaced by the transcoder's
prediction from hook_in's activations in the same pass (a tiny causal LM whose MLP is exactly a ReLU
transcoder scores as the clean model; a random one equals a hand-written splice); `fastsae train
--hook-in/--hook-out` prints them, writes the browser, and `fastsae eval`/`browse` reopen the run.

SAELens (6.54) has no eval function that takes a transcoder: its `get_sparsity_and_variance_metrics`
and `get_recons_loss` compare decode(encode(x)) with x at one hook, so these tests use float64
definitions and hand-written splices instead."""

import json
import math

import pytest
import torch
from helpers.eval_reference import randomized, reference_metrics
from helpers.text_models import TEXT_WIDTH, corpus, kept_windows, tiny_gpt2  # noqa: F401  (fixtures)
from helpers.tiny_models import CODE_WORDS, save_tiny_bert, save_tiny_gpt2

import fastsae
from fastsae import SAE
from fastsae.cli import main
from fastsae.evals import ACTIVATION_KEYS, activation_metrics, downstream_metrics, evaluate
from fastsae.training.data import ActivationFiles, save_activations

D_IN, D_OUT, D_SAE = 12, 7, 40


def random_transcoder(arch="topk", d_in=D_IN, d_out=D_OUT, skip=False, d_sae=D_SAE, **kw):
    k = {"k": 4} if arch in ("topk", "batchtopk") else {}
    sae = SAE(d_in=d_in, d_sae=d_sae, d_out=d_out, architecture=arch, skip_connection=skip,
              apply_b_dec_to_input=False, **k, **kw)
    return randomized(sae)


def pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g) + 1.0
    y = x[:, :D_OUT].tanh() * 2 + 0.5 * torch.randn(n, D_OUT, generator=g) + 3.0  # a large mean, as activations have
    return x, y


def reference(sae, x, y):
    """The metrics from dense float64 tensors, straight from README's definitions with y as the target."""
    with torch.no_grad():
        a, pred = sae.encode(x), sae.decode(sae.encode(x)).double()
    if sae.W_skip is not None:
        pred = pred + x.double() @ sae.W_skip.detach().double().T
    return reference_metrics(a, pred, y), y.double().mean(0)


class Pairs:
    """A paired source over tensors (inputs then targets side by side), in chunks of `chunk` rows."""

    def __init__(self, x, y, chunk):
        self.rows, self.chunk, self.d_in, self.d_out = torch.cat([x, y], 1), chunk, x.shape[1], y.shape[1]

    @property
    def chunk_sizes(self):
        return [len(c) for c in self.rows.split(self.chunk)]

    def load_chunk(self, i):
        return self.rows.split(self.chunk)[i]


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_transcoder_metrics_equal_float64_definitions(arch, skip):
    sae = random_transcoder(arch, skip=skip)
    x, y = pairs(500)
    acc = activation_metrics(sae, Pairs(x, y, 128), batch_rows=77)
    got = acc.compute()
    ref, y_mean = reference(sae, x, y)
    assert 0 < got["l0"] < D_SAE and got["mse"] > 0  # not vacuous
    for key in ACTIVATION_KEYS:
        assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    assert torch.allclose(acc.mean, y_mean, rtol=0, atol=1e-10)  # mean ablation's value: the targets' mean
    assert got["n_tokens"] == 500
    if skip:  # the skip term counts: without it the prediction (and the MSE) differs
        assert got["mse"] != pytest.approx(reference(SAE(sae.cfg).eval(), x, y)[0]["mse"], rel=1e-3)


def test_paired_files_and_errors_that_name_what_is_wrong(tmp_path, capsys):
    sae = random_transcoder("relu", skip=True)
    folder = sae.save(tmp_path / "tc")
    x, y = pairs(300, seed=1)
    save_activations(tmp_path / "pairs.safetensors", x, y)
    rc = main(["eval", str(folder), "--data", str(tmp_path / "pairs.safetensors"), "--json", str(tmp_path / "m.json"),
               "--batch-rows", "50"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    m = json.loads((tmp_path / "m.json").read_text())
    ref, _ = reference(fastsae.load(folder), x, y)
    for key in ACTIVATION_KEYS:
        assert m[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    assert m["transcoder"] is True and "against the targets" in out.out and "--hook-out" in out.out
    # A transcoder on inputs alone, an SAE on pairs, targets of another width: one clear error each.
    save_activations(tmp_path / "plain.safetensors", x)
    assert main(["eval", str(folder), "--data", str(tmp_path / "plain.safetensors")]) == 2
    assert f"a transcoder (d_out={D_OUT}) is measured against targets" in capsys.readouterr().err
    plain_sae = SAE(d_in=D_IN, d_sae=16, architecture="topk", k=2).save(tmp_path / "sae")
    assert main(["eval", str(plain_sae), "--data", str(tmp_path / "pairs.safetensors")]) == 2
    assert f"pairs inputs with targets of width {D_OUT}" in capsys.readouterr().err
    save_activations(tmp_path / "wide.safetensors", x, torch.cat([y, y], 1))
    assert main(["eval", str(folder), "--data", str(tmp_path / "wide.safetensors")]) == 2
    assert f"expected targets of width d_out={D_OUT} (the transcoder's), got width {2 * D_OUT}" in capsys.readouterr().err


# ------------------------------------------------------------ downstream: the MLP replaced

WORDS, WIDTH = CODE_WORDS, TEXT_WIDTH
HOOK_IN, HOOK_OUT = "h.0.ln_2", "h.0.mlp"  # the MLP's input and its output


@pytest.fixture(scope="module")
def relu_gpt2(tmp_path_factory):
    pytest.importorskip("transformers")
    return save_tiny_gpt2(tmp_path_factory.mktemp("relu_gpt2"), WORDS, width=WIDTH, activation="relu")


def source(model, corpus, **kw):
    from fastsae.training.transformer import TransformerActivations

    return TransformerActivations(model, hook=kw.pop("hook", HOOK_IN), hook_out=kw.pop("hook_out", HOOK_OUT), text=corpus,
                                  seq_len=12, seqs_per_chunk=3, **kw)


def test_a_transcoder_equal_to_the_mlp_recovers_everything(relu_gpt2, corpus):
    """GPT-2 with a ReLU MLP is relu(x W_fc + b_fc) W_proj + b_proj: that ReLU transcoder replaces
    it exactly, so the spliced model is the clean one (CE recovered 1, KL 0, explained variance 1)."""
    from transformers import AutoModelForCausalLM

    mlp = AutoModelForCausalLM.from_pretrained(str(relu_gpt2)).transformer.h[0].mlp
    sae = SAE(d_in=WIDTH, d_sae=4 * WIDTH, d_out=WIDTH, architecture="relu", apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.copy_(mlp.c_fc.weight)
        sae.b_enc.copy_(mlp.c_fc.bias)
        sae.W_dec.copy_(mlp.c_proj.weight)
        sae.b_dec.copy_(mlp.c_proj.bias)
    got = evaluate(sae.eval(), source(relu_gpt2, corpus), batch_windows=4)
    assert got["transcoder"] and got["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert got["ce_loss_with_sae"] == pytest.approx(got["ce_loss_without_sae"], abs=1e-5)
    assert got["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-7)
    assert got["ce_loss_score"] == pytest.approx(1.0, abs=1e-3) and got["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert got["kl_div_with_ablation"] > 1e-5 and got["kl_div_with_mean_ablation"] > 1e-6  # the baselines do change it


def test_spliced_ce_equals_a_hand_written_mlp_replacement(tiny_gpt2, corpus):
    from transformers import AutoModelForCausalLM

    src = source(tiny_gpt2, corpus)
    sae = random_transcoder("topk", d_in=WIDTH, d_out=WIDTH, skip=True, d_sae=48)
    got = evaluate(sae, src, max_tokens=50, batch_windows=2)
    assert got["n_tokens"] == 50 and got["kl_div_with_sae"] > 0 and math.isfinite(got["ce_loss_score"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2)).eval()
    mean = activation_metrics(sae, src, max_tokens=50).mean
    again = downstream_metrics(sae, src, mean, max_tokens=50, batch_windows=3, model=model)
    assert again["ce_loss_with_sae"] == pytest.approx(got["ce_loss_with_sae"], rel=1e-6)
    block = model.transformer.h[0]
    results = {"sae": [], "mean_ablation": []}
    for variant in results:
        for ids, attention, keep in kept_windows(src, 50):
            seen = {}
            grab = block.ln_2.register_forward_hook(lambda _m, _i, out: seen.update(x=out))

            def replace(_m, _i, out, keep=keep, variant=variant):
                out = out.clone()
                with torch.no_grad():
                    out[keep] = sae(seen["x"][keep]) if variant == "sae" else mean.float()
                return out

            handle = block.mlp.register_forward_hook(replace)
            with torch.no_grad():
                logp = model(input_ids=ids, attention_mask=attention).logits.double().log_softmax(-1)
            handle.remove()
            grab.remove()
            for i in range(int(attention.sum()) - 1):
                if keep[0, i]:
                    results[variant].append(-logp[0, i, ids[0, i + 1]].item())
    assert got["ce_loss_with_sae"] == pytest.approx(sum(results["sae"]) / len(results["sae"]), rel=1e-6)
    mean_ce = sum(results["mean_ablation"]) / len(results["mean_ablation"])
    assert got["ce_loss_with_mean_ablation"] == pytest.approx(mean_ce, rel=1e-6)
    assert got["n_predictions"] == len(results["sae"])


def test_encoder_recovered_score_with_a_transcoder(tmp_path_factory, corpus):
    pytest.importorskip("transformers")
    bert = save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS, hidden_size=WIDTH, num_hidden_layers=2)
    src = source(bert, corpus, hook="encoder.layer.0.attention", hook_out="encoder.layer.0.intermediate")
    assert (src.d_in, src.d_out) == (WIDTH, 48)
    got = evaluate(random_transcoder("relu", d_in=WIDTH, d_out=48, d_sae=32), src, max_tokens=40)
    assert got["n_tokens_downstream"] == 40 and got["hidden_mse_with_sae"] > 0 and "ce_loss_score" not in got
    assert math.isfinite(got["hidden_score"]) and math.isfinite(got["hidden_cosine_with_sae"])


# ------------------------------------------------------------ fastsae train, eval and browse on a transcoder run


def read_index(site):
    text = (site / "data" / "index.js").read_text()
    prefix = "window.FASTSAE_INDEX = "
    return json.loads(text[len(prefix) :].rstrip()[:-1])


def test_transcoder_run_prints_evals_builds_the_browser_and_reopens(tiny_gpt2, corpus, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_gpt2), "--hook-in", HOOK_IN, "--hook-out", HOOK_OUT, "--text", str(corpus),
               "--seq-len", "12", "--k", "3", "--d-sae", "48", "--tokens", "400", "--batch-size", "100",
               "--activation-cache", "none", "--out", str(run), "--no-progress", "--report-features", "2",
               "--browser-tokens", "100", "--eval-tokens", "50", "--threads", "1"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "eval (`fastsae eval`) on the data's last" in out.out and "against the targets" in out.out
    assert "CE loss" in out.out and "features that fired" in out.out and "browser of the features" in out.out
    summary = json.loads((run / "summary.json").read_text())["eval"]
    assert summary["transcoder"] and summary["n_tokens"] >= 50 and math.isfinite(summary["ce_loss_score"])
    index = read_index(run / "browser")
    assert index["meta"]["metrics"]["kl_div_score"] == summary["kl_div_score"]
    assert "transcoder" in index["meta"]["summary"] and f"output against '{HOOK_OUT}'" in index["meta"]["summary"]
    assert sum(index["features"]["density"]) > 0
    saved = fastsae.load(run)
    assert saved.cfg.metadata["hook_name"] == HOOK_IN and saved.cfg.metadata["hook_name_out"] == HOOK_OUT

    # fastsae eval RUN: the run's model and hooks
    assert main(["eval", str(run), "--tokens", "50", "--json", str(tmp_path / "m.json")]) == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["n_tokens"] == 50 and again["transcoder"] and math.isfinite(again["kl_div_score"])
    # fastsae browse RUN: the site and its metrics panel
    assert main(["browse", str(run), "--out", str(tmp_path / "site"), "--tokens", "80", "--eval-tokens", "40"]) == 0
    capsys.readouterr()
    shown = read_index(tmp_path / "site")["meta"]["metrics"]
    assert shown["n_tokens"] == 40 and "ce_loss_score" in shown and "explained_variance" in shown
    assert (tmp_path / "site" / "index.html").is_file()

    # A saved checkpoint on its own: the hooks come from its cfg.json (hook_name, hook_name_out).
    checkpoint = saved.save(tmp_path / "tc")
    common = ["--model", str(tiny_gpt2), "--text", str(corpus), "--seq-len", "12", "--tokens", "30",
              "--activation-cache", "none", "--no-downstream"]
    assert main(["eval", str(checkpoint), *common, "--json", str(tmp_path / "c.json")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "c.json").read_text())["mse"] == pytest.approx(
        evaluate(saved, source(tiny_gpt2, corpus), max_tokens=30, downstream=False)["mse"], rel=1e-6)
    bare = SAE(saved.cfg)  # no metadata: --hook-out is asked for
    bare.cfg.metadata = {}
    assert main(["eval", str(bare.save(tmp_path / "bare")), *common]) == 2
    assert "pass --hook-out" in capsys.readouterr().err
    plain = SAE(d_in=WIDTH, d_sae=16, architecture="topk", k=2).save(tmp_path / "plain")
    assert main(["eval", str(plain), *common, "--hook-in", HOOK_IN, "--hook-out", HOOK_OUT]) == 2
    assert "--hook-out: reads a transcoder's target" in capsys.readouterr().err
