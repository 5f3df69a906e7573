"""Benchmark and GPU checks for flash_attention.py against PyTorch's scaled_dot_product_attention.

    python bench/attention.py            # the speed table (bf16, GQA 32q/8kv)
    python bench/attention.py --check    # bf16 error vs an fp32 reference, ours and SDPA's
    python bench/attention.py --sweep    # time candidate block sizes (to choose flash_attention._GPU_CONFIGS)
    sh bench/gpu_checks.sh               # every GPU check (--check and the table first), in one go
    python bench/attention.py --smoke    # any of the above on tiny shapes on the CPU (Triton interpreter,
                                         # fp16): tests this script, not the kernel; its timings mean nothing

Speed: TFLOP/s counts only useful work: 4·B·Hq·D per visible (query, key) pair forward (so half of
4·B·Hq·N²·D for causal, the in-window pairs for a window, the in-document pairs for packed
documents) and 2.5× that backward. The ratio columns are SDPA's time over ours (> 1: we are faster),
every baseline measured in the same run on the same inputs. SDPA's flash and cuDNN backends take no
window or document mask: for those rows they run plain causal attention (a superset of the work),
and the `mask` column is SDPA given the equivalent dense boolean mask (which picks its
memory-efficient kernel). Times are medians of triton.testing.do_bench.
"""

import argparse
import os
import sys
import time

SMOKE = "--smoke" in sys.argv  # read before triton is imported: the interpreter is chosen at import
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
import torch  # noqa: E402
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import triton  # noqa: E402
import flash_attention as fa  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
DTYPE = torch.float16 if SMOKE else torch.bfloat16  # numpy (the interpreter) has no bfloat16
HQ, HKV = (4, 1) if SMOKE else (32, 8)


# ----------------------------------------------------------------------------------------- inputs

def doc_start_of(lengths, device):
    starts = torch.tensor([0] + list(lengths[:-1])).cumsum(0)
    return torch.repeat_interleave(starts, torch.tensor(lengths)).to(device, torch.int32)[None]


def uneven_lengths(total, n_docs, seed=0):
    """n_docs document lengths summing to total, between ~0.25x and ~1.75x the mean."""
    g = torch.Generator().manual_seed(seed)
    w = 0.25 + 1.5 * torch.rand(n_docs, generator=g)
    lengths = (w / w.sum() * total).long()
    lengths[-1] += total - lengths.sum()
    return lengths.tolist()


def visible(T, device, doc_start=None, window=None, rows=slice(None)):
    """Boolean (rows, T) mask: query t sees key s."""
    t = torch.arange(T, device=device)[rows][:, None]
    s = torch.arange(T, device=device)[None, :]
    ok = s <= t
    if window is not None:
        ok &= t - s < window
    if doc_start is not None:
        ok &= s >= doc_start[0, rows][:, None]
    return ok


def visible_pairs(T, doc_start=None, window=None):
    """Number of (query, key) pairs attention computes, per batch row and head."""
    t = torch.arange(T, dtype=torch.int64)
    first = torch.zeros(T, dtype=torch.int64)
    if window is not None:
        first = torch.maximum(first, t - window + 1)
    if doc_start is not None:
        first = torch.maximum(first, doc_start[0].cpu().long())
    return int((t - first + 1).sum())


def make_inputs(B, T, D, hq=HQ, hkv=HKV, dtype=DTYPE, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(B, hq, T, D, device=DEVICE, dtype=dtype, generator=g)
    k = torch.randn(B, hkv, T, D, device=DEVICE, dtype=dtype, generator=g)
    v = torch.randn(B, hkv, T, D, device=DEVICE, dtype=dtype, generator=g)
    do = torch.randn(B, hq, T, D, device=DEVICE, dtype=dtype, generator=g)
    return [x.requires_grad_() for x in (q, k, v)], do


# ---------------------------------------------------------------------------------- the contenders

def ours(doc_start=None, window=None):
    return lambda q, k, v: fa.flash_attention(q, k, v, doc_start=doc_start, window=window)


def sdpa(backend, mask=None, expand=False):
    """SDPA under one backend, causal or with a boolean mask. GQA through enable_gqa=True, or, for
    a backend that refuses it, by expanding K and V to Hq heads inside the timed call (what a model
    without enable_gqa pays: the copy forward and the sum over copies backward)."""
    def fn(q, k, v):
        if expand:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                  enable_gqa=not expand)
    return fn


def runs(fn, q, k, v, do):
    """fn works on these inputs (some backends refuse some shapes): run fwd+bwd once."""
    try:
        o = fn(q, k, v)
        torch.autograd.grad(o, (q, k, v), do)
        synchronize()
        return True
    except Exception as e:  # RuntimeError ("no available kernel"), NotImplementedError, ...
        print(f"    (skipped: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        return False


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free_memory():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def once_ms(f):
    """--smoke: one timed call (after a warm one); the interpreter's times say nothing about speed."""
    f()
    t0 = time.perf_counter()
    f()
    return (time.perf_counter() - t0) * 1e3


def time_ms(fn, q, k, v, do):
    """Median ms of forward, backward, forward+backward."""
    bench = once_ms if SMOKE else (
        lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median"))  # noqa: E731
    fwd = bench(lambda: fn(q, k, v))
    o = fn(q, k, v)
    bwd = bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    both = bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
    return fwd, bwd, both


# ----------------------------------------------------------------------------------------- table

def cases():
    if SMOKE:
        for D in (16,):
            yield dict(name="causal", D=D, T=64, B=1)
            yield dict(name="window 16", D=D, T=64, B=1, window=16)
            yield dict(name="4 docs", D=D, T=64, B=1, docs=uneven_lengths(64, 4))
        return
    for D in (64, 128):
        for T in (1024, 4096, 16384):
            yield dict(name="causal", D=D, T=T, B=16384 // T)
        yield dict(name="window 4096", D=D, T=16384, B=1, window=4096)
        yield dict(name="16 docs", D=D, T=16384, B=1, docs=uneven_lengths(16384, 16))


TABLE_COLUMNS = (("case", 11), ("d", 3), ("N", 5), ("B", 2), ("fwd", 5), ("bwd", 5), ("fwd+bwd", 7),
                 ("vs flash", 14), ("vs cudnn", 14), ("vs mask", 14), ("", 0))


def print_row(cells):
    print("  ".join(f"{str(x):>{w}}" for x, (_, w) in zip(cells, TABLE_COLUMNS)), flush=True)


def table():
    """The speed table, printed a row at a time as each case is measured (a run stopped early keeps
    what it measured)."""
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU, Triton interpreter (smoke run)"
    print(f"{device}, {str(DTYPE).removeprefix('torch.')}, GQA {HQ}q/{HKV}kv, torch {torch.__version__}, "
          f"triton {triton.__version__}. TFLOP/s of useful work; SDPA columns: SDPA time / our "
          f"time as fwd/bwd/fwd+bwd (>1: ours faster). flash/cudnn run plain causal (no window or "
          f"docs); mask = SDPA (efficient backend) with the dense boolean mask. GQA for SDPA: "
          f"enable_gqa=True, or * = K/V expanded to {HQ} heads inside the timed call.")
    print_row([name for name, _ in TABLE_COLUMNS])
    causal_time = {}
    longest = max(c["T"] for c in cases())                 # the window rows compare with causal at this length
    for c in cases():
        B, T, D = c["B"], c["T"], c["D"]
        (q, k, v), do = make_inputs(B, T, D)
        doc_start = doc_start_of(c["docs"], DEVICE).expand(B, T) if "docs" in c else None
        window = c.get("window")
        pairs = visible_pairs(T, doc_start, window)
        fwd_flop = 4 * B * HQ * D * pairs
        contenders_args = {"flash": (SDPBackend.FLASH_ATTENTION,), "cudnn": (SDPBackend.CUDNN_ATTENTION,)}
        if doc_start is not None or window is not None:
            mask = visible(T, DEVICE, doc_start, window)[None, None]  # (1, 1, T, T) bool
            contenders_args["mask"] = (SDPBackend.EFFICIENT_ATTENTION, mask)
        contenders = {"ours": ours(doc_start, window)}
        contenders.update({name: sdpa(*a) for name, a in contenders_args.items()})
        print(f"measuring {c['name']} d{D} N={T} B={B}", file=sys.stderr, flush=True)
        times, expanded = {}, []
        for name, fn in contenders.items():
            if name != "ours" and not runs(fn, q, k, v, do):  # retry with K, V expanded
                fn = sdpa(*contenders_args[name], expand=True)
                expanded.append(name)
                if not runs(fn, q, k, v, do):
                    continue
            times[name] = time_ms(fn, q, k, v, do)
        ours_t = times["ours"]
        if c["name"] == "causal" and T == longest:
            causal_time[D] = ours_t[2]
        tflops = [fwd_flop * m / (t * 1e-3) / 1e12 for m, t in zip((1, 2.5, 3.5), ours_t)]
        ratio = {n: "/".join(f"{s / o:.2f}" for s, o in zip(times[n], ours_t)) if n in times else "-"
                 for n in ("flash", "cudnn", "mask")}
        ratio = {n: r + ("*" if n in expanded and n in times else "") for n, r in ratio.items()}
        note = ""
        if window is not None and D in causal_time:
            note = f"{ours_t[2] / causal_time[D]:.2f}x our causal"
        print_row([c["name"], D, T, B, *(f"{x:.0f}" for x in tflops), ratio["flash"], ratio["cudnn"], ratio["mask"],
                   note])
        del q, k, v, do
        free_memory()


# ------------------------------------------------------------------------------------ correctness

def reference_fp32(q, k, v, do, doc_start=None, window=None, chunk=1024):
    """fp32 attention and its gradients, exact fp32 matmuls, computed a block of query rows at a
    time so a 16k×16k score matrix never exists whole."""
    q, k, v, do = (x.detach().float() for x in (q, k, v, do))
    B, H, T, D = q.shape
    G = H // k.shape[1]
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scale = D ** -0.5
    o, dq = torch.empty_like(q), torch.empty_like(q)
    dkr, dvr = torch.zeros_like(kr), torch.zeros_like(vr)
    for a in range(0, T, chunk):
        b = min(a + chunk, T)  # causal: rows [a, b) see keys [0, b)
        mask = visible(T, q.device, doc_start, window, slice(a, b))[:, :b]
        s = (q[:, :, a:b] @ kr[:, :, :b].transpose(-1, -2)) * scale
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
        o[:, :, a:b] = p @ vr[:, :, :b]
        dp = do[:, :, a:b] @ vr[:, :, :b].transpose(-1, -2)
        delta = (do[:, :, a:b] * o[:, :, a:b]).sum(-1, keepdim=True)
        ds = p * (dp - delta)
        dq[:, :, a:b] = (ds @ kr[:, :, :b]) * scale
        dkr[:, :, :b] += (ds.transpose(-1, -2) @ q[:, :, a:b]) * scale
        dvr[:, :, :b] += p.transpose(-1, -2) @ do[:, :, a:b]
    dk = dkr.view(B, -1, G, T, D).sum(2)
    dv = dvr.view(B, -1, G, T, D).sum(2)
    return o, dq, dk, dv


def rel_err(x, ref):
    return ((x.float() - ref).norm() / ref.norm()).item()


def check():
    torch.backends.cuda.matmul.allow_tf32 = False
    print("bf16 relative error ‖x - ref‖/‖ref‖ vs an fp32 reference; ratio = ours / SDPA's (pass: <= 2)")
    print(f"{'case':>11} {'d':>3} {'N':>5}  " + "  ".join(f"{n:>24}" for n in ("o", "dq", "dk", "dv")))
    all_ok = True
    # GQA 4:1 with fewer heads than the table, to keep the fp32 reference quick
    if SMOKE:
        dims, causal_lengths, T_masked, W, lengths, hq, hkv = (16, 32), (32, 64), 64, 10, uneven_lengths(64, 4), 4, 1
    else:
        dims, causal_lengths, T_masked, W, lengths, hq, hkv = (64, 128), (1024, 4096, 16384), 4096, 1000, \
            uneven_lengths(4096, 16), 16, 4
    for D in dims:
        for name, T, extra in [("causal", T, {}) for T in causal_lengths] + [
                (f"window {W}", T_masked, dict(window=W)), (f"{len(lengths)} docs", T_masked, dict(docs=lengths))]:
            (q, k, v), do = make_inputs(1, T, D, hq=hq, hkv=hkv, seed=T + D)
            doc_start = doc_start_of(extra["docs"], DEVICE) if "docs" in extra else None
            window = extra.get("window")
            o = fa.flash_attention(q, k, v, doc_start=doc_start, window=window)
            got = (o, *torch.autograd.grad(o, (q, k, v), do))
            # SDPA as a model would call it: flash for causal, the efficient kernel for a mask
            # (K, V expanded: not every backend takes enable_gqa)
            kx, vx = (x.repeat_interleave(4, 1) for x in (k, v))
            if doc_start is None and window is None:
                o = F.scaled_dot_product_attention(q, kx, vx, is_causal=True)
            else:
                mask = visible(T, DEVICE, doc_start, window)[None, None]
                o = F.scaled_dot_product_attention(q, kx, vx, attn_mask=mask)
            base = (o, *torch.autograd.grad(o, (q, k, v), do))
            ref = reference_fp32(q, k, v, do, doc_start, window)
            cells = []
            for g, s, r in zip(got, base, ref):
                e_ours, e_sdpa = rel_err(g, r), rel_err(s, r)
                ok = bool(torch.isfinite(g).all()) and e_ours <= 2 * e_sdpa
                all_ok &= ok
                cells.append(f"{e_ours:.1e}/{e_sdpa:.1e}={e_ours / e_sdpa:.2f}{'' if ok else ' FAIL'}")
            print(f"{name:>11} {D:>3} {T:>5}  " + "  ".join(f"{c:>24}" for c in cells), flush=True)
            del q, k, v, do, got, base, ref
            free_memory()
    print("check:", "PASS" if all_ok else "FAIL")
    return all_ok


# ------------------------------------------------------------------------------------ block sweep

# Candidates per kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages); the d128 dK/dV ones are those
# that compile without register spills on sm_90 (bench/compile_check.py), plus two that spill a little.
SWEEP = dict(
    fwd=[(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2),
         (64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3)],
    dkdv=[(16, 128, 8, 2), (16, 128, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3), (32, 64, 8, 3),
          (64, 128, 8, 2), (16, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 3)],
    dq=[(128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3),
        (64, 32, 4, 3), (64, 64, 8, 3), (128, 128, 8, 2)],
)


def sweep():
    """Time each kernel's candidate blocks (others fixed at the current choice), causal bf16.
    (--smoke: the interpreter always runs the small blocks; this only walks the code.)"""
    default = dict(fa._GPU_CONFIGS)
    dims, T, B = ((16,), 64, 1) if SMOKE else ((64, 128), 4096, 4)
    for D in dims:
        (q, k, v), do = make_inputs(B, T, D)
        for kernel, candidates in SWEEP.items():
            candidates = candidates[:2] if SMOKE else candidates
            results = []
            for cfg in candidates:
                fa._GPU_CONFIGS[D] = dict(default[D], **{kernel: cfg})
                fn = ours()
                try:
                    fwd, bwd, _ = time_ms(fn, q, k, v, do)
                except Exception as e:  # e.g. out of shared memory
                    print(f"  d{D} {kernel} {cfg}: {type(e).__name__}")
                    continue
                results.append((fwd if kernel == "fwd" else bwd, cfg))
                print(f"  d{D} {kernel} {cfg}: fwd {fwd:.3f} ms, bwd {bwd:.3f} ms", flush=True)
            best = min(results)
            print(f"best d{D} {kernel}: {best[1]} {best[0]:.3f} ms")
            default[D] = dict(default[D], **{kernel: best[1]})
            fa._GPU_CONFIGS[D] = default[D]
    print("chosen:", {D: default[D] for D in dims})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="bf16 accuracy vs fp32, ours and SDPA's")
    parser.add_argument("--sweep", action="store_true", help="time candidate block sizes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: tests this script only")
    args = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("bench/attention.py needs a CUDA GPU (--smoke runs it on the CPU, for testing the script)")
    if args.sweep:
        sweep()
    elif args.check:
        sys.exit(0 if check() else 1)
    else:
        table()
