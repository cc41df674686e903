"""Compile every Triton kernel to a GPU binary (cubin) without a GPU.

The interpreter runs the kernels' logic on CPU, but not Triton's compiler: type errors in loop-
carried values, unsupported ops or a tile too big for shared memory only show up when compiling.
This compiles each kernel, for the constexpr variants and tile configurations its wrapper launches
on a GPU, for sm_90 (H100) and sm_80, with Triton's bundled ptxas, and checks that one block's
shared memory fits the architecture.

usage: python tests/triton_compile_check.py [--arch 90 80] [--quick]
Must run without TRITON_INTERPRET (the kernels are then real JIT functions).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import functools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_compile_check: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from skipkernels.triton import attention as tattn  # noqa: E402
from skipkernels.triton import layer_norm as tln  # noqa: E402
from skipkernels.triton import gemm_tiles  # noqa: E402
from skipkernels.triton import layer_norm_linear as tlnl  # noqa: E402
from skipkernels.triton import linear as tlin  # noqa: E402
from skipkernels.triton import pet_gate as tgate  # noqa: E402

FLOAT_ARGS = {"sm_scale", "eps", "s_val"}
# Most shared memory one block may use (opt-in maximum): a kernel over it compiles but cannot launch.
SHARED_LIMIT = {90: 232448, 80: 166912}
DTYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _raw(fn):
    """The JIT function behind an autotuner."""
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


def compile_kernel(fn, pointers: dict, constexprs: dict, arch: int, num_warps=4, num_stages=2):
    """Compile ``fn`` with ``pointers`` {arg: element type or None}; other args are i32 / fp32.
    Returns the shared memory (bytes) one block of it needs."""
    fn = _raw(fn)
    signature, consts = {}, dict(constexprs)
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            if pointers[name] is None:
                signature[name], consts[name] = "constexpr", None
            else:
                signature[name] = "*" + pointers[name]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    missing = set(fn.arg_names) - set(signature)
    assert not missing, missing
    src = ASTSource(fn, signature, consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    assert len(kernel.asm["cubin"]) > 0
    return kernel.metadata.shared


def _config_meta(tile):
    meta = tile.launch_meta()
    return meta, meta.pop("num_warps"), meta.pop("num_stages")


def _gemm_tiles(kernel: str, dtype: str, quick: bool):
    """Every tile a GEMM wrapper can launch in ``dtype``: the tuned candidates and the small-M
    heuristics in half precision, the one fp32 tile."""
    if dtype == "fp32":
        return [gemm_tiles.FP32_TILE]
    tiles = list(gemm_tiles.CANDIDATES[kernel]) + [t for _, t in gemm_tiles.SMALL_TILES]
    return tiles if dtype == "bf16" and not quick else tiles[:1]


@functools.lru_cache(maxsize=None)
def cases(quick: bool):
    """(label, fn, pointers, constexprs, warps, stages) for every variant a GPU launch can make."""
    out = []
    dtypes = ["bf16", "fp16", "fp32"] if not quick else ["bf16", "fp32"]

    # Attention: the tile choices of the wrappers for ViT-B/16's image (197 tokens, Dh 64), text
    # (77, causal), the pooled query and a head dim of 128.
    for dt in dtypes:
        upcast = dt == "fp32"
        base = dict(UPCAST=upcast, PRECISION="ieee")
        for lq, lk, d, causal, mask_kind, limit in [(197, 197, 64, False, 0, False),
                                                    (77, 77, 64, True, 0, False),
                                                    (77, 77, 64, False, 1, False),
                                                    (1, 77, 64, False, 0, True),
                                                    (197, 197, 128, False, 2, False)]:
            if quick and (d == 128 or mask_kind == 1):
                continue
            mask_ptr = {0: None, 1: dt, 2: "u8"}[mask_kind]
            flags = dict(CAUSAL=causal, MASK_KIND=mask_kind, HAS_LIMIT=limit, **base)
            bm, bn, bd, w, s = tattn._blocks(lq, lk, d)
            ptrs = dict(Q=dt, K=dt, V=dt, O=dt, Lse="fp32", Mask=mask_ptr,
                        KeyLimit="i64" if limit else None)
            out.append((f"attn_fwd {dt} L{lq}x{lk} d{d} c{causal:d} m{mask_kind} lim{limit:d}",
                        tattn._attn_fwd_kernel, ptrs,
                        dict(flags, STORE_LSE=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd), w, s))
            (kv_m, kv_n), (q_m, q_n), bd, w, s = tattn._bwd_blocks(lq, lk, d)
            ptrs = dict(Q=dt, K=dt, V=dt, DO=dt, Lse="fp32", Delta="fp32", DK=dt, DV=dt, DQ=dt,
                        Mask=mask_ptr, KeyLimit="i64" if limit else None)
            out.append((f"attn_bwd_dkdv {dt} L{lq}x{lk} d{d}", tattn._attn_bwd_dkdv_kernel, ptrs,
                        dict(flags, BLOCK_M=kv_m, BLOCK_N=kv_n, BLOCK_D=bd), w, s))
            out.append((f"attn_bwd_dq {dt} L{lq}x{lk} d{d}", tattn._attn_bwd_dq_kernel, ptrs,
                        dict(flags, BLOCK_M=q_m, BLOCK_N=q_n, BLOCK_D=bd), w, s))

    # GEMMs: every tile once in bf16, the first one in the other dtypes.
    for dt in dtypes:
        upcast = dt == "fp32"
        linear_configs = _gemm_tiles("linear", dt, quick)
        ln_linear_configs = _gemm_tiles("layer_norm_linear", dt, quick)
        for i, cfg in enumerate(linear_configs):
            meta, w, s = _config_meta(cfg)
            for act, res, scale, store_z in [(1, False, False, True), (0, True, True, True)]:
                out.append((f"linear {dt} cfg{i} act{act} res{res:d}", tlin._linear_kernel,
                            dict(A=dt, W=dt, Bias=dt, R=dt if res else None, Scale=dt if scale else None,
                                 C=dt, Z=dt if store_z else None),
                            dict(meta, ACT=act, HAS_BIAS=True, HAS_RES=res, HAS_SCALE=scale,
                                 STORE_Z=store_z, UPCAST=upcast, PRECISION="ieee"), w, s))
        for i, cfg in enumerate(ln_linear_configs):
            meta, w, s = _config_meta(cfg)
            for act, grad in [(1, True), (0, False)]:
                out.append((f"ln_linear {dt} cfg{i} act{act} grad{grad:d}", tlnl._ln_linear_kernel,
                            dict(A=dt, LnW=dt, LnB=dt, W=dt, Bias=dt, C=dt, Z=dt if grad and act else None,
                                 Mean="fp32" if grad else None, Rstd="fp32" if grad else None),
                            dict(meta, ACT=act, HAS_LN_W=True, HAS_LN_B=True, HAS_BIAS=True,
                                 STORE_Z=grad and act != 0, STORE_STATS=grad, UPCAST=upcast,
                                 PRECISION="ieee"), w, s))
        if dt != "fp32":
            # Under autocast (the training default on a GPU) the residual stream, LN parameters
            # and LayerScale stay fp32 while the GEMM operands are half: mixed-dtype variants.
            meta, w, s = _config_meta(ln_linear_configs[0])
            out.append((f"ln_linear autocast fp32 x {dt}", tlnl._ln_linear_kernel,
                        dict(A="fp32", LnW="fp32", LnB="fp32", W=dt, Bias=dt, C=dt, Z=dt, Mean="fp32",
                             Rstd="fp32"),
                        dict(meta, ACT=1, HAS_LN_W=True, HAS_LN_B=True, HAS_BIAS=True, STORE_Z=True,
                             STORE_STATS=True, UPCAST=False, PRECISION="ieee"), w, s))
            meta, w, s = _config_meta(linear_configs[0])
            out.append((f"linear_residual autocast {dt} + fp32 residual", tlin._linear_kernel,
                        dict(A=dt, W=dt, Bias=dt, R="fp32", Scale="fp32", C="fp32", Z=dt),
                        dict(meta, ACT=0, HAS_BIAS=True, HAS_RES=True, HAS_SCALE=True, STORE_Z=True,
                             UPCAST=False, PRECISION="ieee"), w, s))
            bm, bn, w = tln._config(768)
            out.append((f"ln_bwd autocast {dt} grad into fp32", tln._ln_bwd_kernel,
                        dict(DY="fp32", S="fp32", W="fp32", Mean="fp32", Rstd="fp32", DX="fp32",
                             DWp="fp32", DBp="fp32"),
                        dict(HAS_W=True, NEED_DW=True, NEED_DB=True, BLOCK_M=bm, BLOCK_N=bn), w, 2))
        out.append((f"act_bwd {dt}", tlin._act_bwd_kernel, dict(G=dt, Z=dt, DZ=dt),
                    dict(ACT=1, BLOCK=1024), 4, 2))
        out.append((f"act_fwd {dt}", tlin._act_fwd_kernel, dict(Z=dt, OUT=dt), dict(ACT=1, BLOCK=1024), 4, 2))

        # LayerNorm at both ViT widths.
        for width in (768, 512):
            bm, bn, w = tln._config(width)
            out.append((f"ln_fwd {dt} D{width}", tln._ln_fwd_kernel,
                        dict(X=dt, Y=dt, W=dt, B=dt, Mean="fp32", Rstd="fp32"),
                        dict(HAS_W=True, HAS_B=True, GIVEN_STATS=False, BLOCK_M=bm,
                             BLOCK_N=bn), w, 2))
            out.append((f"ln_normalize_with_stats {dt} D{width}", tln._ln_fwd_kernel,
                        dict(X=dt, Y=dt, W=dt, B=dt, Mean="fp32", Rstd="fp32"),
                        dict(HAS_W=True, HAS_B=True, GIVEN_STATS=True, BLOCK_M=bm,
                             BLOCK_N=bn), w, 2))
            out.append((f"ln_bwd {dt} D{width}", tln._ln_bwd_kernel,
                        dict(DY=dt, S=dt, W=dt, Mean="fp32", Rstd="fp32", DX=dt, DWp="fp32",
                             DBp="fp32"),
                        dict(HAS_W=True, NEED_DW=True, NEED_DB=True, BLOCK_M=bm,
                             BLOCK_N=bn), w, 2))

        # VL-PET gate.
        bm, bd = tgate._blocks(4 * 197, 768)
        out.append((f"gate_fwd {dt}", tgate._gate_fwd_kernel,
                    dict(X=dt, H=dt, DH=dt, G=dt, S=dt, OUT=dt),
                    dict(HAS_X=True, HAS_DH=True, S_IS_TENSOR=True, BLOCK_M=bm, BLOCK_D=bd), 4, 2))
        for mode in (0, 1, 2):
            out.append((f"gate_bwd {dt} mode{mode}", tgate._gate_bwd_kernel,
                        dict(DOUT=dt, H=dt, DH=dt, G=dt, S=dt, DU=dt, DG="fp32", DS="fp32"),
                        dict(HAS_DH=True, S_IS_TENSOR=True, NEED_DU=True, NEED_DG=True, G_MODE=mode,
                             NEED_DS=True, BLOCK_M=bm, BLOCK_D=bd), 4, 2))
    return out


def _compile_case(arch: int, quick: bool, index: int):
    """Compile case ``index`` (by position, so worker processes need not pickle kernels)."""
    label, fn, ptrs, consts, warps, stages = cases(quick)[index]
    try:
        shared = compile_kernel(fn, ptrs, consts, arch, warps, stages)
        if shared > SHARED_LIMIT[arch]:
            return f"sm_{arch} {label}: needs {shared} B of shared memory, the limit is {SHARED_LIMIT[arch]}"
        return None
    except Exception as exc:  # report every failing variant, not just the first
        return f"sm_{arch} {label}: {type(exc).__name__}: {str(exc).splitlines()[:3]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--quick", action="store_true", help="fewer dtypes and configurations")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    start = time.time()
    jobs = [(arch, args.quick, i) for arch in args.arch for i in range(len(cases(args.quick)))]
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        failures = [f for f in pool.map(_compile_case, *zip(*jobs)) if f is not None]
    for failure in failures:
        print("FAIL", failure)
    print(f"triton_compile_check: {len(jobs) - len(failures)}/{len(jobs)} kernel variants compiled for "
          f"sm_{'/sm_'.join(map(str, args.arch))} in {time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
