"""Ahead-of-time compilation of every Triton kernel, at the configurations the launchers pick on
an H100, for a GPU architecture that this machine need not have (`fastsae aot`).

Each case is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`
using the same specialisation the JIT applies at run time (16-byte aligned pointers, sizes
divisible by 16). The cubin is then inspected with the tools that ship inside Triton: ptxas -v
for registers and spills, cuobjdump -sass for HGMMA (wgmma) instructions.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import sparse_backward, sparse_decode, threshold_encode, topk_encode
from ._launch import INTERPRET

# The shapes set the sizes the runtime specialisation sees; all are multiples of 16.
_TYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64", torch.int64: "i64",
    torch.int32: "i32",
}


@dataclass
class Case:
    kernel: Callable
    config: str
    pointers: dict  # pointer argument -> element dtype
    constexprs: dict
    num_warps: int
    num_stages: int = 3
    aligned: tuple = ()  # integer arguments that are multiples of 16 at the shapes
    quick: bool = False  # part of the quick subset the test compiles
    name: str = field(init=False)

    def __post_init__(self):
        self.name = self.kernel.__name__


def _precision(dtype) -> str:
    """tl.dot's input precision as the launchers pick it with torch's defaults (`dot_precision`)."""
    return {torch.float32: "tf32x3", torch.float64: "ieee"}.get(dtype, "tf32")


def _select_case(k: int, dtype, final: bool, norm: bool = False, quick: bool = False, d_in: int = 768) -> Case:
    k_pad = 1 << (k - 1).bit_length()
    cfg = topk_encode.select_config(k_pad, dtype, d_in)
    launch = {key: cfg.pop(key) for key in ("num_warps", "num_stages")}
    const = dict(
        K=k, K_PAD=k_pad, HAS_NORM=norm, RELU=final, EVEN_K=True,
        DOT_PRECISION=_precision(dtype), UPCAST=False, **cfg,
    )
    out_v = dtype if final else torch.float32
    out_i = torch.int64 if final else torch.int32
    label = f"{_TYPES[dtype]} k={k} {'one split' if final else 'splits'}{' norm' if norm else ''} " + " ".join(
        f"{key}={val}" for key, val in cfg.items()
    )
    return Case(
        topk_encode._topk_select_kernel, label,
        dict(x_ptr=dtype, w_ptr=dtype, bias_ptr=dtype, norm_ptr=dtype, val_ptr=out_v, idx_ptr=out_i),
        const, aligned=("N", "D_IN", "n_cols"), quick=quick, **launch,
    )


def cases() -> list[Case]:
    out: list[Case] = []
    bf16 = torch.bfloat16
    # Fused encoder: k = 32 and 64 (the shapes), 128, one split (large N) and several
    # (small N, merged afterwards); fp32 (three-TF32 products).
    out.append(_select_case(32, bf16, final=False, quick=True))
    out.append(_select_case(32, bf16, final=True))
    out.append(_select_case(64, bf16, final=False))
    out.append(_select_case(64, bf16, final=True))
    out.append(_select_case(128, bf16, final=True))
    # d_in 4096: the measured 128 x 128 / 8-warp tile
    out.append(_select_case(64, bf16, final=True, d_in=4096))
    out.append(_select_case(64, bf16, final=False, d_in=4096))
    out.append(_select_case(32, bf16, final=True, norm=True))
    out.append(_select_case(32, torch.float32, final=True))
    out.append(_select_case(128, torch.float32, final=False))
    for k, splits in ((32, 8), (64, 8), (64, 2)):
        l_pad = 1 << (k * splits - 1).bit_length()
        mcfg = topk_encode.merge_config(l_pad)
        out.append(Case(
            topk_encode._topk_merge_kernel, f"bf16 k={k} splits={splits} L_PAD={l_pad} BLOCK_R={mcfg['BLOCK_R']}",
            dict(cand_val_ptr=torch.float32, cand_idx_ptr=torch.int32, val_ptr=bf16, idx_ptr=torch.int64),
            dict(K=k, L_PAD=l_pad, BLOCK_R=mcfg["BLOCK_R"]), num_warps=mcfg["num_warps"], num_stages=1,
            aligned=("N", "L"), quick=(k == 32),
        ))
    # Every input dtype the launchers accept (fp16 and fp64 too): each compiles differently
    # (fp64 has no tensor-core path; Triton 3.6 and 3.9 disagree on what tl.dot accepts there).
    out.append(_select_case(32, torch.float16, final=True))
    out.append(_select_case(32, torch.float64, final=True))
    out.append(_select_case(32, torch.float64, final=False))
    out.append(_select_case(128, torch.float64, final=True))
    for dtype in (bf16, torch.float32, torch.float64):
        ccfg = topk_encode.columns_config(dtype)
        launch = {key: ccfg.pop(key) for key in ("num_warps", "num_stages")}
        out.append(Case(
            topk_encode._encode_columns_kernel,
            f"{_TYPES[dtype]} columns " + " ".join(f"{a}={b}" for a, b in ccfg.items()),
            dict(x_ptr=dtype, w_ptr=dtype, bias_ptr=dtype, norm_ptr=dtype, out_ptr=dtype),
            dict(HAS_NORM=False, EVEN_K=True, DOT_PRECISION=_precision(dtype), UPCAST=False, **ccfg),
            aligned=("N", "D_IN", "n_cols"), quick=(dtype == bf16), **launch,
        ))
    # Threshold encode (ReLU / JumpReLU): the selection pass with and without decoder norms, fp32
    # inputs, and the gather into [N, m] (whose configuration does not depend on the shape).
    for dtype, norm in ((bf16, False), (bf16, True), (torch.float16, False), (torch.float32, False), (torch.float64, True)):
        cfg = threshold_encode.select_config(dtype)
        launch = {key: cfg.pop(key) for key in ("num_warps", "num_stages")}
        out.append(Case(
            threshold_encode._threshold_select_kernel,
            f"{_TYPES[dtype]}{' norm' if norm else ''} " + " ".join(f"{a}={b}" for a, b in cfg.items()),
            dict(x_ptr=dtype, w_ptr=dtype, bias_ptr=dtype, norm_ptr=dtype,
                 cutoff_ptr=torch.float64 if dtype == torch.float64 else torch.float32, val_ptr=dtype,
                 lat_ptr=torch.int32, count_ptr=torch.int32),
            dict(HAS_NORM=norm, EVEN_K=True, DOT_PRECISION=_precision(dtype), UPCAST=False, **cfg),
            aligned=("N", "D_IN", "n_cols"), quick=(dtype == bf16 and not norm), **launch,
        ))
    for dtype in (bf16, torch.float64):
        gcfg = threshold_encode.gather_config()
        warps = gcfg.pop("num_warps")
        out.append(Case(
            threshold_encode._threshold_gather_kernel, f"{_TYPES[dtype]} " + " ".join(f"{a}={b}" for a, b in gcfg.items()),
            dict(split_val_ptr=dtype, split_lat_ptr=torch.int32, split_count_ptr=torch.int32, val_ptr=dtype,
                 idx_ptr=torch.int64),
            dict(**gcfg), num_warps=warps, num_stages=1, aligned=("N",), quick=(dtype == bf16),
        ))
    # Sparse decode (x_hat, with norm and bias) and the encoder's grad x (neither), k = 32 / 64.
    for m, decode, dtype in ((32, True, bf16), (64, True, bf16), (64, False, bf16), (32, True, torch.float32),
                             (32, True, torch.float64)):
        cfg = sparse_decode.gather_sum_config(m)
        warps = cfg.pop("num_warps")
        out.append(Case(
            sparse_decode._gather_sum_kernel,
            f"{_TYPES[dtype]} m={m} {'decode' if decode else 'grad x'} " + " ".join(f"{a}={b}" for a, b in cfg.items()),
            dict(coef_ptr=dtype, idx_ptr=torch.int64, w_ptr=dtype, norm_ptr=dtype, bias_ptr=dtype, out_ptr=dtype),
            dict(HAS_NORM=decode, HAS_BIAS=decode, **cfg), num_warps=warps, aligned=("N", "M", "D"),
            quick=(m == 32 and dtype == bf16),
        ))
    for m, dtype in ((32, bf16), (64, bf16), (32, torch.float64)):
        cfg = sparse_decode.gather_dot_config(m)
        warps = cfg.pop("num_warps")
        out.append(Case(
            sparse_decode._gather_dot_kernel,
            f"{_TYPES[dtype]} m={m} grad values " + " ".join(f"{a}={b}" for a, b in cfg.items()),
            dict(rows_ptr=dtype, idx_ptr=torch.int64, w_ptr=dtype, norm_ptr=dtype, out_ptr=dtype),
            dict(HAS_NORM=True, **cfg), num_warps=warps, aligned=("N", "M", "D"), quick=(m == 32 and dtype == bf16),
        ))
    for sub, norm, what, dtype in ((True, False, "grad enc_weight", bf16), (False, True, "grad W_dec", bf16),
                                   (False, True, "grad W_dec", torch.float32), (True, True, "both", torch.float64)):
        cfg = sparse_backward.scatter_config()
        warps = cfg.pop("num_warps")
        out.append(Case(
            sparse_backward._scatter_outer_kernel,
            f"{_TYPES[dtype]} {what} " + " ".join(f"{a}={b}" for a, b in cfg.items()),
            dict(order_ptr=torch.int64, offsets_ptr=torch.int64, coef_ptr=dtype, rows_ptr=dtype, sub_ptr=dtype,
                 norm_ptr=dtype, out_ptr=dtype, colsum_ptr=dtype),
            dict(HAS_SUB=sub, HAS_NORM=norm, **cfg), num_warps=warps, aligned=("d_sae", "M", "D"),
            quick=(sub and not norm and dtype == bf16),
        ))
    return out


# ---------------------------------------------------------------------------- compile + inspect


def _tool(name: str, arch: int) -> str:
    """Path of a CUDA tool bundled with Triton (ptxas for sm_90+ is `ptxas-blackwell` in recent
    releases), falling back to PATH."""
    try:
        from triton import knobs

        nvidia = knobs.nvidia
        if name == "ptxas" and arch >= 90 and hasattr(nvidia, "ptxas_blackwell"):
            return nvidia.ptxas_blackwell.path
        return getattr(nvidia, name).path
    except Exception:  # older Triton: use whatever is installed
        return name


def _signature(case: Case):
    sig, attrs = {}, {}
    for i, arg in enumerate(case.kernel.arg_names):
        if arg in case.constexprs:
            sig[arg] = "constexpr"
        elif arg in case.pointers:
            sig[arg] = "*" + _TYPES[case.pointers[arg]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[arg] = "i32"
            if arg in case.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_case(case: Case, arch: int = 90) -> dict:
    """Compile one case for sm_<arch> and report its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = _signature(case)
    src = ASTSource(fn=case.kernel, signature=sig, constexprs=case.constexprs, attrs=attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=case.num_warps, num_stages=case.num_stages)
    )
    row = dict(kernel=case.name, config=f"{case.config} num_warps={case.num_warps} num_stages={case.num_stages}")
    row.update(_resources(compiled.asm["ptx"], compiled.asm["cubin"], arch))
    row["shared_bytes"] = int(compiled.metadata.shared)
    return row


def _resources(ptx: str, cubin: bytes, arch: int) -> dict:
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        cubin_path = os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        with open(cubin_path, "wb") as f:
            f.write(cubin)
        log = ""
        for extra in (["--regAllocOptLevel=2"], []):  # the flag Triton itself passes, where known
            proc = subprocess.run(
                [_tool("ptxas", arch), "-v", *extra, f"--gpu-name={gpu}", ptx_path, "-o", os.devnull],
                capture_output=True, text=True,
            )
            if proc.returncode == 0:
                log = proc.stderr
                break
        sass = subprocess.run([_tool("cuobjdump", arch), "-sass", cubin_path], capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    if regs is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{log}")
    return dict(
        registers=int(regs.group(1)),
        spills=max(spills) if spills else 0,
        uses_wgmma=("HGMMA" in sass) if sass else ("wgmma.mma_async" in ptx),
    )


def run(arch: int = 90, quick: bool = False, only: Optional[str] = None, progress: Optional[Callable] = None) -> list[dict]:
    if INTERPRET:
        raise RuntimeError("fastsae aot: TRITON_INTERPRET=1 is set; unset it (the interpreter cannot compile kernels)")
    rows = []
    for case in cases():
        if quick and not case.quick:
            continue
        if only and only not in case.name:
            continue
        row = compile_case(case, arch)
        rows.append(row)
        if progress:
            progress(row)
    return rows
