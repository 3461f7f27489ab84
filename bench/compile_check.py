"""Compile the Triton kernels for Hopper (sm_90) ahead of time, with no GPU: catches what the interpreter does not.

    python -m bench.compile_check [--quick] [--arch 90]

The CPU interpreter runs kernels as numpy and accepts code that real Triton refuses (a plain Python
global inside a kernel, an unsupported dtype mix in tl.dot, a block below the MMA minimum, too much
shared memory). This script builds each kernel of `kernels/paged_attention.py` through Triton's real
compiler down to a cubin (Triton ships ptxas) for the configurations the GPU path launches (bf16,
fp16, and fp32 with --fp32; head_dim 64 and 128; splits, window, soft-capping) and prints the shared memory each
needs, then the LoRA shrink/expand kernels at their decode configs (bf16, split-K atomics) and at the edges of
bench/tune_lora.py's sweep (BLOCK_K 256 with 8 warps and 2 stages, BLOCK_N 256 with 2 and 8 warps). Run it in a
process without TRITON_INTERPRET (it refuses otherwise).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one bf16 decode config (and its split-KV reduce)")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = Hopper)")
    ap.add_argument("--fp32", action="store_true", help="also fp32 ('ieee' dots: minutes per kernel to compile)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter replaces the compiler)")

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import paged_attention as pa

    target = GPUTarget("cuda", args.arch, 32)
    cuda = torch.device("cuda")  # only its .type is read by the config tables

    def build(fn: Any, types: dict[str, str], consts: dict[str, Any], num_warps: int, num_stages: int = 3) -> None:
        sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
        t0 = time.perf_counter()
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target,
                           options=dict(num_warps=num_warps, num_stages=num_stages))
        shown = {key: consts[key] for key in ("HEAD_DIM", "NUM_SPLITS", "USE_WINDOW", "SOFTCAP", "PRECISION")
                 if key in consts}
        if "BLOCK_R" in consts:  # the LoRA kernels: their tile sizes and split-K / fixed-shape flags
            shown = {key: v for key, v in consts.items() if key in ("ATOMIC", "FIXED", "BLOCK_N", "BLOCK_K")}
        first_ptr = next(t for t in types.values() if t.startswith("*"))
        print(f"{fn.__name__:<22} {first_ptr:<6} {shown} w{num_warps}/s{num_stages} ok "
              f"({time.perf_counter() - t0:.1f}s, shared {k.metadata.shared} B)")

    dtypes = ["bf16"] if args.quick else ["bf16", "fp16"] + (["fp32"] if args.fp32 else [])
    n = 0
    for dt in dtypes:
        p = "*" + dt
        prec = "ieee" if dt == "fp32" else "tf32"
        seq = dict(bt_ptr="*i32", qs_ptr="*i32", ctx_ptr="*i32", pre_ptr="*i32", scale="fp32", window="i32",
                   stride_qt="i32", stride_qh="i32", stride_ks="i32", stride_kh="i32", stride_bt="i32",
                   stride_ot="i32", stride_oh="i32")
        dec = dict(q_ptr=p, k_ptr=p, v_ptr=p, out_ptr=p, ws_acc_ptr="*fp32", ws_ml_ptr="*fp32", num_heads="i32",
                   **seq)
        variants = [(128, 8, True, 30.0)] if args.quick else [(128, 1, False, 0.0), (128, 8, True, 30.0),
                                                              (64, 4, False, 0.0)]
        for hd, splits, win, cap in variants:
            block_n, warps = pa.decode_config(cuda, hd)
            build(pa._decode_kernel, dec, dict(GROUP=4, HEAD_DIM=hd, BS=16, BLOCK_H=16, BLOCK_N=block_n, BLOCK_D=hd,
                                               NUM_SPLITS=splits, USE_WINDOW=win, SOFTCAP=cap, PRECISION=prec),
                  warps)
            n += 1
            if splits > 1:
                red = dict(out_ptr=p, ws_acc_ptr="*fp32", ws_ml_ptr="*fp32", qs_ptr="*i32", stride_ot="i32",
                           stride_oh="i32", num_heads="i32")
                build(pa._decode_reduce_kernel, red, dict(HEAD_DIM=hd, BLOCK_D=hd, NUM_SPLITS=splits), 2)
                n += 1
        if args.quick:
            continue
        pre = dict(q_ptr=p, k_ptr=p, v_ptr=p, out_ptr=p, ql_ptr="*i32", **seq)
        for hd, win, cap in ((128, False, 0.0), (64, True, 50.0)):
            block_m, block_n, warps, stages = pa.prefill_config(cuda, hd)
            build(pa._prefill_kernel, pre, dict(GROUP=4, HEAD_DIM=hd, BS=16, BLOCK_M=block_m, BLOCK_N=block_n,
                                                BLOCK_D=hd, USE_WINDOW=win, SOFTCAP=cap, PRECISION=prec),
                  warps, stages)
            n += 1
    if not args.quick:
        n += lora_kernels(build)
    print(f"compile_check: {n} kernels compiled for sm_{args.arch}")
    return 0


def _types(fn: Any, ptrs: dict[str, str], consts: dict[str, Any]) -> dict[str, str]:
    """Every runtime argument of `fn`: the named pointers' types, i32 for the rest (strides, sizes)."""
    return {n: ptrs.get(n, "i32") for n in fn.arg_names if n not in consts}


def lora_kernels(build: Any) -> int:
    """The mixed-LoRA shrink/expand kernels: the eager tile-list launches and the fixed-shape (capturable)
    ones of `kernels/capturable.py`, at their decode configs."""
    from kernels import triton_expand as expand
    from kernels import triton_shrink as shrink

    n = 0
    for dt in ("bf16", "fp16"):
        p = "*" + dt
        for fixed in (False, True):
            for atomic in (False, True):  # split-K partial sums meet in an fp32 buffer through atomics
                consts = dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=128, ATOMIC=atomic, PRECISION="tf32", FIXED=fixed)
                ptrs = dict(x_ptr=p, a_ptr=p, out_ptr="*fp32" if atomic or fixed else p, tok_ptr="*i64",
                            tiles_ptr="*i32", pages_ptr="*i32", ranks_ptr="*i32")
                build(shrink._shrink_kernel, _types(shrink._shrink_kernel, ptrs, consts), consts, 4)
                n += 1
            consts = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, PRECISION="tf32", FIXED=fixed)
            ptrs = dict(h_ptr="*fp32" if fixed else p, b_ptr=p, y_ptr=p, tok_ptr="*i64", tiles_ptr="*i32",
                        scales_ptr="*fp32", pages_ptr="*i32", ranks_ptr="*i32")
            build(expand._expand_kernel, _types(expand._expand_kernel, ptrs, consts), consts, 4)
            n += 1
    n += extra_kernels(build)
    return n


def extra_kernels(build: Any) -> int:
    """The fused q/k/v (gate/up) launches of `kernels/fused_lora.py` (per-module pointers picked by program id)."""
    from kernels import fused_lora as fused

    n = 0
    for dt in ("bf16", "fp16"):
        p = "*" + dt
        for atomic in (False, True):
            consts = dict(NUM_MODULES=3, BLOCK_M=16, BLOCK_R=16, BLOCK_K=128, ATOMIC=atomic, PRECISION="tf32")
            ptrs = dict(x_ptr=p, tok_ptr="*i64", tiles_ptr="*i32", h_ptr="*fp32",
                        **{f"a{i}_ptr": p for i in range(3)}, **{f"p{i}_ptr": "*i32" for i in range(3)},
                        **{f"r{i}_ptr": "*i32" for i in range(3)})
            build(fused._fused_shrink_kernel, _types(fused._fused_shrink_kernel, ptrs, consts), consts, 4)
            n += 1
        consts = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, PRECISION="tf32")
        ptrs = dict(h_ptr="*fp32", tok_ptr="*i64", tiles_ptr="*i32", **{f"b{i}_ptr": p for i in range(3)},
                    **{f"y{i}_ptr": p for i in range(3)}, **{f"p{i}_ptr": "*i32" for i in range(3)},
                    **{f"r{i}_ptr": "*i32" for i in range(3)}, **{f"c{i}_ptr": "*fp32" for i in range(3)})
        build(fused._fused_expand_kernel, _types(fused._fused_expand_kernel, ptrs, consts), consts, 4)
        n += 1
    n += tuned_kernels(build)
    return n


def tuned_kernels(build: Any) -> int:
    """The edges of bench/tune_lora.py's sweep (LaunchConfig overrides) in bf16: the widest shrink K block with
    8 warps and 2 stages (split-K atomics), the widest expand N block with 2 and 8 warps."""
    from kernels import fused_lora as fused

    p = "*bf16"
    consts = dict(NUM_MODULES=3, BLOCK_M=16, BLOCK_R=16, BLOCK_K=256, ATOMIC=True, PRECISION="tf32")
    ptrs = dict(x_ptr=p, tok_ptr="*i64", tiles_ptr="*i32", h_ptr="*fp32", **{f"a{i}_ptr": p for i in range(3)},
                **{f"p{i}_ptr": "*i32" for i in range(3)}, **{f"r{i}_ptr": "*i32" for i in range(3)})
    build(fused._fused_shrink_kernel, _types(fused._fused_shrink_kernel, ptrs, consts), consts, 8, 2)
    ptrs = dict(h_ptr="*fp32", tok_ptr="*i64", tiles_ptr="*i32", **{f"b{i}_ptr": p for i in range(3)},
                **{f"y{i}_ptr": p for i in range(3)}, **{f"p{i}_ptr": "*i32" for i in range(3)},
                **{f"r{i}_ptr": "*i32" for i in range(3)}, **{f"c{i}_ptr": "*fp32" for i in range(3)})
    for warps in (2, 8):
        consts = dict(BLOCK_M=16, BLOCK_N=256, BLOCK_R=16, PRECISION="tf32")
        build(fused._fused_expand_kernel, _types(fused._fused_expand_kernel, ptrs, consts), consts, warps)
    return 3


if __name__ == "__main__":
    sys.exit(main())
