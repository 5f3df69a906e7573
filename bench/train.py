"""Training-step throughput: pretrain.py's step against a plain transformers loop, in one run.

    python bench/train.py                      # GPU: Qwen3-1.7B-shaped, random init, 4×2048, bf16 autocast
    python bench/train.py --preset cpu         # a tiny smoke run of the same code on CPU

Contenders, each with fused AdamW (on CUDA), bf16 autocast, the same batch and the same initial weights:
  transformers eager / compiled   AutoModelForCausalLM(attn_implementation="sdpa"), loss = model(ids, labels=ids)
  nanoadapt eager / compiled      model.py (Triton attention on CUDA), pretrain.py's chunked fp32 loss
                                  (B×T×V logits never held in fp32), compile = torch.compile per layer
  nanoadapt + act. checkpointing  the same, recomputing each layer in the backward pass
  ... of N/L layers               recomputing the first N layers only: on a GPU, by default, the fewest that
                                  bring the peak to 0.6× the eager transformers loop's (the issue's memory bar),
                                  from the memory of checkpointing none and all (or --checkpoint-layers N ...)
Prints tokens/s, MFU (model.py's flops_per_token, the PaLM / torchtitan / nanochat count, against the
detected GPU's peak) and peak memory, with ratios to the eager transformers loop. --max-layers N also
searches, by doubling then bisection, the deepest model of this width each contender trains without
running out of GPU memory, plus nanoadapt under FSDP2 with CPU offload on the one GPU (slow: one try
per depth).
"""
import argparse
import gc
import math
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from model import Config, Transformer, adamw, gpu_peak_flops, parallelize  # noqa: E402
from pretrain import loss_sums  # noqa: E402

PRESETS = {
    # Qwen3-1.7B: 28 layers, hidden 2048, 16 q / 8 kv heads of 128, SwiGLU 6144, vocab 151936, tied
    "gpu": dict(hidden=2048, inter=6144, layers=28, heads=16, kv=8, head_dim=128, vocab=151936, tied=True,
                batch=4, seq=2048, device="cuda"),
    "cpu": dict(hidden=128, inter=384, layers=2, heads=4, kv=2, head_dim=32, vocab=1024, tied=True,
                batch=2, seq=128, device="cpu"),
}


def hf_config_dict(p, layers):
    return dict(model_type="qwen3", vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                num_hidden_layers=layers, num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                head_dim=p["head_dim"], tie_word_embeddings=p["tied"], rms_norm_eps=1e-6,
                max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                use_sliding_window=False, bos_token_id=1, eos_token_id=2)


def make_step(kind, p, layers, device):
    """Build one contender; returns (step function, model for FLOP counting)."""
    torch.manual_seed(0)
    cfg_dict = hf_config_dict(p, layers)
    fused = device.type == "cuda"
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    ids = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), device=device)
    if kind.startswith("transformers"):
        import transformers
        cfg = transformers.Qwen3Config(**{k: v for k, v in cfg_dict.items() if k != "model_type"})
        cfg._attn_implementation = "sdpa"
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        run = torch.compile(model) if "compiled" in kind else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)

        def step():
            with torch.autocast(**amp):
                loss = run(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.device("meta"):              # (built there: .to("meta") would untie a tied head)
            flops_model = Transformer(Config.from_hf(cfg_dict))
        return step, flops_model

    with torch.device(device):
        model = Transformer(Config.from_hf(cfg_dict))
    model.init_weights()
    offload = "offload" in kind       # FSDP2 over one GPU: weights, gradients and AdamW state live in CPU memory
    if offload:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("cuda:nccl,cpu:gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    model = parallelize(model, device, fsdp=offload, cpu_offload=offload, compile="compiled" in kind,
                        activation_checkpointing=checkpointing(kind))               # as pretrain.py does
    opt = adamw(model, lr=1e-4, betas=(0.9, 0.999))                              # pretrain.py's optimizer
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)   # (B, T): next token

    def step():
        with torch.autocast(**amp):
            hidden = model(ids, return_hidden=True)                               # (B, T, d)
            ce, _ = loss_sums(hidden, labels, model.lm_head, chunk=2048)
        (ce / (labels != -100).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model


def checkpointing(kind):
    """parallelize()'s activation_checkpointing for a contender: '... of N/L layers' -> N, else all or none."""
    partial = re.search(r"checkpointing of (\d+)/", kind)
    return int(partial.group(1)) if partial else "checkpointing" in kind


def layers_for_memory(target, mem_none, mem_all, layers):
    """The fewest checkpointed layers (of `layers`) that bring peak memory to `target`, from the peaks with
    none and with all of them checkpointed: each layer checkpointed keeps the same activations fewer (the
    layers are alike). None when no checkpointing is needed, or all of it is not enough."""
    if mem_none <= target or mem_all > target:
        return None
    return min(layers, math.ceil((mem_none - target) / ((mem_none - mem_all) / layers)))


def measure(kind, p, layers, device, warmup, iters):
    """(tokens/s, MFU or None, peak GiB) for one contender; raises torch.OutOfMemoryError when it does not fit."""
    step, model = make_step(kind, p, layers, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / iters
    tokens = p["batch"] * p["seq"]
    peak = gpu_peak_flops(device)
    mfu = model.flops_per_token(p["seq"]) * tokens / sec / peak if peak else None
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del step, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return tokens / sec, mfu, mem


def fits(kind, p, layers, device):
    try:
        measure(kind, p, layers, device, warmup=1, iters=1)
        return True
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return False


def deepest(kind, p, device, limit):
    """Largest layer count in [1, limit] that trains without OOM: double, then bisect."""
    lo, hi = 0, 1
    while hi <= limit and fits(kind, p, hi, device):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(kind, p, mid, device) else (lo, mid)
    return lo


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="gpu")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    ap.add_argument("--iters", type=int, default=10, help="timed steps")
    ap.add_argument("--only", nargs="*", default=None, help="run only contenders whose name contains one of these")
    ap.add_argument("--max-layers", type=int, default=0, help="also search the deepest model that fits, up to this")
    ap.add_argument("--checkpoint-layers", type=int, nargs="+", default=None, metavar="N",
                    help="also nanoadapt compiled with the first N layers checkpointed, for each N (default on a "
                         "GPU: the fewest layers that bring the peak to 0.6x the eager transformers loop's)")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    if any(not 1 <= n <= p["layers"] for n in args.checkpoint_layers or []):
        ap.error(f"--checkpoint-layers: each N must be 1..{p['layers']} (the {args.preset} preset's layers)")
    device = torch.device(p["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("the gpu preset needs CUDA (use --preset cpu for a smoke run)")
    kinds = ["transformers eager", "transformers compiled", "nanoadapt eager", "nanoadapt compiled",
             "nanoadapt compiled + activation checkpointing"]
    if args.only:
        kinds = [k for k in kinds if any(o in k for o in args.only)]

    rows = []

    def run(kind):
        try:
            rows.append((kind, *measure(kind, p, p["layers"], device, args.warmup, args.iters)))
        except torch.OutOfMemoryError:
            rows.append((kind, None, None, None))
            gc.collect()
            torch.cuda.empty_cache()
        _, tps, _, mem = rows[-1]                       # said now: a run stopped early keeps what it measured
        if tps is None:
            result = "out of memory"
        else:                                           # (no peak memory on the CPU: nan)
            result = f"{tps:,.0f} tokens/s" + (f", peak {mem:.1f} GiB" if mem == mem else "")
        print(f"  measured: {kind}: {result}", file=sys.stderr, flush=True)

    for kind in kinds:
        run(kind)
    partial = args.checkpoint_layers
    if partial is None and not args.only:
        mem = {r[0]: r[3] for r in rows if r[3] is not None and r[3] == r[3]}     # measured peaks (GiB)
        if {"transformers eager", "nanoadapt compiled", kinds[-1]} <= mem.keys():
            n = layers_for_memory(0.6 * mem["transformers eager"], mem["nanoadapt compiled"], mem[kinds[-1]],
                                  p["layers"])
            partial = [n] if n else []
            if not n:
                print("  no partial checkpointing contender: without checkpointing the peak is already within "
                      "0.6x the eager transformers loop's, or with every layer it is not", file=sys.stderr, flush=True)
    for n in partial or []:
        run(f"nanoadapt compiled + activation checkpointing of {n}/{p['layers']} layers")

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\ntraining step, {args.preset} preset: Qwen3-shaped, {p['layers']} layers, hidden {p['hidden']}, "
          f"vocab {p['vocab']}, batch {p['batch']}×{p['seq']}, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}, on {name}")
    print("| contender | tokens/s | MFU | peak GiB | tokens/s vs transformers eager | vs compiled | memory vs eager |")
    print("|---|---|---|---|---|---|---|")
    base = {r[0]: r for r in rows}
    eager, compiled = base.get("transformers eager"), base.get("transformers compiled")
    for kind, tps, mfu, mem in rows:
        if tps is None:
            print(f"| {kind} | out of memory | | | | | |")
            continue
        r_e = f"{tps / eager[1]:.2f}×" if eager and eager[1] else "–"
        r_c = f"{tps / compiled[1]:.2f}×" if compiled and compiled[1] else "–"
        r_m = f"{mem / eager[3]:.2f}×" if eager and eager[3] and mem == mem else "–"
        print(f"| {kind} | {tps:,.0f} | {f'{mfu:.1%}' if mfu else '–'} | "
              f"{f'{mem:.1f}' if mem == mem else '–'} | {r_e} | {r_c} | {r_m} |")

    if args.max_layers:
        print(f"\ndeepest model of this width that trains on one {name} (layers, ≤ {args.max_layers}):")
        for kind in kinds + (["nanoadapt FSDP + CPU offload"] if device.type == "cuda" else []):
            print(f"| {kind} | {deepest(kind, p, device, args.max_layers)} |")


if __name__ == "__main__":
    main()
