"""Forward+backward throughput of nanoadapt's model against transformers' on the same config, in one run.

    python bench/forward.py                      # CPU: a small Mistral-shaped model
    python bench/forward.py --preset gpu         # CUDA, bf16: a Qwen3-0.6B-shaped model

Both models get identical weights (ours is loaded from the checkpoint transformers writes), the same
batch and the same dtype; transformers uses its SDPA attention. Prints a table and the ratio.
"""
import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from model import Transformer  # noqa: E402

PRESETS = {
    "cpu": dict(family="mistral", hidden=256, inter=768, layers=4, heads=8, kv=2, head_dim=32, vocab=8000,
                batch=2, seq=256, dtype="float32", device="cpu"),
    # Qwen3-0.6B's shape (28 layers, hidden 1024, 16q/8kv heads of 128, vocab 151936)
    "gpu": dict(family="qwen3", hidden=1024, inter=3072, layers=28, heads=16, kv=8, head_dim=128, vocab=151936,
                batch=4, seq=2048, dtype="bfloat16", device="cuda"),
}


def build_hf(p):
    import transformers
    cls = {"mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config}[p["family"]]
    cfg = cls(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
              num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
              head_dim=p["head_dim"], sliding_window=None, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, p["dtype"]))


def time_steps(step, warmup, iters, device):
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=list(PRESETS), default="cpu")
    ap.add_argument("--iters", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, alternating the models; the best round counts")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    device = p["device"]
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--preset gpu needs CUDA")

    hf = build_hf(p)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Transformer.from_pretrained(d, device=device)
    hf = hf.to(device).train()
    ours.train()
    ids = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), device=device)

    def step_ours():
        loss = torch.nn.functional.cross_entropy(ours(ids)[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()

    def step_hf():
        hf(ids, labels=ids).loss.backward()

    attention = os.environ.get("NANOADAPT_ATTENTION") or ("triton" if device == "cuda" else "sdpa")
    tokens = p["batch"] * p["seq"]
    contenders = (("transformers (SDPA)", step_hf), (f"nanoadapt ({attention})", step_ours))
    best, mem = {}, {}
    for r in range(args.rounds):        # alternate, so a noisy moment hurts both alike
        for name, step in contenders:
            # both models stay on the GPU: each step's peak is counted above their weights, with no
            # gradients of an earlier step (its own or the other model's) held
            hf.zero_grad(set_to_none=True)
            ours.zero_grad(set_to_none=True)
            resident = 0
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            sec = time_steps(step, args.warmup if r == 0 else 0, args.iters, device)
            best[name] = min(sec, best.get(name, float("inf")))
            mem[name] = (torch.cuda.max_memory_allocated() - resident) / 2**30 if device == "cuda" else float("nan")
    rows = [(name, tokens / best[name], mem[name]) for name, _ in contenders]

    print(f"\nforward+backward, {args.preset} preset: {p['family']}-shaped, {p['layers']} layers, hidden {p['hidden']}, "
          f"vocab {p['vocab']}, batch {p['batch']}×{p['seq']}, {p['dtype']} on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f" ({torch.get_num_threads()} threads)"))
    print("| implementation | tokens/s | step peak GiB (above both models' weights) | ratio |")
    print("|---|---|---|---|")
    base = rows[0][1]
    for name, tps, mem in rows:
        mem_s = f"{mem:.1f}" if mem == mem else "–"
        print(f"| {name} | {tps:,.0f} | {mem_s} | {tps / base:.2f}× |")


if __name__ == "__main__":
    main()
