"""Continued pretraining with a KL term to a frozen reference: Vikhr's recipe for teaching an
English-oriented LLM a new language without making it forget what it knew.

    L = CE(P_model, data) + β · KL(P_model ‖ P_ref)          (Vikhr, Nikolich et al. 2024, Eq. 1)

P_ref is the frozen starting model (or any --kl-ref with the same vocabulary, or one whose vocabulary
is a prefix of the model's: see `kl_to_reference`). Plain continued pretraining makes the model forget
what it could do in English; in Vikhr's ablation the KL term gave both lower Russian perplexity and
better Russian benchmark scores. The optimiser defaults are Vikhr's Table 3 (AdamW lr 1e-3, betas
0.99/0.95, eps 1e-8, 10 warmup steps, micro-batch 3, accumulation 128, seq 1024).

    python pretrain.py --model runs/adapted --data ru.jsonl:0.8 en.txt:0.2 --out runs/pretrain
    torchrun --nproc_per_node 8 pretrain.py --model ... --data ... --out ...
    python pretrain.py --init-config tiny.json --tokenizer tok/ --kl-weight 0 --data en/ --out runs/base

Sections, in order:
  1. arguments
  2. data: documents read from .txt/.jsonl, tokenized once (multi-process) into a memmapped cache
  3. data: sources mixed by weight, packed into rows of --seq-len, sharded over ranks; held-out rows
  4. the loss: cross-entropy and KL to the reference, in fp32, a chunk of positions at a time
  5. model, reference, optimiser
  6. the training loop: accumulation, DDP, logging, held-out bits per byte, checkpoints, resume
"""
import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import (Config, Transformer, adamw, add_scale_arguments, at_least, cast_weights, check_scale_arguments,
                   checkpointed_chunks, clip_gradients, close_distributed, gpu_peak_flops, init_distributed,
                   jsonl_texts, latest_checkpoint, load_optimizer_state, load_placement, load_tokenizer,
                   load_trainer_state, lr_at, metrics_logger, parallelize, rename_durably, save_checkpoint,
                   set_grad_sync, temp_dir_beside, write_json_atomic)


# ------------------------------------------------------------------------------------------------
# 1. arguments
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # model: an HF checkpoint to continue, or a random init from a config.json
    p.add_argument("--model", metavar="DIR", help="start from this HF model directory")
    p.add_argument("--init-config", metavar="FILE",
                   help="start from random weights with this config.json (needs --tokenizer)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: --model's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype of the trained weights and optimiser state (default float32: fp32 master weights "
                        "under bf16 autocast; bfloat16 halves their memory at some cost in update precision)")
    # data
    p.add_argument("--data", nargs="+", required=True, metavar="PATH[:WEIGHT]",
                   help=".txt (documents separated by a blank line) or .jsonl (a 'text' field) files, or "
                        "directories of them; each PATH is one source, sampled in proportion to WEIGHT (default 1)")
    p.add_argument("--eval-data", nargs="*", default=[], metavar="PATH",
                   help="sources only evaluated, never trained on (e.g. English while training on Russian)")
    p.add_argument("--seq-len", type=at_least(1), default=1024, help="tokens per packed row (default %(default)s)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="the last this fraction of every file's tokens is held out (default %(default)s)")
    p.add_argument("--eval-tokens", type=at_least(1), default=131072,
                   help="held-out tokens per source scored for bits per byte (default %(default)s)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where tokenized corpora are cached (default: token_cache/ next to --out)")
    p.add_argument("--tokenize-workers", type=int, default=os.cpu_count(),
                   help="processes for tokenizing (default: all cores, %(default)s)")
    p.add_argument("--tokenize-only", action="store_true",
                   help="fill the token cache and exit (e.g. once before a multi-node torchrun)")
    # KL to the reference (Vikhr Eq. 1)
    p.add_argument("--kl-weight", type=at_least(0.0, float), default=1.0,
                   help="β in CE + β·KL; 0 turns the term off (default %(default)s)")
    p.add_argument("--kl-ref", metavar="DIR",
                   help="frozen reference model, held in the compute dtype (default: the starting --model); its "
                        "vocabulary must be the model's, or a prefix of it (the original model before "
                        "resize_vocab.py extended it: the new ids then count as one bucket in the KL)")
    p.add_argument("--kl-direction", default="reverse", choices=["reverse", "forward"],
                   help="reverse: KL(P_model‖P_ref) as in Eq. 1 (default); forward: KL(P_ref‖P_model)")
    # optimisation (defaults: Vikhr Table 3)
    p.add_argument("--train-only", default="all", choices=["all", "embeddings"],
                   help="train all weights (default), or only embed_tokens and lm_head")
    p.add_argument("--lr", type=at_least(0.0, float), default=1e-3, help="peak learning rate (default %(default)s)")
    p.add_argument("--min-lr-ratio", type=at_least(0.0, float), default=0.1,
                   help="cosine decay ends at this fraction of --lr (default %(default)s)")
    p.add_argument("--warmup-steps", type=at_least(0), default=10,
                   help="linear warmup, optimiser steps (default %(default)s)")
    p.add_argument("--max-steps", type=at_least(1),
                   help="optimiser steps (default: one pass over the training tokens of all sources)")
    p.add_argument("--batch-size", type=at_least(1), default=3, help="rows per micro-batch, per GPU (default %(default)s)")
    p.add_argument("--grad-accum", type=at_least(1), default=128,
                   help="micro-batches per optimiser step, per GPU; global batch = GPUs × this × --batch-size rows "
                        "(default %(default)s)")
    p.add_argument("--beta1", type=float, default=0.99, help="AdamW β1 (default %(default)s)")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW β2 (default %(default)s)")
    p.add_argument("--eps", type=float, default=1e-8, help="AdamW ε (default %(default)s)")
    p.add_argument("--weight-decay", type=at_least(0.0, float), default=0.0,
                   help="AdamW weight decay on matrices; not given in Vikhr Table 3 (default %(default)s)")
    p.add_argument("--grad-clip", type=at_least(0.0, float), default=1.0,
                   help="clip the global gradient norm to this; 0 = off (default %(default)s)")
    p.add_argument("--loss-chunk", type=at_least(1), default=1024,
                   help="positions whose fp32 logits exist at once in the loss (default %(default)s)")
    # system
    add_scale_arguments(p)                # --fsdp (the reference is sharded too), --cpu-offload, --compile, ...
    p.add_argument("--seed", type=int, default=0, help="seeds the random init and the data order (default %(default)s)")
    # output and logging
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run directory: final model (HF format), checkpoints/, metrics.jsonl, args.json")
    p.add_argument("--log-every", type=at_least(1), default=1, help="optimiser steps between log lines (default %(default)s)")
    p.add_argument("--eval-every", type=at_least(0), default=100,
                   help="optimiser steps between held-out evaluations; 0 = at the start and end only "
                        "(default %(default)s)")
    p.add_argument("--save-every", type=at_least(0), default=500,
                   help="optimiser steps between checkpoints; 0 = none (default %(default)s)")
    p.add_argument("--keep-checkpoints", type=at_least(1), default=2, help="newest checkpoints kept (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out: weights, optimiser, schedule, "
                        "data position, RNG")
    args = p.parse_args(argv)

    if (args.model is None) == (args.init_config is None):
        p.error("give exactly one of --model DIR and --init-config FILE")
    if args.init_config and not args.tokenizer:
        p.error("--init-config needs --tokenizer DIR")
    if args.init_config and args.kl_weight > 0 and not args.kl_ref:
        p.error("--init-config starts from random weights, which are no reference to stay close to: "
                "pass --kl-weight 0, or --kl-ref DIR")
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    check_scale_arguments(p, args)
    args.tokenizer = args.tokenizer or args.model
    args.cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "token_cache")
    return args


def parse_source(spec: str):
    """'PATH:WEIGHT' or 'PATH' -> (path, weight)."""
    path, _, weight = spec.rpartition(":")
    try:
        w = float(weight)
    except ValueError:
        return spec, 1.0
    if not path or not 0 < w < math.inf:
        raise ValueError(f"--data {spec}: the weight after ':' must be a positive, finite number")
    return path, w


def source_files(path: str) -> list[str]:
    """A .txt/.jsonl file, or every .txt/.jsonl file in a directory (sorted, so the order is stable)."""
    ok = (".txt", ".jsonl")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(ok))
        if not files:
            raise ValueError(f"{path}: no .txt or .jsonl files in this directory")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.endswith(ok):
        raise ValueError(f"{path}: expected a .txt or .jsonl file")
    return [path]


# ------------------------------------------------------------------------------------------------
# 2. data: documents, tokenized once into a memmapped cache
# ------------------------------------------------------------------------------------------------
CACHE_VERSION = 1


def read_documents(path):
    """The documents of one file: paragraphs separated by a blank line (.txt), or the 'text' field of
    each line (.jsonl). A .txt without blank lines is one document; packing cuts it into rows."""
    if path.endswith(".jsonl"):
        yield from (text for text in jsonl_texts(path) if text.strip())
        return
    try:
        with open(path, encoding="utf-8") as f:
            lines = []
            for line in f:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).rstrip("\n")
                    lines = []
            if lines:
                yield "".join(lines).rstrip("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def tokenizer_fingerprint(tok_path: str) -> str:
    """A hash of the tokenizer's files: a cache made with another tokenizer is never reused."""
    from model import TOKENIZER_FILES
    h = hashlib.sha256()
    paths = [tok_path] if os.path.isfile(tok_path) else \
        [os.path.join(tok_path, n) for n in sorted(TOKENIZER_FILES) if os.path.isfile(os.path.join(tok_path, n))]
    if not paths:
        raise FileNotFoundError(f"{tok_path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for path in paths:
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def cache_dir_for(path: str, tok_fp: str, cache_root: str) -> str:
    """token_cache/<file stem>-<hash of (path, size, mtime, tokenizer)>: an edited file is tokenized anew."""
    st = os.stat(path)
    key = json.dumps([CACHE_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns, tok_fp])
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_root, f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")


_worker_tokenizer = None


def _init_worker(tok_path):
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tok_path)


def encode_document(text: str) -> np.ndarray:
    """One document -> [BOS] ids [EOS] (BOS when the tokenizer has one, as Llama/Mistral were trained)."""
    tok = _worker_tokenizer
    return np.asarray(tok.encode(text, add_bos=tok.bos_id is not None, add_eos=True), dtype=np.int64)


class CacheWriter:
    """Writes tokens.npy (streamed: the .npy header is rewritten once the length is known),
    offsets.npy (document starts) and meta.json (last) into a temporary directory, then renames it
    into place, so a half-written cache is never taken for complete."""

    def __init__(self, final_dir: str, dtype, source: str):
        self.final_dir, self.dtype, self.source = final_dir, np.dtype(dtype), source
        self.tmp = temp_dir_beside(final_dir)    # (readable by others: the cache is shared by runs and users)
        self.f = open(os.path.join(self.tmp, "tokens.npy"), "wb")
        self.header_len = len(self._header(0))
        self.f.write(b"\0" * self.header_len)
        self.n_tokens, self.doc_starts, self.max_id = 0, [], -1

    def _header(self, n):
        import io
        buf = io.BytesIO()
        # numpy pads 1-D headers with room for the shape to grow, so the length does not depend on n
        np.lib.format.write_array_header_1_0(
            buf, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (n,)})
        return buf.getvalue()

    def add(self, ids: np.ndarray):
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"{self.source}: the tokenizer produced id {ids.max()}, which does not fit {self.dtype}")
        self.doc_starts.append(self.n_tokens)
        self.f.write(ids.astype(self.dtype).tobytes())
        self.n_tokens += ids.size
        self.max_id = max(self.max_id, int(ids.max()))

    def commit(self, meta: dict):
        header = self._header(self.n_tokens)
        assert len(header) == self.header_len, "npy header length changed"
        self.f.seek(0)
        self.f.write(header)
        self.f.close()
        np.save(os.path.join(self.tmp, "offsets.npy"), np.asarray(self.doc_starts + [self.n_tokens], dtype=np.int64))
        with open(os.path.join(self.tmp, "meta.json"), "w") as f:
            json.dump({**meta, "n_tokens": self.n_tokens, "n_docs": len(self.doc_starts), "max_id": self.max_id,
                       "dtype": self.dtype.name}, f, indent=2)
        try:
            rename_durably(self.tmp, self.final_dir)
        except OSError:                          # (a full disk or a quota shows in its fsync: raised)
            if not os.path.isdir(self.final_dir):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)   # another process (another node) finished it first

    def discard(self):
        self.f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def tokenize_files(files, tok_path, cache_dirs, workers, vocab_size, batch_chars=64 << 20):
    """Tokenize `files` into their caches: documents of all files are fed to a process pool in
    batches of ~batch_chars characters (so a directory of one-document books still uses every
    worker, and a 100 GB jsonl never sits in memory), results come back in order."""
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    pool = multiprocessing.Pool(workers, _init_worker, (tok_path,)) if workers > 1 else None
    if pool is None:
        _init_worker(tok_path)
    sizes = [os.path.getsize(f) for f in files]
    done_bytes = dict(zip(files, np.cumsum(sizes).tolist()))           # bytes read once each file is done
    bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, desc="tokenizing")
    writer = None

    def documents():
        for i, path in enumerate(files):
            n = 0
            for text in read_documents(path):
                n += 1
                yield i, text
            if n == 0:
                raise ValueError(f"{path}: no text (empty corpus)")

    def finish():                      # the current file is complete: its cache moves into place
        nonlocal writer
        if writer is not None:
            writer.commit({"source": os.path.abspath(writer.source), "tokenizer": os.path.abspath(tok_path),
                           "version": CACHE_VERSION})
            bar.update(done_bytes[writer.source] - bar.n)      # count the blank lines between documents too
            writer = None

    def write(batch):
        nonlocal writer
        texts = [t for _, t in batch]
        ids_list = pool.map(encode_document, texts, chunksize=max(1, len(texts) // (4 * workers))) \
            if pool else [encode_document(t) for t in texts]
        for (i, text), ids in zip(batch, ids_list):
            if writer is None or writer.source != files[i]:
                finish()
                writer = CacheWriter(cache_dirs[files[i]], dtype, files[i])
            writer.add(ids)
            bar.update(len(text.encode("utf-8")))

    try:
        batch, chars = [], 0
        for i, text in documents():
            batch.append((i, text))
            chars += len(text)
            if chars >= batch_chars:
                write(batch)
                batch, chars = [], 0
        write(batch)
        finish()
    finally:
        bar.close()
        if writer is not None:
            writer.discard()
        if pool is not None:
            pool.terminate()


class TokenFile:
    """One tokenized file: tokens (n,) and document starts (n_docs + 1,), memmapped. Tokens
    [0, n_train) are for training; the rest is the held-out split."""

    def __init__(self, path, cache_dir, val_fraction):
        self.path = path
        self.tokens = np.load(os.path.join(cache_dir, "tokens.npy"), mmap_mode="r")
        self.offsets = np.load(os.path.join(cache_dir, "offsets.npy"), mmap_mode="r")
        with open(os.path.join(cache_dir, "meta.json")) as f:
            self.meta = json.load(f)
        n = len(self.tokens)
        self.n_train = n - int(n * val_fraction)


class TokenStream:
    """One range of tokens of each of a source's files, back to back: the stream that rows are cut from.
    Rows cross file boundaries, so a directory of files each shorter than a row (one article per
    file) trains like one long file; a file's start is a document start like any other."""

    def __init__(self, files, ranges):
        self.files, self.ranges = files, ranges                                   # [TokenFile], [(lo, hi)]
        self.starts = np.cumsum([0] + [hi - lo for lo, hi in ranges])             # (F + 1,) stream position of each
        self.n_tokens = int(self.starts[-1])
        self.first_doc = np.cumsum([0] + [len(tf.offsets) for tf in files])     # documents numbered across files

    def row(self, start: int, seq_len: int):
        """Stream tokens [start, start + T + 1) -> input ids, doc ids, labels, each (T,) int64.
        A label that belongs to another document than its input is -100: no row learns to guess
        the first token of an unrelated document (with a BOS it would be a free guess anyway)."""
        tokens, docs = [], []
        f = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos, end = start, start + seq_len + 1
        while pos < end:                                                          # each file the row spans
            tf, lo = self.files[f], self.ranges[f][0] - self.starts[f]            # stream -> file position
            a, b = lo + pos, lo + min(end, self.starts[f + 1])                    # file tokens [a, b)
            tokens.append(np.asarray(tf.tokens[a:b], dtype=np.int64))
            docs.append(self.first_doc[f] + np.searchsorted(tf.offsets, np.arange(a, b), side="right") - 1)
            pos, f = pos + b - a, f + 1
        window, doc = np.concatenate(tokens), np.concatenate(docs)                # (T+1,) each
        labels = np.where(doc[1:] == doc[:-1], window[1:], -100)
        return window[:-1], np.unique(doc[:-1], return_inverse=True)[1], labels   # doc ids 0, 1, 2, ...


def wait_for(path: str, what: str):
    """Other ranks wait for the local rank 0 to finish a cache (polling the disk, so a long
    tokenization never runs into a collective-communication timeout)."""
    waited = 0
    while not os.path.exists(path):
        if waited % 60 == 0:
            print(f"[rank {os.environ.get('RANK', 0)}] waiting for {what}", flush=True)
        time.sleep(1)
        waited += 1


def load_sources(specs, tok, args, writer: bool, with_weights=True, names=None):
    """--data specs -> list of (name, [TokenFile], weight), tokenizing files that have no cache yet.
    names: the source names already taken (by --data, when loading --eval-data), which a new
    source's name must not repeat: one name is one line of metrics."""
    tok_fp = tokenizer_fingerprint(args.tokenizer)
    sources, names = [], names if names is not None else set()
    for spec in specs:
        path, weight = parse_source(spec) if with_weights else (spec, 1.0)
        files = source_files(path)
        name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        while name in names:
            name += "_"
        names.add(name)
        sources.append((name, files, weight))
    all_files = [f for _, files, _ in sources for f in files]
    cache_dirs = {f: cache_dir_for(f, tok_fp, args.cache_dir) for f in all_files}
    todo = sorted({f for f in all_files if not os.path.isfile(os.path.join(cache_dirs[f], "meta.json"))},
                  key=all_files.index)
    if todo and writer:
        tokenize_files(todo, args.tokenizer, cache_dirs, max(1, args.tokenize_workers), tok.vocab_size)
    for f in todo:
        wait_for(os.path.join(cache_dirs[f], "meta.json"), f"the token cache of {f}")
    return [(name, [TokenFile(f, cache_dirs[f], args.val_fraction) for f in files], weight)
            for name, files, weight in sources]


# ------------------------------------------------------------------------------------------------
# 3. data: mixing, packing, sharding, the held-out rows
# ------------------------------------------------------------------------------------------------
def training_stream(files):
    return TokenStream(files, [(0, tf.n_train) for tf in files])


def held_out_stream(files):
    return TokenStream(files, [(tf.n_train, len(tf.tokens)) for tf in files])


class PackedMixture:
    """Global batches of packed rows drawn from several sources by weight.

    A row of a source is tokens [k·T, k·T + T + 1) of its training stream (its files' training
    ranges back to back): T inputs and T shifted targets, documents back to back with EOS between
    them (attention is kept inside each document by the doc ids). Each source's rows are visited
    in a fresh random order every epoch. The batch of step s depends only on (seed, s, rows taken
    so far per source), so every rank computes the same global batch and takes its own slice, and
    a resumed run continues from exactly the same place.
    """

    def __init__(self, sources, seq_len, seed):
        self.streams = [training_stream(files) for _, files, _ in sources]
        self.rows_per_source = [(st.n_tokens - 1) // seq_len for st in self.streams]
        for (name, files, _), st, n_rows in zip(sources, self.streams, self.rows_per_source):
            if n_rows == 0:
                raise ValueError(f"source '{name}' ({files[0].path}...) has {st.n_tokens} training tokens, "
                                 f"fewer than one row of --seq-len {seq_len} + 1")
        self.p = np.asarray([weight for _, _, weight in sources], dtype=np.float64)
        self.p /= self.p.sum()
        self.seq_len, self.seed = seq_len, seed
        self.rows_taken = [0] * len(sources)                   # the data position
        self._order = {}                                       # source index -> (epoch, permutation)

    def _row_start(self, i, k):
        epoch, j = divmod(k, self.rows_per_source[i])
        if self._order.get(i, (None,))[0] != epoch:
            perm = np.random.default_rng([self.seed, i, epoch]).permutation(self.rows_per_source[i])
            self._order[i] = (epoch, perm)
        return int(self._order[i][1][j]) * self.seq_len

    def global_batch(self, step, n_rows):
        """The rows of optimiser step `step`: a list of (source index, start token)."""
        which = np.random.default_rng([self.seed, step]).choice(len(self.streams), size=n_rows, p=self.p)
        rows = []
        for i in which.tolist():
            rows.append((i, self._row_start(i, self.rows_taken[i])))
            self.rows_taken[i] += 1
        return rows

    def load(self, rows):
        """[(source index, start)] -> input ids, doc ids, labels, each (B, T) int64 tensors."""
        parts = [self.streams[i].row(start, self.seq_len) for i, start in rows]
        return [torch.from_numpy(np.stack(x)) for x in zip(*parts)]

    def state_dict(self):
        return {"rows_taken": list(self.rows_taken)}

    def load_state_dict(self, state):
        self.rows_taken = list(state["rows_taken"])


def held_out_rows(files, seq_len, max_tokens):
    """Rows of T+1 tokens of a source's held-out stream (each file's held-out range, back to back),
    at most max_tokens in all, spread evenly over the stream so every file has its share:
    [(TokenStream, start)]."""
    stream = held_out_stream(files)
    available = max(0, (stream.n_tokens - 1) // seq_len)
    take = min(available, max(1, max_tokens // seq_len))
    return [(stream, k * available // take * seq_len) for k in range(take)]


def count_bytes(tok, rows, seq_len):
    """UTF-8 bytes of the text of the tokens scored in these rows (valid labels), for bits per byte.
    Decoded one document piece at a time; EOS/BOS decode to nothing. (SentencePiece drops the
    space of a piece's leading "▁" at the start of a decode: at most a byte per piece, ~0.1%.)"""
    n = 0
    for stream, start in rows:
        _, doc, labels = stream.row(start, seq_len)
        doc_of_label = np.where(labels >= 0, doc, -1)
        for d in np.unique(doc_of_label[doc_of_label >= 0]):
            n += len(tok.decode(labels[doc_of_label == d].tolist()).encode("utf-8"))
    return n


# ------------------------------------------------------------------------------------------------
# 4. the loss: cross-entropy and KL to the reference, in fp32, a chunk of positions at a time
# ------------------------------------------------------------------------------------------------
def at_least_fp32(x):
    """bf16/fp16 logits are upcast for the softmax; fp32 stays, and so does fp64 (gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kl_to_reference(logits, ref_logits, direction="reverse", shared=None):
    """Per-position KL divergence in fp32. logits (N, V) of the model, ref_logits (N, V) -> (N,).

    reverse: KL(P_model ‖ P_ref) = Σ q (log q − log p)   (Vikhr Eq. 1; mode-seeking)
    forward: KL(P_ref ‖ P_model) = Σ p (log p − log q)

    shared (extend mode): ids >= shared are new pieces the original reference never had. They are
    collapsed into one bucket on both sides, so the KL sees the shared ids plus "some new piece":
    it constrains how much mass goes to new pieces in total, but not how that mass is split among
    them (the reference knows nothing about individual new pieces).
    """
    logq = F.log_softmax(at_least_fp32(logits), dim=-1)         # (N, V)
    logp = F.log_softmax(at_least_fp32(ref_logits), dim=-1)     # (N, V)
    if shared is not None:                                  # (N, V) -> (N, shared + 1)
        logq = torch.cat([logq[:, :shared], logq[:, shared:].logsumexp(-1, keepdim=True)], dim=-1)
        logp = torch.cat([logp[:, :shared], logp[:, shared:].logsumexp(-1, keepdim=True)], dim=-1)
    if direction == "reverse":
        return (logq.exp() * (logq - logp)).sum(-1)
    if direction == "forward":
        return (logp.exp() * (logp - logq)).sum(-1)
    raise ValueError(f"KL direction {direction!r}: expected 'reverse' or 'forward'")


def _chunk_loss_sums(h, h_ref, labels, head, ref_head, direction, shared):
    """One chunk: h (C, d), h_ref (C, d) or None, labels (C,) -> (CE sum, KL sum), fp32 scalars."""
    logits = at_least_fp32(head(h))                                  # (C, V)
    ce = F.cross_entropy(logits, labels, reduction="sum")
    if h_ref is None:
        return ce, torch.zeros((), device=h.device, dtype=ce.dtype)
    with torch.no_grad():
        ref_logits = at_least_fp32(ref_head(h_ref))                  # (C, V)
    return ce, kl_to_reference(logits, ref_logits, direction, shared).sum()


def loss_sums(hidden, labels, head, hidden_ref=None, ref_head=None, direction="reverse", shared=None,
              chunk=1024):
    """Summed CE over valid labels, and summed KL at the same positions.

    hidden (B, T, d), labels (B, T) with -100 where nothing is scored; hidden_ref (B, T, d) or None.
    Logits exist only a chunk of positions at a time: with autograd on, each chunk is checkpointed,
    so its (chunk, V) fp32 logits are recomputed in the backward pass instead of kept, and B×T×V
    is never held in fp32 at all.
    """
    valid = (labels != -100).reshape(-1)
    h = hidden.reshape(-1, hidden.shape[-1])[valid]                  # (N, d)
    y = labels.reshape(-1)[valid]                                    # (N,)
    h_ref = hidden_ref.reshape(-1, hidden_ref.shape[-1])[valid] if hidden_ref is not None else None
    ce = kl = torch.zeros((), device=hidden.device, dtype=torch.promote_types(hidden.dtype, torch.float32))
    for c, k in checkpointed_chunks(_chunk_loss_sums, h, h_ref, y, head, ref_head, direction, shared, chunk=chunk):
        ce, kl = ce + c, kl + k
    return ce, kl


# ------------------------------------------------------------------------------------------------
# 5. model, reference, optimiser
# ------------------------------------------------------------------------------------------------
def build_start_model(args, tok, device, dtype):
    """The model training starts from: an HF checkpoint, or random weights from a config.json."""
    if args.model:
        return Transformer.from_pretrained(args.model, device=device, dtype=dtype)
    cfg = Config.from_file(args.init_config)
    if cfg.vocab_size < tok.vocab_size:
        raise ValueError(f"{args.init_config}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
                         f"{tok.vocab_size} pieces ({args.tokenizer})")
    cfg.bos_token_id = tok.bos_id if cfg.bos_token_id is None else cfg.bos_token_id
    cfg.eos_token_id = tok.eos_id if cfg.eos_token_id is None else cfg.eos_token_id
    torch.manual_seed(args.seed)          # the same init on every rank
    with torch.device(device):
        model = Transformer(cfg)
    model.init_weights()
    return cast_weights(model, dtype)


def vocab_relation(ref_pieces, model_pieces, ref_rows, model_rows, ref_dir, model_dir):
    """How the reference's vocabulary relates to the model's: None (identical, plain KL), or the
    number of shared leading ids (extend mode: the reference's pieces are a prefix of the model's)."""
    if ref_pieces == model_pieces and ref_rows == model_rows:
        return None
    if len(ref_pieces) <= len(model_pieces) and model_pieces[:len(ref_pieces)] == ref_pieces:
        return len(ref_pieces)
    first = next((i for i, (a, b) in enumerate(zip(ref_pieces, model_pieces)) if a != b),
                 min(len(ref_pieces), len(model_pieces)))
    a = ref_pieces[first] if first < len(ref_pieces) else "(none)"
    b = model_pieces[first] if first < len(model_pieces) else "(none)"
    raise ValueError(f"--kl-ref {ref_dir}: its vocabulary ({len(ref_pieces)} pieces) is neither the model's "
                     f"({model_dir}, {len(model_pieces)} pieces) nor a prefix of it; first difference at id "
                     f"{first}: {a!r} vs {b!r}. A KL needs the same pieces at the same ids.")


def build_reference(args, start, tok, compute_dtype, placement):
    """The frozen reference: --kl-ref, or the starting model; no grad, loaded as `placement` says (see
    load_placement: in compute_dtype, or under FSDP as stored until parallelize() casts it).
    Returns (reference, shared) with shared as in `kl_to_reference`."""
    ref_dir = args.kl_ref or args.model
    ref = Transformer.from_pretrained(ref_dir, **placement)
    ref_tok = load_tokenizer(ref_dir) if args.kl_ref else tok
    shared = vocab_relation(ref_tok.pieces(), tok.pieces(), ref.config.vocab_size, start.config.vocab_size,
                            ref_dir, args.tokenizer)
    if shared is not None:
        # Extend mode: the reference must read the new ids in the input and give them some
        # probability (else the reverse KL is infinite): both come from the starting model's rows
        # for those ids (resize_vocab's initialisation), copied once and frozen.
        with torch.no_grad():               # (in compute_dtype: under FSDP both may still be as stored)
            embed = torch.cat([ref.model.embed_tokens.weight[:shared].to(compute_dtype),
                               start.model.embed_tokens.weight[shared:].to(compute_dtype)])
            head = None if ref.config.tie_word_embeddings else \
                torch.cat([ref.lm_head.weight[:shared].to(compute_dtype),
                           start.lm_head.weight[shared:].to(compute_dtype)])
            ref.set_vocab(embed, head)
    ref.eval().requires_grad_(False)
    return ref, shared


# ------------------------------------------------------------------------------------------------
# 6. the training loop
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_bpb(model, eval_sets, batch_size, seq_len, device, autocast, rank, world, chunk):
    """Held-out bits per byte per source: NLL in bits over the UTF-8 bytes of the scored tokens.
    Batches are dealt out over ranks and the sums all-reduced; every rank runs the same number of
    forward passes (FSDP gathers weights in each), the spare ones on a row whose loss is dropped."""
    import torch.distributed as dist
    model.eval()
    nll = torch.zeros(len(eval_sets), dtype=torch.float64, device=device)
    for s, (_, rows, _) in enumerate(eval_sets):
        for m in range(math.ceil(len(rows) / (batch_size * world))):
            mine = rows[(m * world + rank) * batch_size:(m * world + rank + 1) * batch_size]
            parts = [stream.row(start, seq_len) for stream, start in (mine or rows[:1])]
            x, d, y = (torch.from_numpy(np.stack(t)).to(device) for t in zip(*parts))
            with autocast:
                h = model(x, doc_ids=d, return_hidden=True)                   # (B, T, d)
                ce, _ = loss_sums(h, y, model.lm_head, chunk=chunk)
            if mine:
                nll[s] += ce.double()
    if world > 1:
        dist.all_reduce(nll)
    model.train()
    return {name: nll[s].item() / math.log(2) / n_bytes for s, (name, _, n_bytes) in enumerate(eval_sets)}


def rng_state(device):
    """RNG states as tensors (trainer_state.pt is read back with weights_only=True). Nothing in a
    training step draws random numbers today; kept so a fork that adds dropout resumes exactly."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.zeros(0, dtype=torch.uint8)}


# what fixes the rows of every step: a resumed run must agree on these with its checkpoint
RESUME_MUST_MATCH = ("data", "seq_len", "seed", "val_fraction", "global_rows", "data_layout")
DATA_LAYOUT = "a token stream per source"      # the data position counts rows per source (before: per file)


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    finally:
        close_distributed()


def train(args):
    env_rank, env_local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))

    def log(msg):                              # rank 0 only; above the progress bar, never through it
        if env_rank == 0:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()

    # -- data, before the process group exists: a long tokenization must not hit its timeout --------
    tok = load_tokenizer(args.tokenizer)
    if tok.eos_id is None:
        raise ValueError(f"{args.tokenizer}: the tokenizer has no EOS token "
                         "(documents are packed with EOS between them)")
    names = set()
    train_sources = load_sources(args.data, tok, args, writer=env_local_rank == 0, names=names)
    eval_only = load_sources(args.eval_data, tok, args, writer=env_local_rank == 0, with_weights=False, names=names)
    if args.tokenize_only:
        log(f"token caches ready in {args.cache_dir}")
        return
    ckpt = latest_checkpoint(args.out)
    if ckpt and not args.resume:
        raise ValueError(f"{args.out} already holds checkpoints ({ckpt}): pass --resume to continue, "
                         "or choose another --out")

    rank, local_rank, world, device = init_distributed()
    import torch.distributed as dist
    cuda = device.type == "cuda"
    param_dtype = getattr(torch, args.dtype)                    # "float32" -> torch.float32
    compute_dtype = torch.bfloat16 if cuda else torch.float32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    B, A, T = args.batch_size, args.grad_accum, args.seq_len
    global_rows = world * A * B

    # -- model and reference -----------------------------------------------------------------------
    placement = load_placement(device, param_dtype, args.fsdp)                   # FSDP: CPU, mmap, as stored
    raw = build_start_model(args, tok, **placement)
    V = raw.config.vocab_size
    for _, files, _ in train_sources + eval_only:
        for tf in files:
            if tf.meta["max_id"] >= V:
                raise ValueError(f"{tf.path}: token id {tf.meta['max_id']} is outside the model's vocabulary "
                                 f"of {V} rows (tokenizer {args.tokenizer} has {tok.vocab_size} pieces); "
                                 "resize the model's vocabulary first (resize_vocab.py)")
    ref, shared = build_reference(args, raw, tok, compute_dtype, load_placement(device, compute_dtype, args.fsdp)) \
        if args.kl_weight > 0 else (None, None)

    start_step, state = 0, None
    if ckpt:
        del raw                   # the reference has taken what it needs from the starting model
        raw = Transformer.from_pretrained(ckpt, **placement)
        state = load_trainer_state(ckpt)
        start_step = state["step"]
    elif args.resume:
        log(f"--resume: no checkpoint in {args.out} yet, starting from step 0")
    if args.train_only == "embeddings":
        for name, p in raw.named_parameters():
            p.requires_grad_(name in ("model.embed_tokens.weight", "lm_head.weight"))
    raw.train()
    # MFU counts the reference's forward pass too
    flops_per_token = raw.flops_per_token(T) + (ref.flops_per_token(T, forward_only=True) if ref is not None else 0)
    # DDP or FSDP2 under torchrun; `raw` itself (on `device`) otherwise
    model = parallelize(raw, device, dtype=param_dtype, fsdp=args.fsdp, cpu_offload=args.cpu_offload,
                        compile=args.compile, activation_checkpointing=args.activation_checkpointing)
    if ref is not None:
        ref = parallelize(ref, device, dtype=compute_dtype, fsdp=args.fsdp)   # sharded under FSDP, whole under DDP
    trained = [p for p in raw.parameters() if p.requires_grad]  # (after FSDP swapped in its sharded parameters)
    optimizer = adamw(raw, args.lr, (args.beta1, args.beta2), args.weight_decay, args.eps)

    # -- data order and held-out rows --------------------------------------------------------------
    data = PackedMixture(train_sources, T, args.seed)
    eval_sets = []
    for name, files, _ in train_sources + eval_only:
        rows = held_out_rows(files, T, args.eval_tokens)
        if rows:
            eval_sets.append((name, rows, count_bytes(tok, rows, T)))
        else:
            log(f"note: source '{name}' has no held-out row of {T + 1} tokens (raise --val-fraction); not evaluated")
    train_tokens = sum(tf.n_train for _, files, _ in train_sources for tf in files)
    max_steps = args.max_steps or max(1, train_tokens // (global_rows * T))

    # -- resume ------------------------------------------------------------------------------------
    run_args = {**vars(args), "data_layout": DATA_LAYOUT, "world_size": world, "global_rows": global_rows,
                "tokens_per_step": global_rows * T, "max_steps": max_steps, "train_tokens": train_tokens,
                "kl_extend_shared_ids": shared,
                "eval_sources": {name: {"rows": len(rows), "bytes": n} for name, rows, n in eval_sets}}
    if state is not None:
        for key in RESUME_MUST_MATCH:
            if state["args"].get(key) != run_args[key]:          # (None: a checkpoint from before the key)
                raise ValueError(f"--resume: '{key}' was {state['args'].get(key)!r} in {ckpt}, now {run_args[key]!r}; "
                                 "the data position would not mean the same rows")
        load_optimizer_state(model, optimizer, ckpt)
        data.load_state_dict(state["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if cuda and state["rng"]["cuda"].numel():
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        log(f"resumed from {ckpt} at step {start_step}")

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        print(json.dumps(run_args, indent=2), flush=True)
        write_json_atomic(os.path.join(args.out, "args.json"), run_args)
    record = metrics_logger(args.out, start_step)

    def evaluate(step):
        bpb = evaluate_bpb(raw, eval_sets, B, T, device, autocast, rank, world, args.loss_chunk)
        if bpb:
            log(f"step {step}: held-out bits/byte " + ", ".join(f"{k} {v:.4f}" for k, v in bpb.items()))
            record({"step": step, **{f"val_bpb/{k}": v for k, v in bpb.items()}})

    def checkpoint(step):
        save_checkpoint(args.out, step, model, optimizer, {                  # every rank (see its docstring)
            "step": step, "data": data.state_dict(), "rng": rng_state(device),
            "args": {k: run_args[k] for k in RESUME_MUST_MATCH}},
            tokenizer_dir=args.tokenizer, keep=args.keep_checkpoints)

    peak = gpu_peak_flops(device)
    kill_at = int(os.environ.get("NANOADAPT_KILL_AT_STEP", 0))   # for the tests: die hard at this step
    bar = tqdm(total=max_steps, initial=start_step, disable=rank != 0, desc="pretrain", dynamic_ncols=True)
    if start_step == 0:
        evaluate(0)
    train_time, tokens_since = 0.0, 0          # tokens/s counts training steps only, not evaluation or saving
    for step in range(start_step + 1, max_steps + 1):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        t_step = time.perf_counter()
        # this rank's slice of the global batch, as A micro-batches of B rows
        rows = data.global_batch(step, global_rows)[rank * A * B:(rank + 1) * A * B]
        micro = [data.load(rows[i * B:(i + 1) * B]) for i in range(A)]       # A × [x, doc ids, y], (B, T) each
        # the loss is the sum over the valid labels of the whole global batch divided by their
        # number: count them first (on the CPU: no wait for the GPU), then each micro-batch adds
        # its summed loss / count
        n_valid = torch.tensor(float(sum((y != -100).sum().item() for _, _, y in micro)), device=device)
        micro = [[t.to(device) for t in batch] for batch in micro]
        if world > 1:
            dist.all_reduce(n_valid)
        lr = lr_at(step - 1, args.lr, args.warmup_steps, max_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

        sums = torch.zeros(2, device=device)                                  # CE sum, KL sum
        for i, (x, d, y) in enumerate(micro):
            set_grad_sync(model, i == A - 1)                                  # DDP: all-reduce on the last
            with autocast:
                h = model(x, doc_ids=d, return_hidden=True)                   # (B, T, d)
                h_ref = None
                if ref is not None:
                    with torch.no_grad():
                        h_ref = ref(x, doc_ids=d, return_hidden=True)         # (B, T, d)
                ce, kl = loss_sums(h, y, raw.lm_head, h_ref, ref.lm_head if ref is not None else None,
                                   args.kl_direction, shared, args.loss_chunk)
            # DDP averages gradients over ranks; × world turns that average back into the global sum
            ((ce + args.kl_weight * kl) * (world / n_valid)).backward()
            sums += torch.stack([ce.detach(), kl.detach()])
        if world > 1:
            dist.all_reduce(sums)
        ce_mean, kl_mean = (sums / n_valid).tolist()
        loss = ce_mean + args.kl_weight * kl_mean
        if not math.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {loss} (CE {ce_mean}, KL {kl_mean}); the weights were "
                                     f"not updated. Lower --lr, or resume from the last checkpoint in {args.out}")
        grad_norm = clip_gradients(trained, args.grad_clip)
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"step {step}: gradient norm is {grad_norm}; the weights were not updated")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_since += global_rows * T
        train_time += time.perf_counter() - t_step
        bar.update(1)

        if step % args.log_every == 0 or step == max_steps:
            tok_s = tokens_since / train_time
            mfu = flops_per_token * tok_s / world / peak if peak else None
            record({"step": step, "loss": loss, "ce": ce_mean, "kl": kl_mean, "lr": lr,
                    "grad_norm": grad_norm, "tokens_per_s": tok_s, "mfu": mfu})
            log(f"step {step}/{max_steps} | loss {loss:.4f} | ce {ce_mean:.4f} | kl {kl_mean:.4f} | lr {lr:.2e} | "
                f"grad norm {grad_norm:.3f} | {tok_s:,.0f} tok/s"
                + (f" | mfu {mfu:.1%}" if mfu is not None else ""))
            train_time, tokens_since = 0.0, 0
        if args.eval_every and step % args.eval_every == 0 and step != max_steps:
            evaluate(step)
        if args.save_every and step % args.save_every == 0 and step != max_steps:
            checkpoint(step)
    bar.close()
    if start_step < max_steps:
        evaluate(max_steps)
    # into the run directory itself, next to checkpoints/ and metrics.jsonl (which stay). Every rank calls
    # it: rank 0 writes, or under FSDP every rank writes its part.
    raw.save_pretrained(args.out, tokenizer_dir=args.tokenizer, dtype=args.save_dtype)
    log(f"saved the final model to {args.out}")
    if world > 1:
        dist.barrier()


if __name__ == "__main__":
    main()
