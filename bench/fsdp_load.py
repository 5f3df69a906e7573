"""Host memory per rank of getting a checkpoint into FSDP2 shards for training in fp32, and of writing a
training checkpoint from them, two ways each, in one run:

loading
  baseline   from_pretrained(dtype=float32) on the CPU, then parallelize(fsdp=True): every rank holds
             the whole model in fp32 first (28 GB per rank for a 7B model);
  nanoadapt  from_pretrained(**load_placement(...)): the checkpoint memory-mapped in its own dtype
             (page cache, shared by the ranks of a node), cast to fp32 one layer at a time by parallelize
             on its way to being sharded.
saving (after one AdamW step, so the optimizer holds its two moments)
  baseline   the whole weights and optimizer state gathered to rank 0 (torch.distributed.checkpoint's
             full_state_dict with cpu_offload), written there by one process: a safetensors file and
             torch.save (what this repository did before);
  nanoadapt  save_checkpoint: the weights gathered one tensor at a time, each rank writing its own
             safetensors files, and each rank its shard of the optimizer state (torch.distributed.checkpoint).

    torchrun --nproc_per_node 4 bench/fsdp_load.py                          # a random bf16 checkpoint
    torchrun --nproc_per_node 8 bench/fsdp_load.py --model Mistral-7B-v0.1  # a real one

Measured: peak anonymous memory (RssAnon, what a process allocates itself; mapped files are not in it),
sampled every 5 ms from a thread, above what the rank held before; the table shows the largest over ranks.
The baseline runs first; glibc is asked to return freed memory (malloc_trim) before the second. (No
load times: the second run finds the file in the page cache, so its time would flatter it. Save times
are shown: both write the same bytes to the same disk; on one machine, the ranks share its disk.)
"""
import argparse
import ctypes
import gc
import os
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from model import (Config, Transformer, adamw, cast_weights, close_distributed, init_distributed,  # noqa: E402
                   load_placement, parallelize, save_checkpoint)


def anonymous_gib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 2**20


class PeakMemory:
    """Peak RssAnon above the level at start, sampled every 5 ms while the block runs."""
    def __enter__(self):
        self.start, self.peak, self.running = anonymous_gib(), 0.0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, anonymous_gib() - self.start)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, anonymous_gib() - self.start)


def load_and_shard(path, device, how):
    if how == "baseline":
        model = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32)
        return parallelize(model, device, fsdp=True)
    model = Transformer.from_pretrained(path, **load_placement(device, torch.float32, fsdp=True))
    return parallelize(model, device, dtype=torch.float32, fsdp=True)


def save_gathered_on_rank0(model, optimizer, out):
    """The baseline save: everything gathered to rank 0's host memory, written by rank 0 alone."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if dist.get_rank() == 0:
        os.makedirs(out)
        if model.config.tie_word_embeddings:
            weights.pop("lm_head.weight")
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(out, "model.safetensors"))
        torch.save(optim, os.path.join(out, "trainer_state.pt"))
    dist.barrier()


def peaks_over_ranks(mem, world):
    """[each rank's peak] from a PeakMemory, on every rank."""
    import torch.distributed as dist
    peaks = [None] * world
    dist.all_gather_object(peaks, mem.peak)
    return peaks


def reset_heap():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an HF model directory (default: a random bf16 checkpoint of --layers layers)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--save-dir", help="where the two checkpoints are written, on a filesystem every rank sees "
                                       "(default: a temporary directory, removed at the end)")
    args = ap.parse_args()
    import torch.distributed as dist
    rank, _, world, device = init_distributed()
    if not dist.is_initialized():
        sys.exit("run it under torchrun: FSDP shards over the ranks (e.g. torchrun --nproc_per_node 4 ...)")
    box = [tempfile.mkdtemp(prefix="fsdp_load_", dir=args.save_dir) if rank == 0 else None]
    dist.broadcast_object_list(box)      # a directory all ranks see: the random checkpoint, the saves
    tmp = box[0]
    path = args.model
    if path is None:                      # rank 0 writes a random bf16 checkpoint
        path = os.path.join(tmp, "model")
        if rank == 0:
            cfg = Config.from_hf(dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                                      intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                                      num_attention_heads=max(1, args.hidden // 64),
                                      num_key_value_heads=max(1, args.hidden // 128), tie_word_embeddings=True))
            model = Transformer(cfg)
            model.init_weights()
            cast_weights(model, torch.bfloat16).save_pretrained(path)
            del model
        dist.barrier()
    rows, model = [], None
    for how in ("baseline", "nanoadapt"):
        del model                                   # (the baseline's shards go before the second load)
        reset_heap()
        with PeakMemory() as mem:
            model = load_and_shard(path, device, how)
            dist.barrier()
        shards = sum(p.to_local().nbytes for p in model.parameters()) / 2**30
        rows.append((how, max(peaks_over_ranks(mem, world)), shards))
    n_params = sum(p.numel() for p in model.parameters())      # (the nanoadapt-loaded model goes on to save)

    optimizer = adamw(model, 1e-5, (0.9, 0.95))                 # one step: AdamW's two moments exist
    model(torch.randint(0, model.config.vocab_size, (1, 64), device=device)).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    out = os.path.join(tmp, "saves")
    saves = []
    for how in ("baseline", "nanoadapt"):
        reset_heap()
        dist.barrier()
        start = time.perf_counter()
        with PeakMemory() as mem:
            if how == "baseline":
                save_gathered_on_rank0(model, optimizer, os.path.join(out, "baseline"))
            else:
                save_checkpoint(os.path.join(out, "nanoadapt"), 1, model, optimizer, {"step": 1})
        seconds = time.perf_counter() - start
        saves.append((how, peaks_over_ranks(mem, world), seconds))
    if rank == 0:
        print(f"\n{n_params / 1e6:.0f}M parameters from {path}, fp32 training weights, {world} ranks "
              f"({device.type})")
        print("| loading | peak host memory per rank, GiB | this rank's fp32 shards, GiB | ratio |")
        print("|---|---|---|---|")
        for how, peak, shards in rows:
            print(f"| {how} | {peak:.2f} | {shards:.2f} | {peak / rows[0][1]:.2f}× |")
        print(f"\nsaving a training checkpoint (fp32 weights, AdamW state) from the shards, {world} ranks")
        print("| saving | peak host memory, rank 0, GiB | largest other rank, GiB | seconds | ratio of rank 0's peak |")
        print("|---|---|---|---|---|")
        for how, peaks, seconds in saves:
            print(f"| {how} | {peaks[0]:.2f} | {max(peaks[1:]):.2f} | {seconds:.1f} | "
                  f"{peaks[0] / saves[0][1][0]:.2f}× |")
    dist.barrier()
    if rank == 0:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    close_distributed()


if __name__ == "__main__":
    main()
