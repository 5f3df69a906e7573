"""What every training script shares (pretrain.py, sft.py, distill.py train): distributed setup,
the LR schedule, checkpoints and resuming, step logging, MFU, DDP / FSDP2 wrapping, the optimizer,
the chunked loss head and the flags for scale.

Split out of model.py, which re-exports these names, so the training scripts import them from model.
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import warnings

import torch
import torch.nn as nn

from lora import LoRALinear, load_lora_state_dict, lora_state_dict


def init_distributed():
    """Works under plain `python` and `torchrun`. Returns (rank, local_rank, world_size, device)."""
    import torch.distributed as dist
    if "RANK" not in os.environ:
        return 0, 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    # Collectives wait for the slowest rank, and while one writes its part of a checkpoint (at 7B: ~87 GB
    # of weights and optimizer state in all) NCCL's default 10-minute timeout could kill the run on a slow disk.
    from datetime import timedelta
    timeout = timedelta(minutes=30)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # gloo beside NCCL for CPU tensors: under --cpu-offload the sharded gradients live on the CPU,
        # and clipping them all-reduces their norms there (NCCL alone refuses: "no backend for cpu")
        dist.init_process_group("cuda:nccl,cpu:gloo", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return rank, local_rank, world, device


def close_distributed():
    """Leave the process group, after the function that trained has returned. Its DDP/FSDP wrappers hold
    the group from inside reference cycles; collected here, while Python is fully alive, they let it go.
    A group still held when destroy_process_group runs dies later, at interpreter exit, where gloo now
    and then aborts a finished run ("terminate called without an active exception", SIGABRT: 3 of 60
    two-rank runs of a bare DDP script with torch 2.14 on CPU)."""
    import gc
    import torch.distributed as dist
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0():
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_rank0():
        print(*args, **kwargs, flush=True)


def lr_at(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    """Linear warmup for `warmup_steps`, then cosine decay to min_lr_ratio·max_lr at `total_steps`."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return max_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def save_checkpoint(run_dir, step, model, optimizer, trainer_state, tokenizer_dir=None, keep=2):
    """checkpoints/step_NNNNNN/: the HF model dir (model.save_pretrained), trainer_state.pt (step, data
    position, RNG, ...) and optimizer/, the optimizer state as torch.distributed.checkpoint writes it (under
    FSDP each rank writes its shard, one file per rank), read back at any world size, with or without
    FSDP. A model with LoRA adapters is saved merged, and its adapter goes into the trainer state as "lora"
    (resume_training reads it back). Written atomically; checkpoints beyond the newest `keep` are removed.
    Every rank calls it: rank 0 writes, except under FSDP, where all do (model.save_pretrained). Also
    removes what a killed save left behind (.step_*.tmp-* directories: tens of GB at 7B)."""
    import torch.distributed as dist
    raw = unwrap(model)
    if any(isinstance(m, LoRALinear) for m in raw.modules()):
        trainer_state = {**trainer_state, "lora": lora_state_dict(raw)}
    ckpt_root = os.path.join(run_dir, "checkpoints")
    raw.save_pretrained(os.path.join(ckpt_root, f"step_{step:06d}"), tokenizer_dir=tokenizer_dir,
                        extra_files={"trainer_state.pt": lambda path: torch.save(trainer_state, path)},
                        also=lambda tmp: save_optimizer_state(raw, optimizer, os.path.join(tmp, "optimizer")))
    if is_rank0():                              # (after save_pretrained's agreement under FSDP)
        complete = _complete_checkpoints(ckpt_root)
        for d in os.listdir(ckpt_root):
            if d.startswith(".step_") or (d.startswith("step_") and d not in (complete[-keep:] if keep else complete)):
                shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()                          # the ranks go on together, with the checkpoint complete


def save_optimizer_state(model, optimizer, path):
    """The optimizer state keyed by parameter name, written by torch.distributed.checkpoint into `path`:
    under FSDP by every rank, its own shard (a collective); otherwise by this process alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    with one_process_is_intended():
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path,
                 no_dist=not is_sharded(model))


def load_optimizer_state(model, optimizer, ckpt_dir):
    """Restore the optimizer state save_checkpoint wrote, resharded to this run: FSDP or not, any world size.
    Under FSDP a collective; otherwise each rank reads the whole state alone."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    path = os.path.join(ckpt_dir, "optimizer")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"--resume: {ckpt_dir} has no optimizer state ({path}/.metadata"
                                + ("; written by an older nanoadapt, which kept it in trainer_state.pt)"
                                   if os.path.isfile(os.path.join(ckpt_dir, "trainer_state.pt")) else ")"))
    model = unwrap(model)
    optimizer.zero_grad(set_to_none=True)   # (with gradients present, the next call leaves a fresh state empty)
    state = get_optimizer_state_dict(model, optimizer)     # this run's layout, filled in place below
    # Only the per-parameter tensors (moments, step) are read: the hyperparameters are this run's own,
    # and a torch release that adds an AdamW option (2.7: decoupled_weight_decay) still reads old ones.
    # dcp.load refuses a tensor the checkpoint lacks; one only the checkpoint has is refused here.
    wanted = {f"optimizer.state.{name}.{key}" for name, tensors in state["state"].items() for key in tensors}
    stored = {k for k in dcp.FileSystemReader(path).read_metadata().state_dict_metadata
              if k.startswith("optimizer.state.")}
    if stored - wanted:
        raise ValueError(f"--resume: {path} holds optimizer state for weights this run does not train: "
                         f"{sorted(stored - wanted)[:3]}")
    with one_process_is_intended():
        dcp.load({"optimizer": {"state": state["state"]}}, checkpoint_id=path, no_dist=not is_sharded(model))
    set_optimizer_state_dict(model, optimizer, state)


@contextlib.contextmanager
def one_process_is_intended():
    """Silences torch.distributed.checkpoint's warning that, with no process group, it works in one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def resume_training(ckpt_dir, model, optimizer, lora=False, data_plan=None):
    """Restore what a checkpoint written by sft.py / distill.py holds: the optimizer state (sharded again
    under FSDP) and, for LoRA, the adapter (the checkpoint's weights are the merged model, so a LoRA run
    resumes from its base plus this adapter). Returns the step to continue from.
    data_plan: what makes a step number mean certain rows (data, sequence length, rows per step, seed,
    ...), as saved in the checkpoint's "data_plan": a checkpoint of another plan is refused."""
    state = load_trainer_state(ckpt_dir)
    for key, value in (data_plan or {}).items():
        if key in state.get("data_plan", {}) and state["data_plan"][key] != value:
            raise ValueError(f"--resume: '{key}' was {state['data_plan'][key]!r} in {ckpt_dir}, now {value!r}; "
                             f"step {state['step']} would not mean the same rows")
    if lora != ("lora" in state):
        kind, how = ("LoRA", "with the same --lora-rank") if "lora" in state else ("full fine-tuning", "without --lora-rank")
        raise ValueError(f"--resume: {ckpt_dir} is a {kind} checkpoint; resume it {how}")
    if lora:
        load_lora_state_dict(unwrap(model), state["lora"], ckpt_dir)
    load_optimizer_state(model, optimizer, ckpt_dir)
    print0(f"resumed from {ckpt_dir} at step {state['step']}")
    return state["step"]


def metrics_logger(run_dir, resume_step=0):
    """metrics.jsonl in the run directory, one JSON object per logged step, written by rank 0. The file
    starts afresh, except that a resumed run keeps what was logged up to its checkpoint (and drops what
    the interrupted run logged after it), so the file always reads as one clean run. Returns log(record)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if is_rank0():
        os.makedirs(run_dir, exist_ok=True)
        kept = []
        if resume_step and os.path.isfile(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= resume_step]
        with open(path, "w") as f:
            f.writelines(kept)

    def log(record):
        if is_rank0():
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
    return log


def latest_checkpoint(run_dir):
    """The newest complete checkpoint directory, or None (temporary dirs start with '.', so are skipped;
    config.json is written last, so a directory without it or without trainer_state.pt is incomplete)."""
    root = os.path.join(run_dir, "checkpoints")
    steps = _complete_checkpoints(root)
    return os.path.join(root, steps[-1]) if steps else None


def _complete_checkpoints(root):
    """Names of the complete step_NNNNNN directories under root, oldest first (by step number: the name
    has a seventh digit from step 1000000 on)."""
    if not os.path.isdir(root):
        return []
    return sorted((d for d in os.listdir(root) if d.startswith("step_") and d[5:].isdigit()
                   and all(os.path.isfile(os.path.join(root, d, f)) for f in ("trainer_state.pt", "config.json"))),
                  key=lambda d: int(d[5:]))


def load_trainer_state(ckpt_dir):
    """trainer_state.pt (the optimizer state is apart, in optimizer/: load_optimizer_state), memory-mapped."""
    return torch.load(os.path.join(ckpt_dir, "trainer_state.pt"), map_location="cpu", weights_only=True, mmap=True)


# Dense bf16 tensor-core peaks (FLOP/s) of common training GPUs, matched on the device name: the first
# key the name contains, so a longer name comes before its prefix ("L40S", "L40", then "L4").
GPU_PEAK_BF16_FLOPS = [("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
                       ("H100", 989e12), ("H800", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
                       ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
                       ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12)]


def gpu_peak_flops(device) -> float | None:
    """The detected GPU's dense bf16 peak, or None when unknown (then no MFU is shown)."""
    if not (isinstance(device, torch.device) and device.type == "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in GPU_PEAK_BF16_FLOPS if key in name), None)


def at_least(low, kind=int):
    """argparse type for a number that must be >= low (a count, a rate, "0 = off"): a bad value is
    argparse's own error naming the flag ("argument --batch-size: must be at least 1, got 0"), before
    anything is loaded, rather than a ZeroDivisionError after the first training step."""
    def parse(text):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    parse.__name__ = kind.__name__          # argparse's message for a non-number: "invalid int value: 'x'"
    return parse


def add_scale_arguments(p):
    """The flags that make a 7B run fit and run fast (and save it as released), the same in pretrain.py, sft.py
    and distill.py train."""
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard weights, gradients and optimiser state over GPUs (FSDP2) instead of "
                        "replicating them (DDP): what full training of a 7B model needs")
    p.add_argument("--cpu-offload", action="store_true",
                   help="with --fsdp: keep the sharded weights, gradients and optimiser state in CPU memory "
                        "(the optimiser step runs on the CPU): slower, for models the GPUs cannot hold")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--activation-checkpointing", "--gradient-checkpointing", dest="activation_checkpointing",
                   nargs="?", const=True, default=False, type=at_least(1), metavar="N",
                   help="recompute each decoder layer in the backward pass instead of keeping its activations: "
                        "less memory, about 1/3 more compute; with N, only the first N layers (memory and "
                        "recompute both in proportion: the knob between fitting and speed)")
    p.add_argument("--save-dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="the final model's weights in this dtype (bfloat16: half the size of an fp32 run's output); "
                        "default: the training dtype. Checkpoints keep the training dtype, for an exact resume")


def add_finetuning_arguments(p):
    """The flags sft.py and distill.py train share: packing, optimisation (Vikhr Table 5's defaults), the
    weights' dtype, scale (add_scale_arguments), full fine-tuning or LoRA, checkpoints and logging."""
    p.add_argument("--seq-len", type=at_least(1), default=1024, help="tokens per packed row (Vikhr Table 5)")
    # optimisation (Vikhr Table 5)
    p.add_argument("--epochs", type=at_least(1), default=3, help="passes over the training conversations")
    p.add_argument("--lr", type=at_least(0.0, float), default=1e-5, help="peak learning rate")
    p.add_argument("--beta1", type=float, default=0.99, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    p.add_argument("--weight-decay", type=at_least(0.0, float), default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=at_least(0), default=0, help="linear warmup, in optimizer steps")
    p.add_argument("--min-lr-ratio", type=at_least(0.0, float), default=0.1,
                   help="cosine decay ends at this fraction of --lr")
    p.add_argument("--grad-clip", type=at_least(0.0, float), default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--batch-size", type=at_least(1), default=3, help="packed rows per micro-batch per rank")
    p.add_argument("--grad-accum", type=at_least(1), default=64, help="micro-batches per optimizer step per rank")
    p.add_argument("--max-steps", type=at_least(0), default=0,
                   help="stop after this many optimizer steps (0: all epochs)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weight dtype (on CUDA the matmuls run in bf16 autocast either way)")
    add_scale_arguments(p)                                         # --fsdp, --cpu-offload, --compile, ...
    p.add_argument("--seed", type=int, default=0, help="data order, dropout, adapter init")
    # LoRA (Hu et al. 2021)
    p.add_argument("--lora-rank", type=at_least(0), default=0, help="LoRA rank r (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/r")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch's input")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   type=lambda text: [name for name in text.split(",") if name],      # (also the default's)
                   help="comma-separated names of the linear layers that get an adapter")
    # checkpoints and logging
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--save-every", type=at_least(0), default=200,
                   help="checkpoint every N optimizer steps (0: none; never at the last step, whose model is --out)")
    p.add_argument("--keep", type=at_least(1), default=2, help="checkpoints kept")
    p.add_argument("--eval-every", type=at_least(0), default=50,
                   help="held-out evaluation every N optimizer steps (and at start and end); 0: start and end only")
    p.add_argument("--log-every", type=at_least(1), default=1, help="metrics line every N optimizer steps")


def check_scale_arguments(p, args):
    """Refuse combinations that would not do what they say, before anything is loaded."""
    if args.cpu_offload and not args.fsdp:
        p.error("--cpu-offload offloads FSDP's shards: it needs --fsdp")
    if args.cpu_offload and "RANK" not in os.environ:
        p.error("--cpu-offload needs FSDP, which runs under torchrun: torchrun --nproc_per_node 1 ... for one GPU")
    if args.fsdp and getattr(args, "lora_rank", 0) > 0:
        p.error("--fsdp is for full fine-tuning; LoRA trains few weights and runs under plain DDP")


def as_dtype(dtype):
    """A torch dtype from its name ("bfloat16" -> torch.bfloat16), or the dtype (or None) as given."""
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def parallelize(model, device, *, dtype=None, fsdp=False, mixed_precision=None, cpu_offload=False, compile=False,
                activation_checkpointing=False):
    """Wrap a model for training. Not distributed: the model itself, on `device`. torchrun: DDP (every
    rank holds all weights), or with fsdp=True FSDP2 (`fully_shard` per decoder layer, then the root),
    which holds 1/world of the weights, gradients and optimizer state per rank: what full fine-tuning
    of a 7B model needs. Under FSDP load the model as load_placement() says (on the CPU, memory-mapped,
    in the checkpoint's dtype): each layer is cast to `dtype` and `fully_shard` moves it to the GPU and
    shards it there, one at a time, so neither a GPU nor the host ever holds the whole model per rank.
    dtype: under FSDP, the trained weights' dtype, which each layer is cast to (None: as loaded).
    DDP and one process take the model as loaded (load_placement gave it its dtype; LoRA keeps fp32
    adapters on a bf16 base).
    mixed_precision: FSDP's compute dtype; default bf16 on CUDA (the scripts' autocast dtype), the
    weights' own elsewhere; gradients are reduced in fp32.
    compile: torch.compile each decoder layer (same graph per layer, so one compilation serves all).
    activation_checkpointing: True: recompute each decoder layer in the backward pass; N: the first N only.
    A model without trainable parameters (a frozen reference) is sharded but gets no DDP wrapper."""
    import torch.distributed as dist
    dtype = as_dtype(dtype)
    n_layers = len(model.model.layers)
    model.checkpoint_layers = (n_layers if activation_checkpointing is True         # (True == 1: test it first)
                               else min(int(activation_checkpointing), n_layers))
    if compile:
        for layer in model.model.layers:
            layer.compile()
    if not dist.is_initialized():
        return model.to(device)
    if fsdp:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
        if mixed_precision is None and device.type == "cuda":
            mixed_precision = torch.bfloat16
        kw = dict(mp_policy=MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32))
        if cpu_offload:
            if device.type != "cuda":
                raise ValueError("CPU offload moves FSDP's shards off the GPUs into pinned memory: it needs CUDA")
            kw["offload_policy"] = CPUOffloadPolicy()
        for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
            cast_weights(module, dtype)
        for layer in model.model.layers:
            cast_weights(layer, dtype)    # this layer alone in the training dtype, on the CPU
            fully_shard(layer, **kw)      # to the GPU, sharded; the whole layer is let go
        fully_shard(model, **kw)
        return model
    if not any(p.requires_grad for p in model.parameters()):
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def adamw(model, lr, betas, weight_decay=0.0, eps=1e-8):
    """AdamW over the trainable weights of a (wrapped) model, made after parallelize(): FSDP2 swaps in its
    sharded parameters. Weight decay on matrices only, never on norms or biases. The fused kernel (one
    launch per step, not one per tensor group): it takes FSDP2's DTensors, offloaded CPU shards and CPU runs."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)


def clip_gradients(params, max_norm):
    """Clip the gradients' global norm to max_norm (<= 0: no clipping); returns the norm before clipping, as a
    float. Under FSDP2 clip_grad_norm_ returns a replicated DTensor, whose item() is the whole norm."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")).item()


def checkpointed_chunks(fn, *args, chunk=1024):
    """fn over chunks of `chunk` rows of the (N, ...) tensor arguments (other arguments pass as they are),
    one result per chunk. With autograd on, each call is checkpointed: what fn builds inside, e.g. the
    (chunk, V) fp32 logits of a loss, is recomputed in the backward pass instead of kept, so the full
    (N, V) never exists. pretrain.py, sft.py and distill.py compute their losses through it."""
    n = next(a for a in args if isinstance(a, torch.Tensor)).shape[0]
    for i in range(0, n, chunk):
        part = [a[i:i + chunk] if isinstance(a, torch.Tensor) else a for a in args]
        if torch.is_grad_enabled():
            yield torch.utils.checkpoint.checkpoint(fn, *part, use_reentrant=False)
        else:
            yield fn(*part)


def cast_weights(module, dtype):
    """The parameters of module in dtype (None: unchanged). Each Parameter stays the same object, so a tied
    head stays tied; buffers (RoPE's fp32 inverse frequencies) are left alone, unlike module.to(dtype)."""
    for p in module.parameters() if dtype is not None else ():
        p.data = p.data.to(dtype)
    return module


def load_placement(device, dtype, fsdp):
    """from_pretrained's device and dtype for a model that parallelize() will wrap. DDP or one process:
    `device` and `dtype`. FSDP under torchrun: the CPU and the checkpoint's own dtype, so safetensors
    maps the files into memory without copying them (the ranks of a node share one copy in the page
    cache), and parallelize() casts one layer at a time on its way to being sharded (loading whole in
    fp32 took 28 GB of host memory per rank for a 7B model, 8 copies on a node)."""
    import torch.distributed as dist
    if fsdp and dist.is_initialized():
        return dict(device=torch.device("cpu"), dtype=None)
    return dict(device=device, dtype=dtype)


def unwrap(model):
    """The Transformer inside a DDP wrapper (FSDP2 shards in place, so nothing to unwrap there)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def set_grad_sync(model, last_micro_step):
    """Gradient accumulation. DDP: all-reduce only on the last micro-step of each optimizer step.
    FSDP2: reduce-scatter every micro-step (skipping it would keep whole, unsharded gradients on every
    GPU until the last one: the memory FSDP is there to save), so nothing to switch."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = last_micro_step


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)
