import os

import pytest
import torch

if not torch.cuda.is_available():
    # No GPU: the Triton kernels run in Triton's interpreter on CPU tensors. This must be set
    # before triton (or fastsae, which registers the triton backend's devices) is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests compare against float64 references: keep CPU matmuls deterministic and fast on 2 cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5, what: str = "") -> None:
    """max |out - ref| <= tol * max |ref| (relative error of the whole tensor), with shapes equal."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    scale = ref.abs().max().item() if ref.numel() else 0.0
    err = (out.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= tol * max(scale, 1e-30), f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def assert_bf16_close(out: torch.Tensor, ref: torch.Tensor, same_dtype: torch.Tensor, atol: float, what: str = ""):
    """flash-attention's rule: |out - ref| <= 2 |torch_same_dtype - ref| + atol (max over elements)."""
    err = (out.double() - ref).abs().max().item()
    base = (same_dtype.double() - ref).abs().max().item()
    assert err <= 2 * base + atol, f"{what}: error {err:.3g} > 2 * {base:.3g} + {atol:g}"


def encoder_inputs(n, d_in, d_sae, dtype=torch.float32, device=None):
    """x, enc_weight [d_sae, d_in], b_enc, b_dec, dec_norm: fresh random values, never zeros.
    On torch's default device unless `device` is given (see `backend_device`)."""
    x = torch.randn(n, d_in, dtype=dtype, device=device)
    enc = torch.randn(d_sae, d_in, dtype=dtype, device=device) / d_in**0.5
    b_enc = torch.randn(d_sae, dtype=dtype, device=device) * 0.1
    b_dec = torch.randn(d_in, dtype=dtype, device=device) * 0.1
    dec_norm = torch.rand(d_sae, dtype=dtype, device=device) + 0.5
    return x, enc, b_enc, b_dec, dec_norm


def pre_activations64(x, enc, b_enc, b_dec, dec_norm):
    """The encoder's pre-activations in float64 (b_dec and dec_norm optional)."""
    x, enc, b_enc = x.double(), enc.double(), b_enc.double()
    pre = (x - b_dec.double() if b_dec is not None else x) @ enc.T + b_enc
    return pre * dec_norm.double() if dec_norm is not None else pre


@pytest.fixture
def backend_device(request):
    """For tests parametrized over `backend`: run the test body on the device that backend serves.
    The triton backend takes CPU tensors only under Triton's interpreter (no GPU here); on a GPU
    machine its variant runs with CUDA as torch's default device, so the same assertions check
    the compiled kernels. The cuda backend serves CUDA tensors only."""
    backend = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        with torch.device("cuda"):
            yield "cuda"
    else:
        yield "cpu"


# FASTSAE_TEST_FAILURE_LOG=PATH: each failure is appended to PATH the moment it is reported (test
# id and the error's last line), so a run cut short by a time limit still leaves its failures.
# Under pytest-xdist only the controller writes (it receives every worker's reports, crashes too).
_failure_log = os.environ.get("FASTSAE_TEST_FAILURE_LOG")
_is_controller = True


def pytest_configure(config):
    global _is_controller
    _is_controller = not hasattr(config, "workerinput")


def pytest_runtest_logreport(report):
    if not (_failure_log and _is_controller and report.failed):
        return
    lines = [line for line in str(report.longrepr).splitlines() if line.strip()]
    why = lines[-1].strip() if lines else ""
    with open(_failure_log, "a") as f:
        f.write(f"FAILED ({report.when}) {report.nodeid} - {why[:300]}\n")


def pytest_terminal_summary(terminalreporter, config):
    """The random order's seed, also under -q (which hides the header pytest-randomly prints it in),
    so that a failure that depends on the order can be replayed."""
    seed = getattr(config.option, "randomly_seed", None)  # absent under -p no:randomly
    if _is_controller and isinstance(seed, int):
        terminalreporter.write_line(f"tests ran in a random order; replay it with: python3 -m pytest -q --randomly-seed={seed}")
