"""
sft.py -- instruction tuning on chat data: assistant-only loss, packed conversations, full or LoRA.

The stage that turns the adapted base model into an assistant (Vikhr, Nikolich et al. 2024, §3.3):
supervised fine-tuning on conversations, with the loss on the assistant's tokens only. Full
fine-tuning uses Vikhr's Table 5 settings as defaults (lr 1e-5, 3 epochs, Adam betas 0.99/0.95,
batch 3, gradient accumulation 64, sequences of 1024 tokens); LoRA (Hu et al. 2021) is the light
alternative (--lora-rank; the ruadapt/Vikhr distillation seed used rank 128 with alpha 128..512).

    python sft.py --model runs/pretrain --data ../shared/data/chat/ru_seed_tasks.messages.jsonl --out runs/sft
    torchrun --nproc_per_node 8 sft.py --model ... --data ... --out runs/sft --lora-rank 128 --lora-alpha 256

What happens, top to bottom:
  1. read the .jsonl conversations ({"messages": [...]} or Alpaca records; model.read_conversations)
  2. pick the chat template (ChatML or Mistral's [INST]); special tokens it needs and the vocabulary lacks
     are added to the tokenizer, with embedding rows set to the mean of the existing ones (under LoRA
     the rows of the template's special tokens train too: lora.TrainableRows)
  3. render every conversation to ids + loss mask (model.render_chat); over-long ones are dropped or
     truncated (--overlong), and counted
  4. each epoch: shuffle, then pack several conversations per row of --seq-len tokens; attention stays
     inside each conversation and RoPE positions restart at each (model(ids, doc_ids=...))
  5. train: loss = sum of cross-entropy over supervised tokens / their count over the whole global batch
     (all micro-batches, all ranks), so every supervised token weighs the same
  6. held-out loss before, during and after; atomic checkpoints and --resume; metrics.jsonl
  7. the run directory becomes an HF model whose tokenizer_config.json carries the chat template as
     Jinja, so transformers' apply_chat_template produces exactly the ids trained on; with LoRA the
     adapter is merged into the weights, and also saved on its own in adapter/
  8. a few sample answers to held-out prompts
"""
import argparse
import math
import os
import random
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import model as M
from model import Transformer, print0

IGNORE = -100      # label of a position that predicts no supervised token


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model and data
    p.add_argument("--model", required=True, help="HF model directory to fine-tune (e.g. pretrain.py's output)")
    p.add_argument("--data", nargs="+", required=True, help=".jsonl files: {\"messages\": [...]} or Alpaca records")
    p.add_argument("--val-data", nargs="*", default=None, help="held-out .jsonl files (default: split --val-fraction off --data)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of conversations held out when no --val-data")
    p.add_argument("--out", required=True, help="run directory: final HF model, checkpoints/, metrics.jsonl, args.json")
    p.add_argument("--chat-template", choices=["auto", *M.CHAT_TEMPLATES], default="auto",
                   help="auto: the model's own template if it is one of ours; else ChatML when the tokenizer "
                        "already has <|im_start|>/<|im_end|> or the model is a Qwen; else Mistral's [INST]")
    p.add_argument("--overlong", choices=["drop", "truncate"], default="drop",
                   help="a conversation longer than --seq-len: drop it, or keep its first --seq-len tokens "
                        "(then its last answer has no end-of-turn token, and one with no supervised token left is dropped)")
    M.add_finetuning_arguments(p)                                  # --seq-len, --lr, LoRA, --save-every, ...
    p.add_argument("--samples", type=M.at_least(0), default=3, help="sample answers to held-out prompts printed at the end")
    p.add_argument("--sample-tokens", type=M.at_least(1), default=128, help="max new tokens per sample answer")
    args = p.parse_args(argv)
    M.check_scale_arguments(p, args)
    if not 0 <= args.val_fraction < 1:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    return args


# ------------------------------------------------------------------------------------------------
# chat template and tokenizer
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def add_token_rows(model, vocab_size, new_ids, base_vocab_size, dtype):
    """Grow the embedding (and an untied head) to vocab_size rows when needed, and set the rows of the
    added tokens to the mean of the rows of the tokens the base tokenizer has (rows past those are
    padding, never trained, so they stay out of the mean). In the training dtype: under FSDP the
    weights are still the checkpoint's (bf16, say) here, and the mean must not be rounded to that."""
    def grown(w):                                                       # (V_old, d) -> (V, d)
        w = w.to(dtype)
        out = torch.cat([w, w.new_zeros(max(0, vocab_size - w.shape[0]), w.shape[1])])
        out[new_ids] = w[:base_vocab_size].float().mean(0).to(w.dtype)
        return out
    tied = model.config.tie_word_embeddings
    model.set_vocab(grown(model.model.embed_tokens.weight), None if tied else grown(model.lm_head.weight))


# ------------------------------------------------------------------------------------------------
# data: render, pack, batch
# ------------------------------------------------------------------------------------------------
def make_batch(rows, examples, seq_len, pad_id):
    """Rows of conversation indices -> ids, labels, doc_ids, each (B, seq_len). labels[t] is ids[t+1]
    where that token is supervised and in the same conversation, else IGNORE. An empty list of rows
    gives one row of padding (a rank with no data left still runs its micro-steps, with zero loss)."""
    rows = rows or [[]]
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    doc_ids = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for doc, i in enumerate(row):
            tokens, mask = examples[i]
            n = len(tokens)
            ids[b, t:t + n] = torch.tensor(tokens)
            doc_ids[b, t:t + n] = doc
            target = torch.tensor(tokens[1:])
            labels[b, t:t + n - 1] = torch.where(torch.tensor(mask[1:]), target, IGNORE)
            t += n
        doc_ids[b, t:] = len(row)                   # padding is a document of its own
    return ids, labels, doc_ids


def token_losses(model, ids, labels, doc_ids):
    """Per-position cross-entropy (fp32), 0 where labels is IGNORE. (B, T) -> (B, T). The logits exist
    1024 positions at a time (M.checkpointed_chunks): B×T×V is never held, in fp32 or otherwise."""
    hidden = model(ids, doc_ids=doc_ids, return_hidden=True)                   # (B, T, d)
    head = M.unwrap(model).lm_head

    def chunk_losses(h, y):                                                     # (C, d), (C,) -> (C,)
        return F.cross_entropy(head(h).float(), y, ignore_index=IGNORE, reduction="none")
    return torch.cat(list(M.checkpointed_chunks(chunk_losses, hidden.flatten(0, 1), labels.flatten()))).view(labels.shape)


def all_reduce_sum(values, device):
    """Sums over ranks of numbers or 0-d tensors, as Python floats: one collective, one wait for the GPU."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def held_out_loss(model, rows, examples, args, pad_id, device, rank, world):
    """Mean cross-entropy per supervised held-out token, over all ranks. Every rank runs the same number
    of forwards (a rank past the end gets a row of padding): DDP and FSDP forwards are collectives."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    per_round = args.batch_size * world
    for start in range(rank * args.batch_size, math.ceil(len(rows) / per_round) * per_round, per_round):
        ids, labels, doc_ids = (t.to(device) for t in make_batch(rows[start:start + args.batch_size], examples,
                                                                  args.seq_len, pad_id))
        with autocast(device):
            total += token_losses(model, ids, labels, doc_ids).sum().item()
        count += (labels != IGNORE).sum().item()
    model.train(was_training)
    total, count = all_reduce_sum([total, count], device)
    return total / max(count, 1)


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    finally:
        M.close_distributed()


def train(args):
    rank, local_rank, world, device = M.init_distributed()
    lora = args.lora_rank > 0
    tok_dir = os.path.join(args.out, "tokenizer")
    ckpt = M.latest_checkpoint(args.out)
    if ckpt is not None and not args.resume:
        raise SystemExit(f"{args.out} already holds checkpoints ({ckpt}); pass --resume, or choose another --out")
    if args.resume and ckpt is None:
        print0(f"--resume: no checkpoint in {args.out}, starting from the beginning")

    # -- model, template, tokenizer ----------------------------------------------------------------
    # Full fine-tuning resumes from the checkpoint's weights; LoRA from the base plus the saved adapter.
    from_ckpt = ckpt is not None and not lora
    raw = Transformer.from_pretrained(ckpt if from_ckpt else args.model,  # FSDP: on the CPU, memory-mapped
                                      **M.load_placement(device, args.dtype, args.fsdp))
    base_tok = M.load_tokenizer(args.model)
    args.chat_template = M.choose_chat_template(args.chat_template, args.model, raw.config.model_type, base_tok)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        tokenizer, added = M.write_chat_tokenizer(args.model, args.chat_template, tok_dir)
    if dist.is_initialized():
        dist.barrier()                                      # rank 0 wrote the tokenizer files
    if rank != 0:
        tokenizer = M.load_tokenizer(tok_dir)
        added = [t for t in M.CHAT_SPECIAL_TOKENS[args.chat_template] if t not in base_tok.special_tokens]
    added_ids = [tokenizer.special_tokens[t] for t in added]
    if added and not from_ckpt:
        add_token_rows(raw, max(raw.config.vocab_size, tokenizer.vocab_size), added_ids, base_tok.vocab_size,
                       getattr(torch, args.dtype))
    if args.chat_template == "chatml":   # generation stops at <|im_end|> (as Qwen's instruct models do)
        im_end = tokenizer.special_tokens["<|im_end|>"]
        raw.config.eos_token_id = [im_end] + ([tokenizer.eos_id] if tokenizer.eos_id not in (None, im_end) else [])
    eos_ids = raw.config.eos_token_id if args.chat_template == "chatml" else tokenizer.eos_id
    trained_rows = []
    if lora:
        torch.manual_seed(args.seed)                                    # the adapters' initialisation
        wrapped = M.add_lora(raw, args.lora_targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
        trained_rows = M.train_chat_token_rows(raw, tokenizer, args.chat_template)   # <|im_start|>, <|im_end|>
    trainable = [p for p in raw.parameters() if p.requires_grad]

    print0("arguments:\n" + "\n".join(f"  {k} = {v}" for k, v in vars(args).items()))
    print0(f"chat template: {args.chat_template}; tokens added to the vocabulary: "
           f"{', '.join(f'{t} (id {i})' for t, i in zip(added, added_ids)) or 'none'}"
           + (" (their rows start at the mean)" if added else "")
           + (f"; with LoRA the rows of {', '.join(trained_rows)} train too" if trained_rows else ""))
    print0(f"model: {raw.num_params() / 1e6:.2f}M parameters, trainable {sum(p.numel() for p in trainable) / 1e6:.2f}M"
           + (f" (LoRA r={args.lora_rank} alpha={args.lora_alpha} on {len(wrapped)} layers)" if lora else ""))

    # -- data --------------------------------------------------------------------------------------
    conversations = [c for path in args.data for c in M.read_conversations(path, args.chat_template)]
    if args.val_data:
        train_convs, val_convs = conversations, [c for path in args.val_data
                                                 for c in M.read_conversations(path, args.chat_template)]
    else:
        order = list(range(len(conversations)))
        random.Random(args.seed).shuffle(order)
        n_val = round(len(conversations) * args.val_fraction)
        val_convs = [conversations[i] for i in order[:n_val]]
        train_convs = [conversations[i] for i in order[n_val:]]
    train, counts = M.render_conversations(train_convs, args.chat_template, tokenizer, args.seq_len, args.overlong)
    val, val_counts = M.render_conversations(val_convs, args.chat_template, tokenizer, args.seq_len, args.overlong)
    print0(f"train conversations: {counts['kept']} kept, {counts['truncated']} truncated, {counts['dropped']} "
           f"dropped (longer than {args.seq_len} tokens, --overlong {args.overlong}), {counts['unmaskable']} dropped "
           f"(an assistant turn's edge merges with the template into one token); held out: {len(val)}")
    if not train:
        raise SystemExit("no training conversation fits --seq-len")
    lengths = [len(ids) for ids, _ in train]
    # the packing of every epoch is fixed by the seed, so a step number is a data position
    epoch_rows = []
    for epoch in range(args.epochs):
        order = list(range(len(train)))
        random.Random(args.seed * 1000 + epoch).shuffle(order)
        epoch_rows.append(M.pack_greedy(lengths, args.seq_len, order))
    rows_per_step = args.batch_size * args.grad_accum * world
    schedule = [(e, k) for e, rows in enumerate(epoch_rows) for k in range(math.ceil(len(rows) / rows_per_step))]
    total_steps = min(len(schedule), args.max_steps) if args.max_steps else len(schedule)
    val_rows = M.pack_greedy([len(ids) for ids, _ in val], args.seq_len, range(len(val)))
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    sup_tokens = sum(sum(m) for _, m in train)
    print0(f"{len(epoch_rows[0])} packed rows per epoch, {sup_tokens} supervised of {sum(lengths)} tokens; "
           f"{total_steps} optimizer steps of {rows_per_step} rows")

    # -- optimizer, resume ---------------------------------------------------------------------------
    model = M.parallelize(raw, device, dtype=args.dtype, fsdp=args.fsdp, cpu_offload=args.cpu_offload,
                          compile=args.compile, activation_checkpointing=args.activation_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]     # FSDP2 replaces them with sharded ones
    optimizer = M.adamw(model, args.lr, (args.beta1, args.beta2), args.weight_decay)
    data_plan = {k: getattr(args, k) for k in ("data", "val_data", "val_fraction", "seed", "seq_len", "overlong",
                                                "chat_template", "epochs")} | {"rows_per_step": rows_per_step}
    start_step = M.resume_training(ckpt, model, optimizer, lora, data_plan) if ckpt is not None else 0
    log = M.metrics_logger(args.out, start_step)
    if rank == 0:                                       # (after resume's checks: a refused run changes nothing)
        M.write_json_atomic(os.path.join(args.out, "args.json"), vars(args))

    def checkpoint(step):                               # every rank (see save_checkpoint)
        M.save_checkpoint(args.out, step, model, optimizer, {"step": step, "data_plan": data_plan},
                          tokenizer_dir=tok_dir, keep=args.keep)

    peak = M.gpu_peak_flops(device)
    flops_per_token = raw.flops_per_token(args.seq_len)     # (LoRA's frozen weights: 4 per entry, not 6)
    if start_step == 0:
        loss0 = held_out_loss(model, val_rows, val, args, pad_id, device, rank, world) if val else float("nan")
        print0(f"step 0: held-out loss {loss0:.4f}")
        log({"step": 0, "val_loss": loss0})

    # -- training loop -------------------------------------------------------------------------------
    model.train()
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=rank != 0,
                    desc="sft", dynamic_ncols=True)
    for step in progress:
        t0 = time.time()
        # dropout randomness is a function of (seed, step, rank): a resumed run draws the same masks
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)
        lr = M.lr_at(step, args.lr, args.warmup_steps, total_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch, k = schedule[step]
        step_rows = epoch_rows[epoch][k * rows_per_step:(k + 1) * rows_per_step]
        # every rank runs the same number of micro-steps (DDP all-reduces in each backward)
        n_micro = math.ceil(len(step_rows) / (args.batch_size * world))
        batches = [make_batch(step_rows[(m * world + rank) * args.batch_size:(m * world + rank + 1) * args.batch_size],
                              train, args.seq_len, pad_id) for m in range(n_micro)]
        # the loss is normalised by the supervised tokens of the whole global batch, counted up front
        my_rows = [row for m in range(n_micro)
                   for row in step_rows[(m * world + rank) * args.batch_size:(m * world + rank + 1) * args.batch_size]]
        n_sup, n_tokens = all_reduce_sum([sum((lb != IGNORE).sum().item() for _, lb, _ in batches),
                                          sum(lengths[i] for row in my_rows for i in row)], device)
        loss_sum = torch.zeros((), device=device)
        for m, (ids, labels, doc_ids) in enumerate(batches):
            ids, labels, doc_ids = ids.to(device), labels.to(device), doc_ids.to(device)
            M.set_grad_sync(model, m == n_micro - 1)         # DDP: one all-reduce per optimizer step
            with autocast(device):
                loss = token_losses(model, ids, labels, doc_ids).sum()
            # DDP averages gradients over ranks; times world makes the sum over ranks / global count
            (loss * world / max(n_sup, 1)).backward()
            loss_sum += loss.detach()
        grad_norm = M.clip_gradients(trainable, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = all_reduce_sum([loss_sum], device)[0] / max(n_sup, 1)   # no .item() first

        done = step + 1
        dt = time.time() - t0
        record = {"step": done, "epoch": epoch, "loss": train_loss, "lr": lr, "grad_norm": grad_norm,
                  "supervised_tokens": int(n_sup), "tokens_per_s": n_tokens / dt}
        if peak:
            record["mfu"] = flops_per_token * n_tokens / dt / (peak * world)
        if val and ((args.eval_every and done % args.eval_every == 0) or done == total_steps):
            record["val_loss"] = held_out_loss(model, val_rows, val, args, pad_id, device, rank, world)
        log(record)
        progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}")
        if rank == 0 and (done % args.log_every == 0 or "val_loss" in record):
            progress.write(f"step {done}/{total_steps} epoch {epoch} | loss {train_loss:.4f} | lr {lr:.2e} | "
                           f"{record['tokens_per_s']:.0f} tok/s" + (f" | mfu {record['mfu']:.1%}" if peak else "")
                           + (f" | held-out {record['val_loss']:.4f}" if "val_loss" in record else ""))
        if args.save_every and done % args.save_every == 0 and done < total_steps:
            checkpoint(done)
    progress.close()

    # -- final model ---------------------------------------------------------------------------------
    # every rank: rank 0 writes, under FSDP all do; checkpoints/ etc. in the directory stay
    raw.save_pretrained(args.out, tokenizer_dir=tok_dir, dtype=args.save_dtype)
    if lora and rank == 0:
        M.save_lora_adapter(raw, os.path.join(args.out, "adapter"), base_model=os.path.abspath(args.model))
    print0(f"saved {args.out}" + (f" (LoRA merged; adapter alone in {args.out}/adapter)" if lora else ""))
    if lora and added:   # the adapter holds the new tokens' trained rows; the base needs room for them
        print0(f"note: {args.out}/adapter applies to {args.model} once its embeddings have rows for "
               f"{', '.join(added)} (ids {', '.join(map(str, added_ids))}; in transformers: "
               f"model.resize_token_embeddings({raw.config.vocab_size})); the merged model in {args.out} "
               f"needs nothing")

    # -- sample answers ------------------------------------------------------------------------------
    if rank == 0 and args.samples > 0 and not args.fsdp:
        raw.eval()
        for messages in (val_convs or train_convs)[:args.samples]:
            first_answer = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = M.chat_prompt(messages[:first_answer], args.chat_template, tokenizer)
            # eager even after --compile: a KV-cache decode would recompile the layers for each new shape
            with autocast(device), torch.compiler.set_stance("force_eager"):
                answer = M.generate(raw, [prompt], args.sample_tokens, eos_id=eos_ids,
                                    vocab_limit=tokenizer.vocab_size)[0]
            if answer and answer[-1] in (eos_ids if isinstance(eos_ids, list) else [eos_ids]):
                answer = answer[:-1]                                   # the end-of-turn token
            print0(f"\n--- prompt: {messages[first_answer - 1]['content'][:300]}\n--- answer: "
                   f"{tokenizer.decode(answer).strip()}\n--- reference: {messages[first_answer]['content'][:300]}")


if __name__ == "__main__":
    main()
