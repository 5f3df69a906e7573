"""Compile every flash_attention kernel for a GPU architecture without a GPU, and report what the
compiler says about each: registers per thread, spilled bytes, shared memory, and whether the matrix
products became Hopper wgmma (HGMMA in the machine code) or the older mma (HMMA).

    python bench/compile_check.py               # sm_90 (H100), bf16, the configs in flash_attention.py
    python bench/compile_check.py --arch 80     # sm_80 (A100)

It catches, on a machine without a GPU, what the interpreter cannot: code that does not compile,
block sizes that do not fit in shared memory, register spills. It says nothing about speed.
Uses Triton's bundled ptxas and cuobjdump.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import flash_attention as fa  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # per block, opt-in


def signature(kernel, pointer_types, constexprs):
    """Triton signature: the named pointers typed, everything else i32 but the fp32 scales."""
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = "*" + pointer_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # H·D with D >= 16
    return sig, attrs


def cuobjdump():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def inspect(compiled):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump(), "--dump-sass", path], capture_output=True, text=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    spill = sum(int(x) for x in re.findall(r"(?:STACK|LOCAL):(\d+)", usage))
    mma = "HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else "none")
    return regs, spill, mma


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (default 90: H100)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    dt = args.dtype
    torch_dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[dt]
    precision = "ieee" if dt == "fp32" else "tf32"

    kernels = {
        "fwd": (fa._fwd_kernel, dict(Q=dt, K=dt, V=dt, O=dt, LSE="fp32", DOC_START="i32")),
        "dkdv": (fa._bwd_dkdv_kernel, dict(Q=dt, K=dt, V=dt, DO=dt, LSE="fp32", DELTA="fp32", DK=dt,
                                           DV=dt, DOC_START="i32", Q_END="i32")),
        "dq": (fa._bwd_dq_kernel, dict(Q=dt, K=dt, V=dt, DO=dt, LSE="fp32", DELTA="fp32", DQ=dt,
                                       DOC_START="i32")),
    }
    limit = SHARED_LIMIT.get(args.arch, 99 * 1024)
    print(f"sm_{args.arch}, {dt}, triton {triton.__version__}; shared memory limit {limit // 1024} KiB")
    print(f"{'kernel':>6} {'d':>4} {'masks':>11} {'BM':>4} {'BN':>4} {'warps':>5} {'stages':>6} "
          f"{'regs':>5} {'spill B':>7} {'smem KiB':>8} {'mma':>6}")
    ok = True
    for D in fa.HEAD_DIMS:
        for name, (kernel, pointers) in kernels.items():
            BM, BN, warps, stages = fa._config(D, torch_dtype)[name]
            for has_window, has_docs in ((False, False), (True, False), (False, True), (True, True)):
                constexprs = dict(HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, HAS_WINDOW=has_window,
                                  HAS_DOCS=has_docs, PRECISION=precision)
                sig, attrs = signature(kernel, pointers, constexprs)
                src = ASTSource(kernel, sig, constexprs, attrs)
                masks = "+".join(n for n, f in (("window", has_window), ("docs", has_docs)) if f) or "causal"
                try:
                    compiled = triton.compile(src, target=target,
                                              options=dict(num_warps=warps, num_stages=stages))
                except Exception as e:
                    ok = False
                    print(f"{name:>6} {D:>4} {masks:>11}  FAILED: {str(e)[:1500]}")
                    continue
                regs, spill, mma = inspect(compiled)
                shared = compiled.metadata.shared
                flag = "" if shared <= limit and spill == 0 else "  <-- over the limit or spilling"
                ok &= shared <= limit
                print(f"{name:>6} {D:>4} {masks:>11} {BM:>4} {BN:>4} {warps:>5} {stages:>6} {regs:>5} "
                      f"{spill:>7} {shared / 1024:>8.1f} {mma:>6}{flag}", flush=True)
    print("compile check:", "PASS" if ok else "FAIL")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
