"""
Give a model a new vocabulary without losing what it knows (Vikhr, Nikolich et al. 2024, §3.2; ruadapt,
Tikhomirov & Chernyshev 2023).

Two ways to combine the base model's vocabulary with the tokenizer train_tokenizer.py made:

  replace  the vocabulary becomes the new tokenizer's. The base's special and added tokens (bos, eos, unk, pad,
           chat markers) are carried over, appended when the new tokenizer lacks them, and keep their roles.
  extend   the base's SentencePiece model keeps every piece, id and merge priority; the new tokenizer's pieces
           that the base lacks are appended with scores below every existing score (appending with score 0, as
           a well-known merge script does, would let the new merges win over the base's and silently change
           how the base splits text). Needs a SentencePiece base of the same model type (bpe/unigram).

Row initialisation, for the input embeddings and, separately, an untied LM head (a tied head stays tied):
  * a token whose piece the base vocabulary has: that row, copied bit for bit;
  * a byte-fallback token <0xNN>: the base's token for that byte (its <0xNN>, or its byte-level character);
  * any other token: the mean of the base rows of the pieces the base tokenizer spells its text with, each as
    often as it occurs, spelled without SentencePiece's dummy prefix ("▁мир" is the text " мир", "ение" is
    "ение" and not " ение");
  * a token the base spells with <unk> or not at all, and a special token the base lacks: the mean of all base
    rows ("global mean").
The vocabulary is padded to a multiple of --pad-to-multiple rows (tensor-core shapes); padding rows are zero,
the tokenizer never produces them, and generation must not sample them (model.generate's vocab_limit;
generation_config.json lists them as suppress_tokens for transformers' generate).

Writes --out/ (a Hugging Face model directory, all at once): config.json with the new vocab_size and token ids,
weights, tokenizer files, and resize_vocab.json, the report printed at the end.

    python resize_vocab.py --model BASE_DIR --tokenizer runs/tok40k --out runs/adapted --mode replace
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from model import Transformer, at_least, read_generation_config
from tokenizer import (SentencePieceTokenizer, byte_level_alphabet, load_sp_proto, load_tokenizer, sp_model_pb2,
                       write_hf_tokenizer_files)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="base model: a Hugging Face directory with its tokenizer")
    p.add_argument("--tokenizer", required=True,
                   help="new tokenizer: a directory train_tokenizer.py wrote, or a SentencePiece .model file")
    p.add_argument("--out", required=True, help="output model directory (replaced if it exists)")
    p.add_argument("--mode", choices=("replace", "extend"), default="replace",
                   help="replace: the new tokenizer's vocabulary; extend: the base's, plus the new pieces it lacks")
    p.add_argument("--pad-to-multiple", type=at_least(1), default=64, help="pad the embedding rows to a multiple of this")
    p.add_argument("--examples", type=at_least(0), default=10, help="averaged tokens shown in the report")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------------------
# the new vocabulary


def read_new_sentencepiece(path):
    """The new tokenizer's ModelProto: path is a .model file or a directory holding tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.model").is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.model (the new tokenizer must be SentencePiece: a "
                                    "directory train_tokenizer.py wrote, or a .model file)")
        path = path / "tokenizer.model"
    return load_sp_proto(path)


def append_piece(proto, piece, score, kind):
    p = proto.pieces.add()
    p.piece, p.score, p.type = piece, score, kind


def carry_over_special_tokens(proto, base_tok):
    """Append the base's special/added tokens that proto lacks, as user-defined pieces (matched literally in
    text, never split), in the base's id order. A token with whitespace in it (the runs of spaces some code
    bases add) is left out: sentencepiece turns spaces into "▁" before it matches user-defined pieces, so
    tokenizer.model would never produce it while tokenizer.json would. Returns (appended, left out)."""
    P = sp_model_pb2().ModelProto.SentencePiece
    have = {p.piece for p in proto.pieces}
    added, left_out = [], []
    for text, _ in sorted(base_tok.special_tokens.items(), key=lambda kv: kv[1]):
        if text in have:
            continue
        if any(ch.isspace() for ch in text):
            left_out.append(text)
            continue
        append_piece(proto, text, 0.0, P.USER_DEFINED)
        have.add(text)
        added.append(text)
    return added, left_out


def extend_vocabulary(base_proto, new_proto):
    """Base pieces keep ids and scores; new normal and user-defined pieces the base lacks are appended, normal
    ones with strictly decreasing scores below every base score (so every base merge still goes first).
    Returns (merged proto, appended pieces, skipped pieces)."""
    pb2 = sp_model_pb2()
    P = pb2.ModelProto.SentencePiece
    base_type = pb2.TrainerSpec.ModelType.Name(base_proto.trainer_spec.model_type)
    new_type = pb2.TrainerSpec.ModelType.Name(new_proto.trainer_spec.model_type)
    if base_type != new_type:
        raise ValueError(f"--mode extend: the base tokenizer is {base_type} and the new one {new_type}; extend "
                         "needs both of one type, use --mode replace")
    if base_type != "BPE":
        # BPE scores only order the merges, so new pieces can go after every base merge; a unigram score is a
        # log-probability, and pieces scored below every base piece are almost never chosen
        raise ValueError(f"--mode extend: the tokenizers are {base_type}; extend works with BPE (Llama/Mistral), "
                         "use --mode replace")
    merged = pb2.ModelProto()
    merged.CopyFrom(base_proto)
    have = {p.piece for p in merged.pieces}
    lowest = min(p.score for p in merged.pieces)
    # float32 scores: a step of 1 vanishes next to Llama-2's -1e9, so scale the step with the magnitude
    step = max(1.0, abs(lowest) * 2.0 ** -20)
    appended, skipped, k = [], [], 0
    for p in new_proto.pieces:
        if p.piece in have:
            continue
        if p.type == P.NORMAL:
            k += 1
            append_piece(merged, p.piece, lowest - k * step, P.NORMAL)
        elif p.type == P.USER_DEFINED:
            append_piece(merged, p.piece, 0.0, P.USER_DEFINED)
        else:  # byte / control / unknown pieces follow the base's own settings
            skipped.append(p.piece)
            continue
        appended.append(p.piece)
        have.add(p.piece)
    scores = [p.score for p in merged.pieces[len(base_proto.pieces):] if p.type == P.NORMAL]
    assert all(a > b for a, b in zip(scores, scores[1:])) and (not scores or scores[0] < lowest)
    merged.trainer_spec.vocab_size = len(merged.pieces)
    return merged, appended, skipped


def base_roles(base_tok, final_unk):
    """{role: text or None}: the base's bos/eos/pad/unk tokens; unk falls back to the new model's (SentencePiece
    always has one)."""
    roles = {}
    for role in ("bos", "eos", "pad", "unk"):
        i = getattr(base_tok, f"{role}_id")
        roles[f"{role}_token"] = base_tok.id_to_piece(i) if i is not None else None
    roles["unk_token"] = roles["unk_token"] or final_unk
    return roles


def base_tokenizer_config(model_dir):
    """chat_template and model_max_length of the base tokenizer, to carry over."""
    model_dir = Path(model_dir)
    cfg = {}
    if (model_dir / "tokenizer_config.json").is_file():
        with open(model_dir / "tokenizer_config.json", encoding="utf-8") as f:
            cfg = json.load(f)
    template = cfg.get("chat_template")
    if (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    max_len = cfg.get("model_max_length")
    return template, max_len if isinstance(max_len, int) and max_len < 10 ** 9 else None


# ------------------------------------------------------------------------------------------------------------------
# row initialisation


def base_piece(piece, base_tok):
    """A SentencePiece-style piece ("▁мир") spelled in the base vocabulary's convention (byte-level: "ĠÐ¼Ð¸Ñ\u0122")."""
    if not base_tok.byte_level:
        return piece
    table = byte_level_alphabet()
    return "".join(table[b] for b in piece.replace("▁", " ").encode("utf-8"))


def plan_rows(final_tok, base_tok):
    """For every id of the final tokenizer, where its row comes from:
    ("copy", base_id) | ("mean", [base ids]) | ("global", why)."""
    is_byte = sp_model_pb2().ModelProto.SentencePiece.BYTE
    proto = getattr(final_tok, "proto", None)
    plan = []
    for i in range(final_tok.vocab_size):
        piece = final_tok.id_to_piece(i)
        if piece in final_tok.special_tokens:
            j = base_tok.special_tokens.get(piece, base_tok.piece_to_id(piece))
            plan.append(("copy", j) if j is not None else ("global", "special token the base lacks"))
            continue
        if proto is not None and i < len(proto.pieces) and proto.pieces[i].type == is_byte:
            byte = int(piece[3:5], 16)  # "<0xNN>"
            j = base_tok.byte_token_id(byte)
            if j is not None:
                plan.append(("copy", j))
                continue
            text = chr(byte) if byte < 0x80 else None  # a lone byte >= 0x80 is no text to spell
        else:
            j = base_tok.piece_to_id(base_piece(piece, base_tok))
            if j is not None:
                plan.append(("copy", j))
                continue
            text = piece.replace("▁", " ")
        ids = base_tok.encode_continuation(text) if text else []
        if not ids:
            plan.append(("global", "the base cannot spell it"))
        elif base_tok.unk_id is not None and base_tok.unk_id in ids:
            plan.append(("global", "the base spells it with unk"))
        else:
            plan.append(("mean", ids))
    return plan


def build_rows(base_weight, plan, n_base, n_rows):
    """(n_rows, d) rows from base_weight (V0, d) following plan; rows past len(plan) are zero padding.
    n_base: rows of base_weight that are real tokens (the global mean is over those, not the padding)."""
    d = base_weight.shape[1]
    out = torch.zeros(n_rows, d, dtype=base_weight.dtype, device=base_weight.device)         # (V1, d)
    global_mean = base_weight[:n_base].float().mean(0).to(base_weight.dtype)                 # (d,)
    for i, (kind, src) in enumerate(plan):
        if kind == "copy":
            out[i] = base_weight[src]
        elif kind == "mean":
            out[i] = base_weight[src].float().mean(0).to(base_weight.dtype)  # (n_pieces, d) -> (d,)
        else:
            out[i] = global_mean
    return out


# ------------------------------------------------------------------------------------------------------------------


def resize(args):
    base_tok = load_tokenizer(args.model)
    new_proto = read_new_sentencepiece(args.tokenizer)
    report = {"mode": args.mode, "model": str(args.model), "tokenizer": str(args.tokenizer)}
    pb2 = sp_model_pb2()
    if args.mode == "extend":
        if not isinstance(base_tok, SentencePieceTokenizer):
            raise ValueError(f"--mode extend: the base tokenizer of {args.model} is tokenizer.json, not SentencePiece; "
                             "extend keeps the base's merges and needs a SentencePiece base, use --mode replace")
        proto = pb2.ModelProto()
        proto.CopyFrom(base_tok.proto)
        carried, left_out = carry_over_special_tokens(proto, base_tok)  # tokens added on top of the base's model
        proto, appended, skipped = extend_vocabulary(proto, new_proto)
        report["extend"] = {"appended": len(appended), "skipped_pieces": skipped}
    else:
        proto = pb2.ModelProto()
        proto.CopyFrom(new_proto)
        carried, left_out = carry_over_special_tokens(proto, base_tok)
    report["special_tokens_carried_over"] = carried
    report["special_tokens_left_out"] = left_out
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    roles = base_roles(base_tok, unk)
    chat_template, max_len = base_tokenizer_config(args.model)

    # write the tokenizer first and read it back: the rows are planned with exactly what the output holds
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.tokenizer-", dir=out.parent))
    try:
        write_hf_tokenizer_files(proto, tok_dir, roles=roles, chat_template=chat_template, model_max_length=max_len)
        final_tok = load_tokenizer(tok_dir)
        model = Transformer.from_pretrained(args.model)
        cfg = model.config
        n_base = min(base_tok.vocab_size, cfg.vocab_size)
        plan = plan_rows(final_tok, base_tok)
        if any(kind == "copy" and j >= cfg.vocab_size for kind, j in plan):
            raise ValueError(f"{args.model}: the tokenizer has ids beyond config.json's vocab_size {cfg.vocab_size}")
        n_rows = math.ceil(final_tok.vocab_size / args.pad_to_multiple) * args.pad_to_multiple

        with torch.no_grad():
            embed = build_rows(model.model.embed_tokens.weight, plan, n_base, n_rows)          # (V1, d)
            head = None if cfg.tie_word_embeddings else build_rows(model.lm_head.weight, plan, n_base, n_rows)
        model.set_vocab(embed, head)

        # token ids in config.json / generation_config.json follow their tokens to the new ids
        def new_id(old):
            if old is None or not 0 <= old < base_tok.vocab_size:
                return None
            piece = base_tok.id_to_piece(old)
            return final_tok.special_tokens.get(piece, final_tok.piece_to_id(piece))
        old_ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
        cfg.bos_token_id, cfg.pad_token_id = new_id(cfg.bos_token_id), new_id(cfg.pad_token_id)
        cfg.eos_token_id = ([new_id(e) for e in cfg.eos_token_id] if isinstance(cfg.eos_token_id, list)
                            else new_id(cfg.eos_token_id))
        report["config_token_ids"] = {k: {"base": v, "new": getattr(cfg, k)} for k, v in old_ids.items()}
        # generation_config.json's ids follow their tokens too (Qwen keeps its pad id and an eos list only
        # there); one whose token the new vocabulary lacks is dropped, never left pointing at another token
        gen = read_generation_config(args.model)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if key in gen:
                ids = [new_id(i) for i in (gen[key] if isinstance(gen[key], list) else [gen[key]])]
                ids = [i for i in ids if i is not None]
                if not ids:
                    del gen[key]
                else:
                    gen[key] = ids if isinstance(gen[key], list) else ids[0]

        kinds = [kind for kind, _ in plan]
        report.update({
            "base_vocab_size": base_tok.vocab_size, "base_rows": n_base,
            "tokenizer_vocab_size": final_tok.vocab_size, "rows": n_rows,
            "copied": kinds.count("copy"), "averaged": kinds.count("mean"), "global_mean": kinds.count("global"),
            "padding": n_rows - final_tok.vocab_size, "roles": roles,
            # byte tokens last: the other tokens say more about what the base could not spell
            "global_mean_tokens": sorted((final_tok.id_to_piece(i) for i, (k, _) in enumerate(plan) if k == "global"),
                                         key=lambda p: len(p) == 6 and p.startswith("<0x"))[:50],
            "averaged_examples": [
                {"token": final_tok.id_to_piece(i), "from": [base_tok.id_to_piece(j) for j in src]}
                for i, (k, src) in enumerate(plan) if k == "mean" and len(src) > 1][:args.examples],
        })
        if cfg.model_type == "qwen2":       # (qwen3 is not forced: AutoTokenizer reads our files right, tested)
            report["note"] = (f"transformers 5's AutoTokenizer builds a byte-level Qwen2Tokenizer for model_type "
                              f"{cfg.model_type} whatever tokenizer_config.json says, which mis-encodes this "
                              "SentencePiece vocabulary; load it with PreTrainedTokenizerFast.from_pretrained(dir)")
        model.save_pretrained(out, tokenizer_dir=tok_dir, generation_config=gen,
                              extra_files={"resize_vocab.json": json.dumps(report, indent=2, ensure_ascii=False)})
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    return report


def print_report(r):
    print(f"{r['mode']}: {r['base_vocab_size']} -> {r['tokenizer_vocab_size']} tokens, {r['rows']} rows "
          f"(+{r['padding']} padding)")
    print(f"  rows copied {r['copied']}, averaged {r['averaged']}, global mean {r['global_mean']}")
    if "extend" in r:
        print(f"  appended {r['extend']['appended']} pieces to the base vocabulary")
    if r["special_tokens_carried_over"]:
        print(f"  special tokens carried over from the base: {r['special_tokens_carried_over']}")
    if r["special_tokens_left_out"]:
        print(f"  base tokens with whitespace in them, left out (sentencepiece cannot match them): "
              f"{r['special_tokens_left_out']}")
    print(f"  roles: {r['roles']}")
    for ex in r["averaged_examples"]:
        print(f"  {ex['token']!r} = mean of {ex['from']}")
    if r["global_mean_tokens"]:
        print(f"  global mean: {r['global_mean_tokens'][:10]}")
    if "note" in r:
        print(f"  note: {r['note']}")


def main(argv=None):
    args = parse_args(argv)
    print(json.dumps(vars(args), indent=2))
    try:
        report = resize(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"resize_vocab.py: error: {e}") from e
    print_report(report)
    print(f"wrote {args.out}/")


if __name__ == "__main__":
    sys.exit(main())
