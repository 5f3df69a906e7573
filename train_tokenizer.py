"""
Train a target-language SentencePiece tokenizer for an LLM and measure how much it shortens the text.

An English-oriented tokenizer spells a Russian word with many short pieces: "Машинное обучение изменяет мир"
is 13 Mistral tokens and 6-7 with an adapted tokenizer (Vikhr, Nikolich et al. 2024, Table 1); ruadapt
(Tikhomirov & Chernyshev 2023) measured 2.44 -> 3.77 Russian characters per token for Mistral's. Fewer tokens
mean faster generation and a longer effective context. resize_vocab.py then gives the vocabulary to a model.

The options are the ones that suit an LLM tokenizer, as in Llama/Mistral's: BPE (unigram on request), byte
fallback (no character is ever unknown), digits split one by one, identity normalization and no whitespace
collapsing (code and indentation survive), "▁" prepended to the text (add_dummy_prefix, as Llama's), and the
chat special tokens reserved as single pieces.

Writes --out/: tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json (so that
transformers' AutoTokenizer loads the directory and encodes exactly as sentencepiece), and
train_tokenizer.json (the arguments and the efficiency table). The directory appears whole or not at all.

    python train_tokenizer.py --input ../shared/data/ru ../shared/data/en:0.3 --out runs/tok40k \
        --eval-text held_out_ru.txt --compare ../shared/data/base_tokenizers/llama2-32k-bpe.model
"""

import argparse
import io
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import sentencepiece as spm
from tqdm import tqdm

from atomic_files import replace_dir
from tokenizer import jsonl_texts, load_tokenizer, write_hf_tokenizer_files

TABLE1_SENTENCE = "Машинное обучение изменяет мир"  # Vikhr Table 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--input", nargs="+", required=True, metavar="PATH[:WEIGHT]",
                   help=".txt (a line is a training sentence) or .jsonl (field 'text') files, or directories of them; WEIGHT is how many "
                        "times each line is used on average: 0.3 keeps 30%% of the lines at random, 2 uses each twice")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="lines sentencepiece samples (reservoir sampling, so the corpus may exceed memory); 0 = all")
    p.add_argument("--max-line-chars", type=int, default=4000,
                   help="longer lines are cut at a space into pieces of at most this many characters")
    p.add_argument("--seed", type=int, default=0, help="seed for line sampling and sentencepiece")
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=40000, help="pieces in the vocabulary (Vikhr: 40000)")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe", help="bpe: Llama/Mistral's type")
    p.add_argument("--character-coverage", type=float, default=0.9999,
                   help="share of the characters in the data that get a piece; the rarest go to byte fallback")
    p.add_argument("--special-tokens", nargs="*", default=["<|im_start|>", "<|im_end|>"],
                   help="tokens reserved as single pieces right after <unk> <s> </s> (chat-template markers)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="sentencepiece training threads")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's own training log")
    # evaluation
    p.add_argument("--eval-text", nargs="*", default=[], help="held-out .txt/.jsonl files for the efficiency table")
    p.add_argument("--eval-chars", type=int, default=2_000_000, help="characters read from each --eval-text file")
    p.add_argument("--compare", nargs="*", default=[],
                   help="base tokenizers to compare with: model directories or SentencePiece .model files")
    # output
    p.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    args = p.parse_args(argv)
    if args.vocab_size < 3 + len(args.special_tokens) + 256 + 1:
        p.error(f"--vocab-size {args.vocab_size} is too small for <unk> <s> </s>, the special tokens and 256 bytes")
    if 0 < args.input_sentence_size <= 100 or args.input_sentence_size < 0:
        p.error(f"--input-sentence-size must be 0 (all lines) or more than 100 (sentencepiece's minimum), "
                f"got {args.input_sentence_size}")
    for flag in ("max_line_chars", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    return args


# ------------------------------------------------------------------------------------------------------------------
# reading the corpus


def parse_input(spec):
    """"path" or "path:weight" -> [(Path, float)]; a directory stands for its .txt/.jsonl files (sorted)."""
    path, weight = spec, 1.0
    if ":" in spec and not Path(spec).exists():
        path, w = spec.rsplit(":", 1)
        try:
            weight = float(w)
        except ValueError:
            raise SystemExit(f"--input {spec}: weight {w!r} is not a number") from None
    if not 0 <= weight < math.inf:                     # (nan fails both)
        raise SystemExit(f"--input {spec}: weight must be a finite number >= 0")
    if Path(path).is_dir():
        files = sorted(f for f in Path(path).rglob("*") if f.suffix in (".txt", ".jsonl") and f.is_file())
        if not files:
            raise SystemExit(f"--input {spec}: directory {path} holds no .txt or .jsonl file")
        return [(f, weight) for f in files]
    if not Path(path).is_file():
        raise SystemExit(f"--input {spec}: file {path} not found")
    return [(Path(path), weight)]


def read_texts(path):
    """Yield the texts of a .txt file (the whole file) or a .jsonl file (field 'text' of each line), streaming."""
    if path.suffix == ".jsonl":
        try:
            yield from jsonl_texts(path)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    else:
        try:
            with open(path, encoding="utf-8") as f:
                yield from f  # line by line: never the whole file in memory
        except UnicodeDecodeError as e:
            raise SystemExit(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def split_long(line, max_chars):
    """Cut a line into pieces of at most max_chars, at the last space before the limit when there is one."""
    while len(line) > max_chars:
        cut = line.rfind(" ", 0, max_chars)
        cut = cut if cut > 0 else max_chars
        yield line[:cut]
        line = line[cut:]
    if line:
        yield line


def training_lines(inputs, max_chars, rng, progress=None):
    """Yield the training sentences: each non-empty line of each input, used `weight` times on average."""
    for path, weight in inputs:
        for text in read_texts(path):
            for line in text.split("\n"):
                line = line.rstrip("\r")
                if not line.strip():
                    continue
                # weight 2.3: twice, plus once more with probability 0.3
                for _ in range(int(weight) + (rng.random() < weight - int(weight))):
                    yield from split_long(line, max_chars)
                if progress is not None:
                    progress.update(1)


# ------------------------------------------------------------------------------------------------------------------
# training


def train(args):
    """Train the SentencePiece model; returns its serialized bytes."""
    inputs = [pair for s in args.input for pair in parse_input(s)]
    if not any(weight > 0 for _, weight in inputs):
        raise SystemExit("--input: every weight is 0, so there is no line to train on")
    rng = random.Random(args.seed)
    spm.set_random_generator_seed(args.seed)
    model = io.BytesIO()
    with tqdm(desc="reading input lines", unit=" lines", file=sys.stderr) as progress:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=training_lines(inputs, args.max_line_chars, rng, progress),
                model_writer=model,
                model_type=args.model_type,
                vocab_size=args.vocab_size,
                character_coverage=args.character_coverage,
                input_sentence_size=args.input_sentence_size,
                shuffle_input_sentence=True,
                max_sentence_length=4 * args.max_line_chars + 16,  # bytes; a Cyrillic letter is 2, a CJK one 3
                byte_fallback=True,
                split_digits=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=True,
                allow_whitespace_only_pieces=True,  # runs of spaces (code indentation) become pieces
                unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # Llama's layout: <unk> <s> </s>, no pad piece
                user_defined_symbols=args.special_tokens,
                num_threads=args.threads,
                minloglevel=0 if args.verbose else 1,
            )
        except RuntimeError:
            if progress.n == 0:          # sentencepiece's own words for it: "[!sentences_.empty()]"
                raise SystemExit(f"--input {' '.join(args.input)}: no text in the input files") from None
            raise
    return model.getvalue()


# ------------------------------------------------------------------------------------------------------------------
# efficiency


def read_eval_text(path, max_chars):
    """The first max_chars characters of a .txt or .jsonl file (jsonl texts joined by blank lines)."""
    parts, n = [], 0
    for text in read_texts(Path(path)):
        parts.append(text)
        n += len(text)
        if n >= max_chars:
            break
    return ("" if Path(path).suffix != ".jsonl" else "\n\n").join(parts)[:max_chars]


def efficiency(tokenizer, text, chunk_chars=20000):
    """Characters per token and tokens per word of text, encoded in chunks of whole lines."""
    n_tokens = 0
    lines, chunk = text.split("\n"), []
    size = 0
    for k, line in enumerate(lines):
        chunk.append(line)
        size += len(line) + 1
        if size >= chunk_chars or k == len(lines) - 1:
            n_tokens += len(tokenizer.encode("\n".join(chunk)))
            chunk, size = [], 0
    n_words = len(text.split())
    return {"chars": len(text), "words": n_words, "tokens": n_tokens,
            "chars_per_token": len(text) / max(n_tokens, 1), "tokens_per_word": n_tokens / max(n_words, 1)}


def efficiency_table(tokenizers, eval_files, max_chars):
    """Rows {"tokenizer", "text", ...efficiency} for every tokenizer on every file; printed as a table."""
    rows = []
    for path in eval_files:
        text = read_eval_text(path, max_chars)
        for name, tok in tokenizers.items():
            rows.append({"tokenizer": name, "text": Path(path).name, **efficiency(tok, text)})
    width = max([len(r["tokenizer"]) for r in rows] + [9])
    print(f"\n{'tokenizer':{width}}  {'text':40}  {'chars/token':>11}  {'tokens/word':>11}  {'tokens':>9}")
    for r in rows:
        print(f"{r['tokenizer']:{width}}  {r['text'][:40]:40}  {r['chars_per_token']:11.2f}  "
              f"{r['tokens_per_word']:11.2f}  {r['tokens']:9d}")
    return rows


def table1(tokenizers, sentence=TABLE1_SENTENCE):
    """The Vikhr Table 1 sentence as each tokenizer splits it."""
    print(f"\n{sentence!r}:")
    out = {}
    for name, tok in tokenizers.items():
        pieces = [tok.id_to_piece(i) for i in tok.encode(sentence)]
        out[name] = pieces
        print(f"  {name}: {len(pieces)} tokens  {' | '.join(pieces)}")
    return out


# ------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    print(json.dumps(vars(args), indent=2, ensure_ascii=False))
    out = Path(args.out)
    names = ["new"] + [Path(c).name for c in args.compare]       # the report's keys
    if len(set(names)) < len(names):
        raise SystemExit(f"--compare: tokenizers must have different names, and none 'new' (got {names[1:]})")
    compare = {Path(c).name: load_tokenizer(c) for c in args.compare}  # fail early on a bad --compare
    for f in args.eval_text:
        if not Path(f).is_file():
            raise SystemExit(f"--eval-text: file {f} not found")

    t0 = time.time()
    model_bytes = train(args)
    print(f"trained a {args.vocab_size}-piece {args.model_type} tokenizer in {time.time() - t0:.0f} s")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_hf_tokenizer_files(model_bytes, tmp)
        new = load_tokenizer(tmp)
        tokenizers = {"new": new, **compare}
        report = {"args": vars(args)}
        if args.eval_text:
            report["efficiency"] = efficiency_table(tokenizers, args.eval_text, args.eval_chars)
        report["table1"] = table1(tokenizers)
        with open(tmp / "train_tokenizer.json", "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}/")


if __name__ == "__main__":
    main()
