"""The `cpp` backend: fastsae's C++ CPU kernels (csrc/), compiled on first use.

Importing this module builds (or loads from the cache) the `fastsae_cpp` extension with
`torch.utils.cpp_extension.load` and ninja, registers fake implementations for its ops (the
fastsae:: ops' own, from their files) and exposes the op functions with `fastsae.reference`'s
signatures. If the build fails (no compiler, no ninja) the import raises ImportError with the
reason, and `dispatch` reports it in one warning and uses the torch path.

The build is cached in `$FASTSAE_BUILD_DIR`, else `$TORCH_EXTENSIONS_DIR/fastsae`, else
`~/.cache/fastsae/extensions` (respecting XDG_CACHE_HOME), in a subfolder named by the Python,
torch and CUDA versions and the CPU (the kernels are compiled with -march=native). ninja only
recompiles sources that changed. On a machine with a CUDA device and a CUDA toolkit (CUDA_HOME),
the same extension also carries the CUDA kernels that `fastsae.ops.backend_cuda` uses.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from fastsae.ops.sparse_decoder import fake_sparse_decode, fake_sparse_decode_backward
from fastsae.ops.threshold_encoder import fake_threshold_encode
from fastsae.ops.topk_encoder import fake_topk_encode, fake_topk_encode_backward

EXTENSION_NAME = "fastsae_cpp"
CPU_SOURCES = ("schema.cpp", "topk_encode_cpu.cpp", "threshold_encode_cpu.cpp", "sparse_decode_cpu.cpp")
CUDA_SOURCES = ("cuda_binding.cpp", "topk_encode_cuda.cu", "sparse_rows_cuda.cu")


def source_dir() -> Path:
    """csrc/: inside the installed package (fastsae/csrc) or beside it in a source checkout."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    raise ImportError(f"fastsae's C++ sources (csrc/{CPU_SOURCES[0]}) are not in {package} or {package.parent}")


def _cpu_tag() -> str:
    """A short hash of the CPU model and flags: a cached -march=native build never runs on
    another kind of CPU (home directories shared across machines)."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _with_cuda() -> bool:
    """Build the CUDA kernels too: a CUDA device, torch built with CUDA, a toolkit (CUDA_HOME),
    unless FASTSAE_BUILD_CUDA=0."""
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("FASTSAE_BUILD_CUDA", "1") == "0":
        return False
    return bool(torch.cuda.is_available() and torch.version.cuda and CUDA_HOME)


def build_directory(with_cuda: bool) -> Path:
    base = os.environ.get("FASTSAE_BUILD_DIR")
    if base:
        root = Path(base)
    elif os.environ.get("TORCH_EXTENSIONS_DIR"):
        root = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "fastsae"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastsae" / "extensions"
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if with_cuda else "cpu"
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__.split('+')[0]}-{cuda}-{_cpu_tag()}"
    return root / tag


def _build_flags() -> tuple[list[str], list[str], list[str]]:
    cflags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    if platform.machine() in ("x86_64", "AMD64") and sys.platform.startswith("linux"):
        cflags.append("-march=native")  # built where it runs; the build folder is keyed by CPU
    ldflags = ["-fopenmp"]
    cuda_flags = ["-O3", "-lineinfo"]
    return cflags, ldflags, cuda_flags


def _compiler() -> str:
    """The C++ compiler cpp_extension will call (CXX, else c++), or ImportError if there is none."""
    name = os.environ.get("CXX", "c++")
    if shutil.which(name) is None:
        raise ImportError(f"no C++ compiler to build fastsae's C++ kernels: {name!r} is not on PATH (set CXX)")
    return name


def _build(with_cuda: bool) -> None:
    from torch.utils import cpp_extension

    src = source_dir()
    sources = [str(src / name) for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    build_dir = build_directory(with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / f"{EXTENSION_NAME}.so").exists():
        what = "C++ and CUDA kernels" if with_cuda else "C++ kernels"
        print(f"fastsae: compiling the {what} into {build_dir} (first use; about a minute)", file=sys.stderr)
    cflags, ldflags, cuda_flags = _build_flags()
    try:
        cpp_extension.load(
            name=EXTENSION_NAME,
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=ldflags,
            extra_cuda_cflags=cuda_flags,
            extra_include_paths=[str(src)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=os.environ.get("FASTSAE_BUILD_VERBOSE", "") not in ("", "0"),
        )
    except Exception as exc:  # noqa: BLE001  (compile error, ninja missing, ...)
        log = build_dir / "build-error.log"
        log.write_text(str(exc))
        errors = [line.strip() for line in str(exc).splitlines() if "error" in line.lower() or "not found" in line]
        summary = "; ".join(errors[:3]) or str(exc).strip().splitlines()[-1]
        raise ImportError(f"could not build fastsae's C++ extension: {summary} (full output in {log})") from exc


CUDA_BUILD_ERROR: Optional[str] = None  # why the CUDA kernels are missing, when their build failed


def _load_extension() -> bool:
    """Build (or load from the cache) the extension; returns whether it has the CUDA kernels.
    If the build with CUDA fails, the CPU kernels are built alone (the cpp backend stays)."""
    global CUDA_BUILD_ERROR
    _compiler()
    if _with_cuda():
        try:
            _build(with_cuda=True)
            return True
        except ImportError as exc:
            CUDA_BUILD_ERROR = str(exc)
    _build(with_cuda=False)
    return False


HAS_CUDA_KERNELS = _load_extension()

_ops = torch.ops.fastsae_cpp


# ------------------------------------------------------------------ fake (meta) implementations

# The kernel ops take the fastsae:: ops' arguments (less check_indices) and return their
# outputs: the same fakes serve, without the checks (the kernels check at run time).
for _name, _fake in (
    ("topk_encode", fake_topk_encode),
    ("topk_encode_backward", fake_topk_encode_backward),
    ("threshold_encode", fake_threshold_encode),
    ("sparse_decode", fake_sparse_decode),
    ("sparse_decode_backward", fake_sparse_decode_backward),
):
    torch.library.register_fake(f"fastsae_cpp::{_name}", _fake)


def _writes_its_buffers(*args, **buffers) -> None:
    """The fake of an `_out` form: it only writes the buffers it is given."""
    return None


for _name in ("topk_encode_out", "topk_encode_backward_out", "sparse_decode_out", "sparse_decode_backward_out"):
    torch.library.register_fake(f"fastsae_cpp::{_name}", _writes_its_buffers)


# ------------------------------------------------------------------ the backend's op functions


def topk_encode(
    x: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    k: int,
    aux_latents: Optional[Tensor],
    k_aux: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_ops.topk_encode(x, enc_weight, b_enc, b_dec, dec_norm, k, aux_latents, k_aux))


def topk_encode_backward(
    grad_pre: Tensor, indices: Tensor, x: Tensor, enc_weight: Tensor, b_dec: Optional[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(_ops.topk_encode_backward(grad_pre, indices, x, enc_weight, b_dec))


def sparse_decode(
    values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor], dec_norm: Optional[Tensor]
) -> Tensor:
    return _ops.sparse_decode(values, indices, W_dec, b_dec, dec_norm)


def sparse_decode_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, dec_norm: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    return tuple(_ops.sparse_decode_backward(grad_out, values, indices, W_dec, dec_norm))


def threshold_encode(
    x: Tensor,
    enc_weight: Tensor,
    b_enc: Tensor,
    b_dec: Optional[Tensor],
    dec_norm: Optional[Tensor],
    cutoff: Tensor,
    max_width: int,
) -> tuple[Tensor, Tensor, Tensor]:
    # The kernel compares in its accumulation type (fp32, fp64 for fp64 x); fastsae.ops already
    # converts, this covers direct backend calls.
    cutoff = cutoff.to(torch.promote_types(x.dtype, torch.float32)).contiguous()
    return tuple(_ops.threshold_encode(x, enc_weight, b_enc, b_dec, dec_norm, cutoff, max_width))
