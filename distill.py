"""Offline top-k knowledge distillation: `dump` the teacher's next-token distributions once, then `train`
a student on them.

Seed 003 (Kovalev & Tikhomirov 2025, "ruadapt") ends its adaptation recipe with a distillation stage that
beats plain SFT by 2-4%: the teacher's top-k log-probabilities are written to disk once, so the teacher
never shares GPU memory with the student, and the student is trained on

    loss = CE + λ · w · KD          (λ = 0.2, k = 100: the paper's robust choice)

averaged over the supervised tokens of the whole global batch. KD is KL(teacher ‖ student) over the
teacher's top-k; w is a per-token weight: the paper's own ("seed"), 1, or SLIM's (Raman et al. 2023,
"For distillation, tokens are not all you need", as seed 003 compares against it).

    python distill.py dump  --teacher big/   --data chat.jsonl --out store/      [--top-k 100]
    python distill.py train --student small/ --store store/    --out run/        [--kd-weight 0.2]
    torchrun --nproc_per_node 8 distill.py dump|train ...                         (the same, on 8 GPUs)

Which positions. A conversation is tokenized exactly as sft.py does it (model.py's chat rendering):
tokens x_0..x_{L-1} and a loss mask m with m_i = 1 when x_i is a token sft.py trains on (assistant text
and each assistant turn's end-of-turn token). The logits at position i predict x_{i+1}, so the rows this
file stores, and the rows `train` computes BOTH the CE and the KD on, are the positions i with
m_{i+1} = 1 — "the shifted positions". There is one list of positions per conversation and both loss
terms index it; ruadapt's code applied its KD mask one token off its CE mask, which a single list rules
out (tests/test_distill.py checks it on a hand-built two-turn conversation).

The store (a directory; every array is a .npy read back with np.load(mmap_mode="r")):

    plan.json                 written first: teacher, data, tokenizer, k, chunking. A resumed dump must match it.
    tokenizer_pieces.json     the teacher tokenizer's pieces; `train` compares the student's against them
    chunk_000000/             conversations [0, C) of the data; written by rank (chunk index % world size)
        tokens.npy               (T_c,)      uint16|int32  the chunk's conversations, concatenated
        conversation_offsets.npy (C_c + 1,)  int64         conversation j is tokens[off[j]:off[j+1]]
        row_offsets.npy          (C_c + 1,)  int64         its rows are rows roff[j]:roff[j+1] below
        positions.npy            (N_c,)      int32         row -> position i in its conversation (predicts x_{i+1})
        topk_ids.npy             (N_c, k)    uint16|int32  teacher top-k token ids, most likely first
        topk_logprobs.npy        (N_c, k)    float16       their log-probabilities (full-vocabulary log-softmax)
        log_partition.npy        (N_c,)      float32       logsumexp of the raw logits: logit = logprob + this
        tail_logprob.npy         (N_c,)      float32       log of the mass outside the top-k (a logsumexp over
                                                           the complement, exact even when the tail is 1e-9)
        gold_logprob.npy         (N_c,)      float32       log-probability of the real next token x_{i+1}
        chunk.json               counts, checked against the arrays
    meta.json                 written last, by rank 0, once every chunk exists: k, vocabulary, hashes, counts,
                              bytes per token. `train` refuses a store without it.

ids are uint16 when the teacher's vocabulary fits (V <= 65536), else int32. Per stored row that is
16 + 4k bytes (k = 100: 416 B; ruadapt's int32 + float32 at every position, prompt included: 800 B).
A chunk directory is written under a temporary name and renamed into place, so an interrupted dump
resumes by skipping the chunks that exist and redoing the others.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F

import model as nano

STORE_FORMAT = "nanoadapt-topk-store-v1"
ROW_ARRAYS = ("positions", "topk_ids", "topk_logprobs", "log_partition", "tail_logprob", "gold_logprob")
STOP_ENV = "NANOADAPT_DISTILL_STOP_AFTER_CHUNKS"     # tests: simulate a dump killed after N chunks


# ------------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------------
def kd_token_weights(logits, gold, topk_ids, gold_logprob, log_partition, weighting, eps=1e-6):
    """Per-row weight w of the KD term, (n,). Detached: w decides how much a token's KL counts; it is
    not an objective, and a gradient through it would let the student lower its KD weight instead of
    its KL (e.g. "seed" rewards a smaller gold logit with a smaller weight).

    seed     (seed 003)  w = clamp(1 - exp(-s / (t + eps)), 0, 1), s and t the student's and the teacher's
                         raw logits of the gold token; t = 0 when the gold token is outside the teacher's
                         top-k, as the paper defines it (then w is 1 for s > 0, else 0).
    slim     (SLIM)      w = 1 - exp(-p_t / p_s), the gold token's teacher and student probabilities (T = 1):
                         near 1 where the teacher knows better than the student, near 0 where it does not.
    constant             w = 1.
    """
    logits = logits.detach()
    if weighting == "constant":
        return torch.ones(logits.shape[0], dtype=logits.dtype, device=logits.device)
    student_gold = logits.gather(1, gold[:, None])[:, 0]                        # (n,) raw logit s
    if weighting == "seed":
        in_topk = (topk_ids == gold[:, None]).any(1)                              # (n,)
        teacher_gold = torch.where(in_topk, gold_logprob.to(logits.dtype) + log_partition.to(logits.dtype), 0.0)
        return (1 - torch.exp(-student_gold / (teacher_gold + eps))).clamp(0, 1)
    if weighting == "slim":
        student_gold_logprob = student_gold - logits.logsumexp(-1)
        return 1 - torch.exp(-torch.exp(gold_logprob.to(logits.dtype) - student_gold_logprob))
    raise ValueError(f"--kd-weighting {weighting!r}: expected seed, slim or constant")


def distill_loss(logits, gold, topk_ids, topk_logprobs, tail_logprob, gold_logprob, log_partition,
                 kd_weight=0.2, temperature=1.0, tail="bucket", weighting="seed", eps=1e-6, weights=None):
    """Per-row loss = CE + kd_weight · w · KD, and its parts. The caller sums it over rows and divides by
    the global row count (loss per supervised token of the global batch, not per micro-batch).

    logits (n, V): the student's raw logits at the stored rows (fp32, or fp64 in the tests); gold (n,): the
    next token. Teacher, from the store: topk_ids (n, k), topk_logprobs (n, k), tail_logprob (n,),
    gold_logprob (n,), log_partition (n,). weights: a fixed w (n,) instead of kd_token_weights' (tests).

    KD = T² · KL(q_T ‖ p_T) over
      renorm  the top-k only: both sides renormalised over the teacher's k tokens, tempered by T.
      bucket  k + 1 buckets: the k tokens plus one bucket holding each side's remaining mass, so a
              student that puts mass outside the teacher's top-k pays for it (renorm cannot see that).
              The stored tail is the teacher's at T = 1, and its tempered value needs every tail logit,
              which we do not keep; so for T != 1 the tail bucket is tempered as if it were one token,
              on both sides alike: KL between the tempered (k+1)-bucket distributions. At T = 1 this is
              exactly the KL between the bucketed distributions (a lower bound on the full-vocabulary KL).
    The teacher's buckets are renormalised too: stored in fp16, they sum to 1 only to within rounding.
    Returns (loss, ce, kd, w), each (n,).
    """
    if tail not in ("bucket", "renorm"):
        raise ValueError(f"--kd-tail {tail!r}: expected bucket or renorm")
    T = temperature
    log_z = logits.logsumexp(-1)                                                 # (n,)
    ce = log_z - logits.gather(1, gold[:, None])[:, 0]                           # (n,)
    student_topk = logits.gather(1, topk_ids.long())                             # (n, k) raw logits
    teacher = topk_logprobs.to(logits.dtype)                                     # (n, k)
    if tail == "bucket":
        outside = logits.scatter(1, topk_ids.long(), float("-inf")).logsumexp(-1)   # (n,) student tail, unnormalised
        student_topk = torch.cat([student_topk, outside[:, None]], 1)                # (n, k+1); log_softmax normalises
        teacher = torch.cat([teacher, tail_logprob.to(logits.dtype)[:, None]], 1)    # (n, k+1)
    q_log = F.log_softmax(teacher / T, dim=-1)                                   # (n, k or k+1)
    p_log = F.log_softmax(student_topk / T, dim=-1)
    kd = T * T * (q_log.exp() * (q_log - p_log)).sum(-1)                         # (n,)
    if weights is None:
        weights = kd_token_weights(logits, gold, topk_ids.long(), gold_logprob, log_partition, weighting, eps)
    return ce + kd_weight * weights * kd, ce, kd, weights


# ------------------------------------------------------------------------------------------------
# the store: writing (dump) and reading (train)
# ------------------------------------------------------------------------------------------------
def id_dtype(vocab_size):
    """uint16 when every id fits (half the bytes of int32), else int32."""
    return np.uint16 if vocab_size <= 2 ** 16 else np.int32


def tokenizer_pieces(tok):
    """What makes two tokenizers the same for distillation: every id's piece, and the special tokens."""
    return {"pieces": tok.pieces(), "special_tokens": sorted(tok.special_tokens.items(), key=lambda kv: kv[1])}


def sha256_json(obj):
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def chunk_name(index):
    return f"chunk_{index:06d}"


def write_chunk(store_dir, index, arrays, counts):
    """Write one chunk's arrays into a temporary directory, then rename it into place: a chunk directory
    either holds every array or does not exist, which is what lets an interrupted dump resume."""
    final = os.path.join(store_dir, chunk_name(index))
    tmp = nano.temp_dir_beside(final)
    try:
        for name, array in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), array)
        with open(os.path.join(tmp, "chunk.json"), "w") as f:     # (the directory's rename publishes it)
            json.dump(counts, f, indent=2)
        nano.rename_durably(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class TopkStore:
    """A finished store, opened read-only with every array memory-mapped. Refuses a store without meta.json
    (an unfinished dump) and any chunk whose arrays do not have the lengths meta.json records (truncated)."""

    def __init__(self, path):
        self.path = path
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            hint = (" a dump was started here but did not finish: run the same `distill.py dump` command again "
                    "to resume it" if os.path.isfile(os.path.join(path, "plan.json")) else
                    " this is not a top-k store written by `distill.py dump`")
            raise FileNotFoundError(f"{path}: no meta.json;{hint}")
        with open(meta_path) as f:
            self.meta = meta = json.load(f)
        if meta.get("format") != STORE_FORMAT:
            raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {STORE_FORMAT!r}")
        self.k = meta["k"]
        self.chunks = []
        for c in meta["chunks"]:
            d = os.path.join(path, c["name"])
            expected = {"tokens": (c["tokens"],), "conversation_offsets": (c["conversations"] + 1,),
                        "row_offsets": (c["conversations"] + 1,), "positions": (c["rows"],),
                        "topk_ids": (c["rows"], self.k), "topk_logprobs": (c["rows"], self.k),
                        "log_partition": (c["rows"],), "tail_logprob": (c["rows"],), "gold_logprob": (c["rows"],)}
            arrays = {}
            for name, shape in expected.items():
                file = os.path.join(d, f"{name}.npy")
                try:
                    a = np.load(file, mmap_mode="r")
                except FileNotFoundError:
                    raise FileNotFoundError(f"{file}: missing from the store (meta.json lists chunk {c['name']})") from None
                except ValueError as e:          # numpy: the file is shorter than its header says
                    raise ValueError(f"{file}: truncated or corrupt ({e}); expected shape {shape} "
                                     "from meta.json. Delete the chunk directory and rerun the dump to rewrite it") from None
                if a.shape != shape:
                    raise ValueError(f"{file}: shape {a.shape}, but meta.json records {shape} for this chunk: "
                                     "the store is truncated or was modified. Delete the chunk directory and "
                                     "meta.json, then rerun the dump to rewrite it")
                arrays[name] = a
            self.chunks.append(arrays)
        # conversation index -> (chunk, index inside the chunk): train addresses conversations globally
        self.where = [(ci, j) for ci, c in enumerate(self.chunks) for j in range(len(c["conversation_offsets"]) - 1)]

    def __len__(self):
        return len(self.where)

    def conversation(self, i):
        """(tokens (L,) int64, the rows' positions (n,) int64, their teacher arrays: dict of (n, ...) arrays)."""
        ci, j = self.where[i]
        c = self.chunks[ci]
        t0, t1 = c["conversation_offsets"][j], c["conversation_offsets"][j + 1]
        r0, r1 = c["row_offsets"][j], c["row_offsets"][j + 1]
        rows = {name: np.asarray(c[name][r0:r1]) for name in ROW_ARRAYS}
        return np.asarray(c["tokens"][t0:t1], dtype=np.int64), rows

    def lengths(self):
        """(conversations,) tokens and rows of each conversation, without reading the row arrays."""
        tokens = np.concatenate([np.diff(c["conversation_offsets"]) for c in self.chunks])
        rows = np.concatenate([np.diff(c["row_offsets"]) for c in self.chunks])
        return tokens, rows

    def check_student_tokenizer(self, tok, student_dir):
        """Refuse a student that tokenizes differently from the teacher: the stored ids would mean other pieces."""
        with open(os.path.join(self.path, "tokenizer_pieces.json")) as f:
            teacher = json.load(f)
        student = tokenizer_pieces(tok)
        if sha256_json(student) == self.meta["tokenizer"]["sha256"]:
            return
        tp, sp = teacher["pieces"], student["pieces"]
        if len(tp) != len(sp):
            why = f"the teacher's tokenizer has {len(tp)} pieces, the student's {len(sp)}"
        elif tp != sp:
            i = next(i for i, (a, b) in enumerate(zip(tp, sp)) if a != b)
            why = f"id {i} is {tp[i]!r} for the teacher and {sp[i]!r} for the student"
        else:
            why = "their special tokens differ"
        raise ValueError(f"{student_dir}: the student's tokenizer differs from the teacher's that wrote {self.path} "
                         f"({why}); distillation needs the same vocabulary (resize/retrain one of them first)")


# ------------------------------------------------------------------------------------------------
# conversations -> token ids and the positions to store
# ------------------------------------------------------------------------------------------------
def choose_template(requested, model_dir, model_type, tok):
    """sft.py's rule (model.choose_chat_template), so the teacher's conversations read as its SFT run wrote
    them. Unlike sft.py we cannot add missing tokens (teacher and student must keep one vocabulary), so a
    template whose tokens the tokenizer lacks is refused."""
    name = nano.choose_chat_template(requested, model_dir, model_type, tok)
    missing = [t for t in nano.CHAT_SPECIAL_TOKENS[name] if t not in tok.special_tokens]
    if missing:
        raise ValueError(f"{model_dir}: the tokenizer lacks {missing}, which the {name} chat template needs; "
                         "run the teacher through sft.py first (it adds them), or pass --chat-template mistral")
    return name


def shifted_positions(loss_mask, all_positions=False):
    """The positions whose logits predict a supervised token: i with loss_mask[i + 1] (the shifted positions;
    sft.py's labels are not IGNORE exactly there). CE and KD are both computed at these positions,
    against the token at i + 1."""
    if all_positions:
        return list(range(len(loss_mask) - 1))
    return [i for i in range(len(loss_mask) - 1) if loss_mask[i + 1]]


def tokenize_conversations(paths, tok, template, max_len, overlong="drop", all_positions=False):
    """Every conversation of the .jsonl files, rendered and cut exactly as sft.py does
    (model.render_conversations, with its --overlong policy), each with its stored positions.
    Returns ([(ids, positions)], counts {kept, truncated, dropped})."""
    conversations = [c for path in paths for c in nano.read_conversations(path, template)]
    examples, counts = nano.render_conversations(conversations, template, tok, max_len, overlong)
    return [(ids, shifted_positions(mask, all_positions)) for ids, mask in examples], counts


def packed_batch(items, device):
    """items: per row of the batch, a list of (tokens (L,), positions (n,)) conversations packed together.
    -> input_ids (B, T), doc_ids (B, T), flat (N,) indices into the flattened (B*T) positions of every row
    to compute, in the order given; targets (N,) the tokens those positions predict."""
    T = max(sum(len(t) for t, _ in row) for row in items)
    input_ids = np.zeros((len(items), T), dtype=np.int64)
    doc_ids = np.zeros((len(items), T), dtype=np.int64)
    flat, targets = [], []
    for b, row in enumerate(items):
        start = 0
        for d, (tokens, positions) in enumerate(row):
            L = len(tokens)
            input_ids[b, start:start + L] = tokens
            doc_ids[b, start:start + L] = d
            positions = np.asarray(positions, dtype=np.int64)
            flat.append(b * T + start + positions)
            targets.append(np.asarray(tokens)[positions + 1])
            start += L
        doc_ids[b, start:] = len(row)                   # padding: a document of its own, never read
    flat, targets = np.concatenate(flat), np.concatenate(targets)
    to = lambda a: torch.from_numpy(a).to(device)       # noqa: E731
    return to(input_ids), to(doc_ids), to(flat), to(targets)


def hidden_at(model, input_ids, doc_ids, flat):
    """The final hidden states at the rows only, (N, d): the (B, T, V) logits are never materialised."""
    h = model(input_ids, doc_ids=doc_ids, return_hidden=True)             # (B, T, d)
    return h.flatten(0, 1).index_select(0, flat)                            # (N, d)


# ------------------------------------------------------------------------------------------------
# dump: the teacher's top-k at every stored position
# ------------------------------------------------------------------------------------------------
HEAD_ROWS = 1024        # rows per lm_head call in the dump: bounds the fp32 (rows, V) logits to 0.6 GB at V = 152k


@torch.no_grad()
def teacher_topk(teacher, conversations, k, pack_len, batch_size, device):
    """Teacher rows for a list of (ids, positions) conversations, in conversation order: a dict of numpy
    arrays topk_ids (N, k), topk_logprobs (N, k) fp16, log_partition, tail_logprob, gold_logprob (N,) fp32."""
    lengths = [len(ids) for ids, _ in conversations]
    sequences = nano.pack_greedy(lengths, pack_len, range(len(conversations)))    # in order: rows come out in order
    out = {name: [] for name in ROW_ARRAYS[1:]}
    for s in range(0, len(sequences), batch_size):
        items = [[conversations[i] for i in seq] for seq in sequences[s:s + batch_size]]
        input_ids, doc_ids, flat, targets = packed_batch(items, device)
        h = hidden_at(teacher, input_ids, doc_ids, flat)                     # (N, d) in the teacher's dtype
        for r in range(0, h.shape[0], HEAD_ROWS):
            logits = teacher.lm_head(h[r:r + HEAD_ROWS]).float()             # (n, V): log-softmax in fp32
            log_z = logits.logsumexp(-1)                                     # (n,)
            logprobs = logits - log_z[:, None]                               # (n, V)
            values, ids = logprobs.topk(k, dim=-1)                           # (n, k), most likely first
            gold = logprobs.gather(1, targets[r:r + HEAD_ROWS, None])[:, 0]
            # the tail as a logsumexp over the complement: log(1 - Σ top-k) loses everything below ~1e-7
            tail = logprobs.scatter_(1, ids, float("-inf")).logsumexp(-1)
            # fp16 ends at -65504: clamp there, so a vanishing probability stays 0 instead of -inf (NaN in the KL)
            values = values.clamp(min=torch.finfo(torch.float16).min).half()
            for name, t in (("topk_ids", ids), ("topk_logprobs", values), ("log_partition", log_z),
                            ("tail_logprob", tail), ("gold_logprob", gold)):
                out[name].append(t.cpu())
    return {name: torch.cat(ts).numpy() for name, ts in out.items()}


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(model_dir):
    """sha256 over each weights file's name, size, safetensors header and 64 KiB read at 16 evenly spaced
    offsets: the same for the same files whatever their times (a `cp` in place, a restore), different for a
    retrained teacher, whose every tensor changes (the plan records the teacher's path beside it). (Hashing all 15 GB at every start would take minutes; file times change on a copy.)"""
    h = hashlib.sha256()
    for name in sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors")):
        path = os.path.join(model_dir, name)
        size = os.path.getsize(path)
        h.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")          # safetensors: u64 length, then JSON
            h.update(f.read(header))
            for i in range(16):
                f.seek(8 + header + (size - 8 - header) * i // 16)
                h.update(f.read(1 << 16))
    return h.hexdigest()


def dump(args):
    rank, _, world, device = nano.init_distributed()
    import torch.distributed as dist
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = nano.load_tokenizer(args.teacher)
    teacher = nano.Transformer.from_pretrained(args.teacher, device=device, dtype=dtype).eval()
    template = choose_template(args.chat_template, args.teacher, teacher.config.model_type, tok)
    V = teacher.config.vocab_size
    if not 0 < args.top_k < V:
        raise ValueError(f"--top-k {args.top_k}: must be between 1 and the vocabulary size - 1 ({V - 1})")
    if args.pack_len < args.max_len:
        raise ValueError(f"--pack-len {args.pack_len} must be at least --max-len {args.max_len}")
    conversations, counts = tokenize_conversations(args.data, tok, template, args.max_len, args.overlong,
                                                   args.positions == "all")
    if not conversations:
        raise ValueError(f"{', '.join(args.data)}: no conversation fits --max-len {args.max_len}")
    pieces = tokenizer_pieces(tok)
    n_chunks = math.ceil(len(conversations) / args.chunk_conversations)
    plan = {"format": STORE_FORMAT, "teacher": os.path.abspath(args.teacher),
            "teacher_config_sha256": file_sha256(os.path.join(args.teacher, "config.json")),
            "teacher_weights": weights_fingerprint(args.teacher),
            "teacher_dtype": str(dtype).removeprefix("torch."), "data": [os.path.abspath(p) for p in args.data],
            "data_sha256": sha256_json([file_sha256(p) for p in args.data]), "tokenizer_sha256": sha256_json(pieces),
            "chat_template": template, "max_len": args.max_len, "positions": args.positions, "k": args.top_k,
            "chunk_conversations": args.chunk_conversations, "conversations": len(conversations),
            "overlong": args.overlong, "rendered": counts, "chunks": n_chunks}

    # plan.json first: a resumed dump must be the same dump, or its chunks would mix two teachers or datasets
    os.makedirs(args.out, exist_ok=True)
    plan_path = os.path.join(args.out, "plan.json")
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        differ = sorted(key for key in plan if old.get(key) != plan[key])
        if differ:
            raise ValueError(f"{plan_path}: this store was started with different settings ({', '.join(differ)}); "
                             "use another --out, or delete the store to start over")
    if rank == 0:
        nano.write_json_atomic(plan_path, plan)
        nano.write_json_atomic(os.path.join(args.out, "tokenizer_pieces.json"), pieces)
    if os.path.isfile(os.path.join(args.out, "meta.json")):
        nano.print0(f"{args.out}: complete already (meta.json exists); nothing to do")
        return

    nano.print0(f"teacher {args.teacher} ({dtype}, vocab {V}) | conversations: {counts['kept']} kept, "
                f"{counts['truncated']} truncated, {counts['dropped']} dropped (longer than --max-len {args.max_len}, "
                f"--overlong {args.overlong}), {counts['unmaskable']} unmaskable | {n_chunks} chunks | template {template} | top-k {args.top_k}")
    ids_type, tokens_type = id_dtype(V), id_dtype(max(V, tok.vocab_size))
    mine = [c for c in range(n_chunks) if c % world == rank]               # each rank writes its own chunks
    todo = [c for c in mine if not os.path.isdir(os.path.join(args.out, chunk_name(c)))]
    for stale in os.listdir(args.out):                                     # temp dirs of a killed run: redo
        if stale.startswith(".chunk_") and int(stale[7:13]) in todo:
            shutil.rmtree(os.path.join(args.out, stale), ignore_errors=True)
    nano.print0(f"rank 0: {len(mine) - len(todo)} of its {len(mine)} chunks done already, resuming")
    stop_after = int(os.environ.get(STOP_ENV, "0"))
    tokens_done, rows_done, t0 = 0, 0, time.perf_counter()
    from tqdm import tqdm
    for n, c in enumerate(tqdm(todo, desc="dump", disable=rank != 0, unit="chunk")):
        part = conversations[c * args.chunk_conversations:(c + 1) * args.chunk_conversations]
        rows = teacher_topk(teacher, part, args.top_k, args.pack_len, args.batch_size, device)
        lengths = np.array([len(ids) for ids, _ in part])
        n_rows = np.array([len(pos) for _, pos in part])
        arrays = {"tokens": np.concatenate([ids for ids, _ in part]).astype(tokens_type),
                  "conversation_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                  "row_offsets": np.concatenate([[0], np.cumsum(n_rows)]).astype(np.int64),
                  "positions": np.concatenate([pos for _, pos in part]).astype(np.int32),
                  **rows}
        arrays["topk_ids"] = arrays["topk_ids"].astype(ids_type)
        counts = {"name": chunk_name(c), "conversations": len(part), "tokens": int(lengths.sum()),
                  "rows": int(n_rows.sum()), "max_topk_id": int(arrays["topk_ids"].max())}
        write_chunk(args.out, c, arrays, counts)
        tokens_done, rows_done = tokens_done + counts["tokens"], rows_done + counts["rows"]
        if stop_after and n + 1 >= stop_after:
            raise SystemExit(f"{STOP_ENV}={stop_after}: stopping after {stop_after} chunk(s), as asked")
    elapsed = time.perf_counter() - t0
    if todo:
        nano.print0(f"rank 0: {tokens_done} tokens ({rows_done} stored rows) in {elapsed:.1f}s: "
                    f"{tokens_done / elapsed:,.0f} tokens/s, {rows_done / elapsed:,.0f} rows/s per rank")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        write_meta(args.out, plan, V, tok, elapsed, world)
    if dist.is_initialized():
        dist.barrier()


def write_meta(out, plan, vocab_size, tok, elapsed, world):
    """meta.json, last: only once every chunk directory exists, so its presence means the store is whole."""
    chunks = []
    for c in range(plan["chunks"]):
        path = os.path.join(out, chunk_name(c), "chunk.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; a rank did not finish its chunks. Rerun the dump to resume")
        with open(path) as f:
            chunks.append(json.load(f))
    total = lambda key: sum(c[key] for c in chunks)                         # noqa: E731
    nbytes = sum(os.path.getsize(os.path.join(out, c["name"], f)) for c in chunks
                 for f in os.listdir(os.path.join(out, c["name"])) if f.endswith(".npy"))
    row_bytes = 4 + plan["k"] * (np.dtype(id_dtype(vocab_size)).itemsize + 2) + 3 * 4
    meta = {**plan, "vocab_size": vocab_size, "tokenizer_vocab_size": tok.vocab_size,
            "id_dtype": np.dtype(id_dtype(vocab_size)).name,
            "tokenizer": {"sha256": plan["tokenizer_sha256"], "pieces": "tokenizer_pieces.json"},
            "counts": {"conversations": total("conversations"), "tokens": total("tokens"), "rows": total("rows"),
                       "dropped": plan["rendered"]["dropped"], "truncated": plan["rendered"]["truncated"]},
            "max_topk_id": max(c["max_topk_id"] for c in chunks),
            "bytes": nbytes, "bytes_per_row": row_bytes,
            "bytes_per_token": round(nbytes / total("tokens"), 2),
            "bytes_per_stored_row": round(nbytes / total("rows"), 2),
            "last_run": {"world_size": world, "seconds": round(elapsed, 2)},
            "chunks": chunks}
    nano.write_json_atomic(os.path.join(out, "meta.json"), meta)
    nano.print0(f"{out}: {meta['counts']['rows']} rows of {meta['counts']['tokens']} tokens, {nbytes / 1e6:.1f} MB: "
                f"{meta['bytes_per_stored_row']} B per stored row, {meta['bytes_per_token']} B per conversation token")


# ------------------------------------------------------------------------------------------------
# train: the student on the stored rows
# ------------------------------------------------------------------------------------------------
def micro_batches(sequences, batch_size):
    return [sequences[i:i + batch_size] for i in range(0, len(sequences), batch_size)]


def training_plan(lengths, conversations, seq_len, batch_size, epochs, seed):
    """Every micro-batch of the run, in order: per epoch a seeded shuffle of the conversations, packed into
    sequences of at most seq_len tokens, batch_size sequences per micro-batch. Deterministic, so every rank
    knows every micro-batch (and the global row count of each step) without communicating, and a resumed
    run continues from its step alone."""
    plan = []
    for epoch in range(epochs):
        order = np.random.default_rng(seed + epoch).permutation(conversations)
        plan += micro_batches(nano.pack_greedy(lengths, seq_len, order), batch_size)
    return plan


def load_batch(store, micro, device):
    """A micro-batch (lists of conversation indices, one list per packed sequence) -> the student's inputs,
    the row indices into the flattened (B*T) hidden states, the gold tokens, and the teacher's arrays,
    all in one row order: CE and KD of row r both read index r."""
    items, teacher = [], {name: [] for name in ROW_ARRAYS[1:]}
    for seq in micro:
        row = []
        for i in seq:
            tokens, rows = store.conversation(i)
            row.append((tokens, rows["positions"]))
            for name in teacher:
                teacher[name].append(rows[name])
        items.append(row)
    input_ids, doc_ids, flat, gold = packed_batch(items, device)
    teacher = {name: torch.from_numpy(np.concatenate(a).astype(np.int64 if name == "topk_ids" else np.float32)).to(device)
               for name, a in teacher.items()}
    return input_ids, doc_ids, flat, gold, teacher


def student_losses(model, input_ids, doc_ids, flat, gold, t, autocast, **loss_args):
    """distill_loss at the stored rows: (loss, ce, kd, w), (N,) each. The student's hidden states at the rows
    go through its head 1024 rows at a time (model.checkpointed_chunks, recomputed in the backward pass),
    so the (N, V) fp32 logits and the loss's (N, V) temporaries exist for one chunk at a time."""
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        h = hidden_at(model, input_ids, doc_ids, flat)                           # (N, d)
    head = nano.unwrap(model).lm_head

    def rows(h, gold, topk_ids, topk_logprobs, tail_logprob, gold_logprob, log_partition):
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = head(h).float()                                             # (C, V)
        return distill_loss(logits, gold, topk_ids, topk_logprobs, tail_logprob, gold_logprob, log_partition,
                            **loss_args)
    parts = nano.checkpointed_chunks(rows, h, gold, t["topk_ids"], t["topk_logprobs"], t["tail_logprob"],
                                     t["gold_logprob"], t["log_partition"])
    return tuple(torch.cat(x) for x in zip(*parts))


@torch.no_grad()
def evaluate_heldout(model, store, conversations, lengths, args, device, rank, world, autocast):
    """Held-out CE of the student, KL(teacher ‖ student) over the k+1 buckets at T = 1 (a lower bound on
    the full-vocabulary KL), and the teacher's own CE, all per stored row, summed over every rank."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)                    # ce, kl, teacher ce, rows
    batches = micro_batches(nano.pack_greedy(lengths, args.seq_len, conversations), args.batch_size)
    # every rank runs the same number of forwards (FSDP gathers weights in each); a spare one is not counted
    for i in range(math.ceil(len(batches) / world)):
        spare = rank + i * world >= len(batches)
        input_ids, doc_ids, flat, gold, t = load_batch(store, batches[0 if spare else rank + i * world], device)
        _, ce, kl, _ = student_losses(model, input_ids, doc_ids, flat, gold, t, autocast, tail="bucket",
                                      weighting="constant")
        if spare:
            continue
        sums += torch.stack([ce.sum(), kl.sum(), -t["gold_logprob"].sum(), torch.tensor(float(len(gold)))]).double()
    import torch.distributed as dist
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    ce, kl, teacher_ce, rows = sums.tolist()
    return {"eval_ce": ce / rows, "eval_kl": kl / rows, "eval_teacher_ce": teacher_ce / rows, "eval_rows": int(rows)}


def train(args):
    rank, _, world, device = nano.init_distributed()
    import torch.distributed as dist
    from tqdm import tqdm
    lora = args.lora_rank > 0
    ckpt = nano.latest_checkpoint(args.out)
    if ckpt is not None and not args.resume:
        raise SystemExit(f"{args.out} already holds checkpoints ({ckpt}); pass --resume, or choose another --out")

    # -- store, student, tokenizer check -----------------------------------------------------------------
    store = TopkStore(args.store)
    student_tok = nano.load_tokenizer(args.student)
    store.check_student_tokenizer(student_tok, args.student)
    # the student is saved with the chat template its data was rendered with, so it chats in transformers
    tok_dir = os.path.join(args.out, "tokenizer")
    if rank == 0:
        nano.write_chat_tokenizer(args.student, store.meta["chat_template"], tok_dir)
    # full fine-tuning resumes from the checkpoint's weights; LoRA from the base plus the saved adapter (sft.py)
    from_ckpt = ckpt is not None and not lora
    raw = nano.Transformer.from_pretrained(ckpt if from_ckpt else args.student,     # FSDP: on the CPU, memory-mapped
                                           **nano.load_placement(device, args.dtype, args.fsdp))
    if raw.config.vocab_size <= store.meta["max_topk_id"]:
        raise ValueError(f"{args.student}: vocabulary of {raw.config.vocab_size} rows, but the store holds "
                         f"teacher ids up to {store.meta['max_topk_id']}")
    if lora:
        torch.manual_seed(args.seed)                                    # the adapters' initialisation
        nano.add_lora(raw, args.lora_targets, args.lora_rank, args.lora_alpha, args.lora_dropout)
        # as in sft.py: the rows of <|im_start|> and <|im_end|> train too (a pretrained student's may be equal)
        nano.train_chat_token_rows(raw, student_tok, store.meta["chat_template"])

    # -- data: every stored conversation, the last --eval-conversations held out -------------------------
    lengths, rows_per_conversation = store.lengths()
    if lengths.max() > args.seq_len:
        raise ValueError(f"{args.store}: conversations of up to {lengths.max()} tokens, longer than --seq-len "
                         f"{args.seq_len}: dump with --max-len <= --seq-len")
    n_eval = args.eval_conversations
    if not 0 <= n_eval < len(store):
        raise ValueError(f"--eval-conversations {n_eval}: the store has {len(store)} conversations")
    train_ids, eval_ids = np.arange(len(store) - n_eval), np.arange(len(store) - n_eval, len(store))
    eval_store, eval_lengths = store, lengths
    if args.eval_store:                      # held-out conversations dumped on their own, by the same teacher
        eval_store = TopkStore(args.eval_store)
        if eval_store.meta["tokenizer"]["sha256"] != store.meta["tokenizer"]["sha256"]:
            raise ValueError(f"{args.eval_store}: written with another tokenizer than {args.store}")
        eval_lengths = eval_store.lengths()[0]
        eval_ids = np.arange(len(eval_store))
        n_eval = len(eval_ids)
    plan = training_plan(lengths, train_ids, args.seq_len, args.batch_size, args.epochs, args.seed)
    per_step = args.grad_accum * world                  # micro-batches per optimizer step, all ranks
    total_steps = len(plan) // per_step                 # the last incomplete step of the run is not taken
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    if total_steps == 0:
        raise ValueError(f"{len(plan)} micro-batches of {args.batch_size} sequences: fewer than one optimizer step "
                         f"({args.grad_accum} × {world} ranks); lower --batch-size or --grad-accum")

    # -- optimizer, resume ----------------------------------------------------------------------------
    model = nano.parallelize(raw, device, dtype=args.dtype, fsdp=args.fsdp, cpu_offload=args.cpu_offload,
                             compile=args.compile, activation_checkpointing=args.activation_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]     # FSDP2 replaces them with sharded ones
    optimizer = nano.adamw(model, args.lr, (args.beta1, args.beta2), args.weight_decay)
    data_plan = {k: getattr(args, k) for k in ("store", "eval_store", "eval_conversations", "seq_len", "batch_size",
                                                "epochs", "seed")} | {"micro_batches_per_step": per_step}
    start_step = nano.resume_training(ckpt, model, optimizer, lora, data_plan) if ckpt is not None else 0
    log = nano.metrics_logger(args.out, start_step)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        nano.write_json_atomic(os.path.join(args.out, "args.json"), vars(args))
    nano.print0("arguments:\n" + "\n".join(f"  {k} = {v}" for k, v in vars(args).items()))
    nano.print0(f"store {args.store}: {len(store)} conversations, {int(rows_per_conversation.sum())} rows, top-{store.k} "
                f"| {len(train_ids)} train, {n_eval} held out | {total_steps} steps of {per_step} micro-batches | "
                + (f"LoRA r={args.lora_rank} alpha={args.lora_alpha}" if lora else "full fine-tuning")
                + f" | λ={args.kd_weight} tail={args.kd_tail} w={args.kd_weighting} T={args.temperature}")
    autocast = device.type == "cuda"                 # bf16 matmuls on GPUs; the loss is fp32 either way
    peak = nano.gpu_peak_flops(device)
    flops_per_token = raw.flops_per_token(args.seq_len)     # (LoRA's frozen weights: 4 per entry, not 6)

    def evaluate(step):
        if n_eval:
            result = {"step": step, **evaluate_heldout(model, eval_store, eval_ids, eval_lengths, args, device, rank,
                                                       world, autocast)}
            nano.print0(json.dumps(result))
            log(result)

    def checkpoint(step):                               # every rank (see save_checkpoint)
        nano.save_checkpoint(args.out, step, model, optimizer, {"step": step, "data_plan": data_plan},
                             tokenizer_dir=tok_dir, keep=args.keep)

    # -- training loop ------------------------------------------------------------------------------
    if start_step == 0:
        evaluate(0)
    model.train()
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="distill", disable=rank != 0)
    for step in bar:
        t0 = time.perf_counter()
        # dropout randomness is a function of (seed, step, rank): a resumed run draws the same masks
        torch.manual_seed(args.seed * 1_000_003 + step * world + rank)
        lr = nano.lr_at(step, args.lr, args.warmup_steps, total_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_micro = plan[step * per_step:(step + 1) * per_step]
        # the global number of stored rows in this step: every rank knows it from the plan, no all-reduce
        n_rows = sum(int(rows_per_conversation[i]) for micro in step_micro for seq in micro for i in seq)
        n_tokens = sum(int(lengths[i]) for micro in step_micro for seq in micro for i in seq)
        sums = torch.zeros(4, dtype=torch.float64, device=device)                 # loss, ce, kd, w
        for m in range(args.grad_accum):
            input_ids, doc_ids, flat, gold, t = load_batch(store, step_micro[m * world + rank], device)
            nano.set_grad_sync(model, m == args.grad_accum - 1)                   # DDP: one all-reduce per optimizer step
            loss, ce, kd, w = student_losses(model, input_ids, doc_ids, flat, gold, t, autocast,
                                             kd_weight=args.kd_weight, temperature=args.temperature,
                                             tail=args.kd_tail, weighting=args.kd_weighting, eps=args.seed_eps)
            # sum over rows / global rows; × world because DDP averages the ranks' gradients
            (loss.sum() * world / n_rows).backward()
            sums += torch.stack([loss.sum(), ce.sum(), kd.sum(), w.sum()]).detach().double()
        grad_norm = nano.clip_gradients(trainable, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.is_initialized():
            dist.all_reduce(sums)
        done, dt = step + 1, time.perf_counter() - t0
        loss, ce, kd, w = (sums / n_rows).tolist()
        record = {"step": done, "loss": loss, "ce": ce, "kd": kd, "w": w, "lr": lr, "grad_norm": grad_norm,
                  "rows": n_rows, "tokens_per_s": n_tokens / dt}
        if peak:
            record["mfu"] = flops_per_token * n_tokens / dt / (peak * world)
        if done % args.log_every == 0 or done == total_steps:
            log(record)
        bar.set_postfix(loss=f"{loss:.4f}", ce=f"{ce:.4f}", kd=f"{kd:.4f}", lr=f"{lr:.2e}")
        if args.eval_every and done % args.eval_every == 0 and done < total_steps:
            evaluate(done)
        if args.save_every and done % args.save_every == 0 and done < total_steps:
            checkpoint(done)
    bar.close()
    evaluate(total_steps)

    # -- final model ------------------------------------------------------------------------------------
    # no checkpoint of the last step (as pretrain.py and sft.py): the HF model is the result, and the
    # optimizer state of a 7B model is tens of GB written for nothing; checkpoints/ keeps the earlier ones
    # every rank: rank 0 writes, under FSDP all do
    raw.save_pretrained(args.out, tokenizer_dir=tok_dir, dtype=args.save_dtype)
    if lora and rank == 0:
        nano.save_lora_adapter(raw, os.path.join(args.out, "adapter"), base_model=os.path.abspath(args.student))
    nano.print0(f"saved {args.out}" + (f" (LoRA merged; adapter alone in {args.out}/adapter)" if lora else ""))
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("dump", help="run the teacher once; write its top-k log-probs to a store",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # teacher and data
    d.add_argument("--teacher", required=True, help="teacher model directory (HF format)")
    d.add_argument("--data", required=True, nargs="+", help="chat .jsonl files: {'messages': [...]} or Alpaca records")
    d.add_argument("--out", required=True, help="store directory (created; an unfinished one is resumed)")
    d.add_argument("--chat-template", choices=sorted(nano.CHAT_TEMPLATES), default=None,
                   help="default as sft.py's auto: the teacher's own template, else chatml when its tokenizer "
                        "has the tokens or it is a Qwen, else mistral")
    d.add_argument("--max-len", type=nano.at_least(1), default=1024,
                   help="longest conversation in tokens (sft.py's --seq-len)")
    d.add_argument("--overlong", choices=("drop", "truncate"), default="drop",
                   help="a longer conversation: drop it, or keep its first --max-len tokens (as sft.py)")
    d.add_argument("--positions", choices=("supervised", "all"), default="supervised",
                   help="store the positions that predict an assistant token (what sft.py trains on), or every position")
    # store
    d.add_argument("--top-k", type=nano.at_least(1), default=100, help="teacher log-probs kept per position (seed 003: 100)")
    d.add_argument("--chunk-conversations", type=nano.at_least(1), default=1024,
                   help="conversations per chunk: the unit a rank writes atomically and a resumed dump skips")
    # throughput
    d.add_argument("--pack-len", type=nano.at_least(1), default=4096, help="tokens per packed sequence in a teacher forward")
    d.add_argument("--batch-size", type=nano.at_least(1), default=4, help="packed sequences per teacher forward")
    d.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="teacher weights (default: bfloat16 on CUDA, float32 on CPU); log-softmax is fp32 always")

    t = sub.add_parser("train", help="train a student on a store: CE + λ·w·KD",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # student and data
    t.add_argument("--student", required=True, help="student model directory (HF format), same tokenizer as the teacher")
    t.add_argument("--store", required=True, help="a store written by `distill.py dump`")
    t.add_argument("--out", required=True, help="run directory: final model, checkpoints/, metrics.jsonl, args.json")
    t.add_argument("--eval-conversations", type=nano.at_least(0), default=0,
                   help="hold out the store's last N conversations: held-out CE and KL to the teacher")
    t.add_argument("--eval-store", default=None, help="a store of held-out conversations (instead of --eval-conversations)")
    # distillation (seed 003)
    t.add_argument("--kd-weight", type=nano.at_least(0.0, float), default=0.2, help="λ in CE + λ·w·KD (seed 003: 0.2)")
    t.add_argument("--kd-tail", choices=("bucket", "renorm"), default="bucket",
                   help="KL over the top-k plus a bucket with each side's remaining mass, or over the top-k renormalised")
    t.add_argument("--kd-weighting", choices=("seed", "slim", "constant"), default="seed",
                   help="w: seed 003's clamp(1 - exp(-s/(t+ε)), 0, 1), SLIM's 1 - exp(-p_t/p_s), or 1")
    t.add_argument("--temperature", type=float, default=1.0, help="T of the KL (the KD term is scaled by T²)")
    t.add_argument("--seed-eps", type=nano.at_least(0.0, float), default=1e-6, help="ε in the seed weighting")
    nano.add_finetuning_arguments(t)                               # as sft.py: --seq-len, --lr, LoRA, --save-every, ...
    args = parser.parse_args(argv)
    if args.command == "train":
        nano.check_scale_arguments(t, args)
        if args.temperature <= 0:
            t.error(f"--temperature must be positive, got {args.temperature}")
        if args.eval_store and args.eval_conversations:   # the held-out ones would be neither trained nor scored
            t.error("--eval-store and --eval-conversations each choose the held-out conversations: give one")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        dump(args) if args.command == "dump" else train(args)
    finally:
        nano.close_distributed()


if __name__ == "__main__":
    main()
