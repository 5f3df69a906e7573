"""
Tokenizers and chat templates: how text becomes ids. Two parts:

  1. loading and writing tokenizers -- one small interface over the two formats LLM checkpoints ship
  2. chat templates -- reading chat .jsonl, ChatML / Mistral rendering with the assistant-only loss
     mask, and the Jinja twin of each template that transformers' apply_chat_template runs

(Split out of model.py, which re-exports these names, so the training and evaluation scripts import them from model.)

Tokenizer formats:

  * SentencePiece `tokenizer.model` (Llama-2, Mistral, and every tokenizer train_tokenizer.py makes),
    read with the `sentencepiece` package;
  * Hugging Face `tokenizer.json` (Qwen, Llama-3), read with the optional `tokenizers` package.

A model directory may hold both; then `tokenizer.model` is used (it needs no optional package), and
`tokenizer_config.json` / `special_tokens_map.json` decide which tokens play the bos/eos/pad/unk roles
and which extra tokens were added on top of the SentencePiece vocabulary, as in `transformers`.

Encoding semantics, the same for both formats:
  * special and added tokens written literally in the text ("<|im_start|>user") become their single
    id, because chat templates are rendered to text and then encoded;
  * SentencePiece's "dummy prefix" (add_dummy_prefix: a "▁" glued to the start of the text, so the
    first word is spelled like every other word) is added only at the very start of the text, never
    after a special token: encode("<|im_start|>user") is [<|im_start|>, "user"], not
    [<|im_start|>, "▁user"]. This is what `transformers` does (Metaspace with prepend_scheme="first").
    `encode_continuation` encodes text as it continues running text: no dummy prefix, no byte-level
    prefix space, whitespace kept as written (used to spell a piece in another vocabulary, and a
    multiple-choice answer after its question).

`write_hf_tokenizer_files` writes a SentencePiece model as tokenizer.model + tokenizer.json +
tokenizer_config.json + special_tokens_map.json, so that `transformers`' AutoTokenizer encodes exactly as
`sentencepiece` does (tests/test_tokenizer.py checks this against the installed transformers).

protobuf is needed at run time: the SentencePiece model is a protobuf message, and reading its settings,
switching its dummy prefix off, merging two models and adding pieces all go through
`sentencepiece.sentencepiece_model_pb2`, which imports `google.protobuf`.
"""

import json
import os
import re
import shutil
from pathlib import Path

import sentencepiece as spm

from atomic_files import replace_dir

# files that make up a tokenizer; model.save_pretrained copies those present next to the weights
TOKENIZER_FILES = (
    "tokenizer.model",          # SentencePiece model
    "tokenizer.json",           # Hugging Face `tokenizers` serialization
    "tokenizer_config.json",    # roles of special tokens, added tokens, chat template (transformers)
    "special_tokens_map.json",  # roles of special tokens (older transformers)
    "chat_template.jinja",      # chat template as its own file (transformers >= 4.43 may write it)
    "added_tokens.json",        # tokens added on top of a SentencePiece vocabulary (older transformers)
    "vocab.json",               # byte-level BPE vocabulary (GPT-2 / Qwen style), next to merges.txt
    "merges.txt",
)

ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def sp_model_pb2():
    """The SentencePiece protobuf module, with a clear error when protobuf is missing."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # the module imports google.protobuf
        raise ImportError(f"editing SentencePiece models needs protobuf: pip install protobuf ({e})") from e
    return sentencepiece_model_pb2


def load_sp_proto(path):
    """Read a SentencePiece model file into a ModelProto; clear errors for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: SentencePiece model file not found")
    proto = sp_model_pb2().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf raises DecodeError (and sometimes others) on garbage
        raise ValueError(f"{path}: not a valid SentencePiece model ({e})") from e
    if len(proto.pieces) == 0:
        raise ValueError(f"{path}: not a valid SentencePiece model (no pieces)")
    return proto


def sp_processor(proto, name="SentencePiece model"):
    """A SentencePieceProcessor for a ModelProto (sentencepiece validates it here)."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto.SerializeToString())
    except Exception as e:
        raise ValueError(f"{name}: sentencepiece cannot load it ({e})") from e
    return sp


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def _token_content(value):
    """A role in tokenizer_config.json is a string, null, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def byte_level_alphabet():
    """GPT-2's byte -> printable character table, used by byte-level BPE vocabularies (Qwen, Llama-3).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chars from U+0100 upward, in
    byte order, so that every piece is a printable string (the space byte 0x20 becomes "Ġ").
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# ------------------------------------------------------------------------------------------------------------------
# the common interface


class Tokenizer:
    """Text <-> ids for one vocabulary. Subclasses implement the plain (special-token-free) encoding.

    vocab_size: ids the tokenizer can produce are 0..vocab_size-1 (a model's embedding may be padded beyond).
    special_tokens: {text: id} of special and added tokens, matched literally in text by encode().
    """

    vocab_size: int
    bos_id = eos_id = pad_id = unk_id = None
    special_tokens: dict
    byte_level = False  # True for GPT-2-style byte-level vocabularies ("Ġthe")

    def _set_special_tokens(self, special_tokens):
        self.special_tokens = dict(special_tokens)
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}
        # longest first, so "<|im_start|>" wins over a shorter special token that is its prefix
        alternatives = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def _encode_plain(self, text, at_start):
        """ids of text that holds no special token; at_start: the text starts the whole input."""
        raise NotImplementedError

    def _decode_plain(self, ids, at_start):
        raise NotImplementedError

    def _encode_continuation(self, text):
        raise NotImplementedError

    def encode(self, text, add_bos=False, add_eos=False):
        """ids of text; special tokens written in the text become their single ids (see the module docstring)."""
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        pos = 0
        for match in self._special_re.finditer(text) if self._special_re else ():
            if match.start() > pos:
                ids += self._encode_plain(text[pos:match.start()], at_start=pos == 0)
            ids.append(self.special_tokens[match.group()])
            pos = match.end()
        if pos < len(text):
            ids += self._encode_plain(text[pos:], at_start=pos == 0)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def encode_continuation(self, text):
        """ids of text as if it continued earlier text: no dummy prefix, no special-token matching.
        " мир" -> ["▁мир"] (not ["▁", "▁мир"]); "ение" -> ["ение"] (not ["▁", "ение"] or ["▁ение"])."""
        return self._encode_continuation(text) if text else []

    def decode(self, ids):
        """text of ids. bos/eos/pad are dropped (as sentencepiece drops control tokens); other special tokens
        are written as their text, so decode(encode(s, add_bos=True, add_eos=True)) == s."""
        drop = {self.bos_id, self.eos_id, self.pad_id} - {None}
        ids = [int(i) for i in ids if int(i) not in drop]
        out, run, run_start = [], [], 0
        for k, i in enumerate(ids + [None]):  # None flushes the last run
            if i is not None and i not in self._id_to_special:
                if not run:
                    run_start = k
                run.append(i)
                continue
            if run:
                out.append(self._decode_plain(run, at_start=run_start == 0))
                run = []
            if i is not None:
                out.append(self._id_to_special[i])
        return "".join(out)

    def id_to_piece(self, i):
        raise NotImplementedError

    def piece_to_id(self, piece):
        raise NotImplementedError

    def pieces(self):
        """The piece of every id 0..vocab_size-1 (compares vocabularies across stages)."""
        return [self.id_to_piece(i) for i in range(self.vocab_size)]

    def byte_token_id(self, byte):
        """id of the token that stands for one raw byte (0..255), or None when the vocabulary has none."""
        if self.byte_level:
            return self.piece_to_id(byte_level_alphabet()[byte])
        return self.piece_to_id(f"<0x{byte:02X}>")

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"pad={self.pad_id}, unk={self.unk_id}, special_tokens={len(self.special_tokens)})")


def _apply_roles(tok, roles, source):
    """Set tok.bos_id... from {"bos_token": text or None}; a role naming an unknown token is an error."""
    for role, text in roles.items():
        i = None
        if text is not None:
            i = tok.special_tokens.get(text, tok.piece_to_id(text))
            if i is None:
                raise ValueError(f"{source}: {role} {text!r} is not in the vocabulary")
        setattr(tok, role.replace("_token", "_id"), i)


def _read_hf_config(dir_):
    """Roles and added tokens from tokenizer_config.json, falling back to special_tokens_map.json.

    Returns (roles, added): roles {role: text or None} only for roles the files mention;
    added {text: id} from tokenizer_config.json's added_tokens_decoder; source: file name for errors.
    """
    roles, added, source = {}, {}, None
    if dir_ is None:
        return roles, added, source
    map_path, cfg_path = dir_ / "special_tokens_map.json", dir_ / "tokenizer_config.json"
    if map_path.is_file():
        data, source = _read_json(map_path), map_path
        roles.update({r: _token_content(data[r]) for r in ROLES if r in data})
    if cfg_path.is_file():
        data, source = _read_json(cfg_path), cfg_path
        roles.update({r: _token_content(data[r]) for r in ROLES if r in data})
        for i, tok in data.get("added_tokens_decoder", {}).items():
            try:
                added[tok["content"]] = int(i)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{cfg_path}: bad added_tokens_decoder entry {i!r}: {tok!r}") from e
    return roles, added, source


# ------------------------------------------------------------------------------------------------------------------
# SentencePiece backend


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, plus any tokens tokenizer_config.json adds on top of it."""

    def __init__(self, proto, added_tokens=None, roles=None, source="tokenizer.model"):
        pb2 = sp_model_pb2()
        self.proto = proto
        self.source = str(source)
        self.sp = sp_processor(proto, self.source)
        # the same model with the dummy prefix switched off, for text that does not start the input
        no_prefix = pb2.ModelProto()
        no_prefix.CopyFrom(proto)
        no_prefix.normalizer_spec.add_dummy_prefix = False
        self.sp_no_prefix = sp_processor(no_prefix, self.source)
        self.add_dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        # a continuation also keeps its whitespace: with remove_extra_whitespaces on (sentencepiece's training
        # default) " мир" would lose the space that makes it the word-start piece "▁мир"
        self.sp_continuation = self.sp_no_prefix
        if proto.normalizer_spec.remove_extra_whitespaces:
            as_is = pb2.ModelProto()
            as_is.CopyFrom(no_prefix)
            as_is.normalizer_spec.remove_extra_whitespaces = False
            self.sp_continuation = sp_processor(as_is, self.source)

        n = self.sp.get_piece_size()
        self.added_pieces = {i: t for t, i in (added_tokens or {}).items() if i >= n}  # ids beyond the model
        if sorted(self.added_pieces) != list(range(n, n + len(self.added_pieces))):
            raise ValueError(f"{source}: added tokens must take the ids right after the SentencePiece vocabulary "
                             f"({n}...), got {sorted(self.added_pieces)}")
        self.vocab_size = n + len(self.added_pieces)

        P = pb2.ModelProto.SentencePiece
        special = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (P.CONTROL, P.UNKNOWN, P.USER_DEFINED)}
        special.update({t: i for t, i in (added_tokens or {}).items()})
        self._set_special_tokens(special)

        def sp_id(i):
            return None if i < 0 else i
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (sp_id(self.sp.bos_id()), sp_id(self.sp.eos_id()),
                                                              sp_id(self.sp.pad_id()), sp_id(self.sp.unk_id()))
        _apply_roles(self, roles or {}, source)

    def _encode_plain(self, text, at_start):
        return (self.sp if at_start else self.sp_no_prefix).encode(text)

    def _decode_plain(self, ids, at_start):
        # at the start, sentencepiece removes the dummy prefix's space again
        return (self.sp if at_start else self.sp_no_prefix).decode(ids)

    def _encode_continuation(self, text):
        return self.sp_continuation.encode(text)

    def id_to_piece(self, i):
        if i in self.added_pieces:
            return self.added_pieces[i]
        if not 0 <= i < self.sp.get_piece_size():
            raise IndexError(f"id {i} out of range (vocab_size {self.vocab_size})")
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece):
        if piece in self.special_tokens:
            return self.special_tokens[piece]
        i = self.sp.piece_to_id(piece)
        # sentencepiece answers unk_id for an unknown piece
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i


# ------------------------------------------------------------------------------------------------------------------
# tokenizer.json backend (optional `tokenizers` package)


class JsonTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, run by the `tokenizers` package (used only to read a base model's tokenizer)."""

    def __init__(self, path, roles=None, source=None):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(f"{path}: reading tokenizer.json needs the optional package `tokenizers` "
                              f"(pip install tokenizers)") from e
        data = _read_json(path)
        try:
            self.tok = tokenizers.Tokenizer.from_str(json.dumps(data))
            # the same pipeline with any dummy prefix switched off, for text that does not start the input
            no_prefix = _without_dummy_prefix(data)
            self.tok_no_prefix = tokenizers.Tokenizer.from_str(json.dumps(no_prefix))
            # and for encode_continuation no space in front from a ByteLevel step either (add_prefix_space:
            # GPT-2-style bases); the library adds that one per segment in running text, so encode keeps it
            continuation = _without_dummy_prefix(data, byte_level_space=False)
            self.tok_continuation = (self.tok_no_prefix if continuation == no_prefix else
                                     tokenizers.Tokenizer.from_str(json.dumps(continuation)))
        except Exception as e:
            raise ValueError(f"{path}: `tokenizers` cannot load it ({e})") from e
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self._id_to_piece = {i: p for p, i in vocab.items()}
        self.vocab_size = max(vocab.values()) + 1
        self._set_special_tokens({t["content"]: t["id"] for t in data.get("added_tokens", [])})
        self.byte_level = "ByteLevel" in json.dumps([data.get("pre_tokenizer"), data.get("decoder")])
        model = data.get("model", {})
        unk = model.get("unk_token") if model.get("type") != "Unigram" else None
        self.unk_id = vocab.get(unk) if unk is not None else model.get("unk_id")
        _apply_roles(self, roles or {}, source or path)

    def _encode_plain(self, text, at_start):
        return (self.tok if at_start else self.tok_no_prefix).encode(text, add_special_tokens=False).ids

    def _decode_plain(self, ids, at_start):
        return (self.tok if at_start else self.tok_no_prefix).decode(ids, skip_special_tokens=False)

    def _encode_continuation(self, text):
        return self.tok_continuation.encode(text, add_special_tokens=False).ids

    def id_to_piece(self, i):
        if i not in self._id_to_piece:
            raise IndexError(f"id {i} out of range (vocab_size {self.vocab_size})")
        return self._id_to_piece[i]

    def piece_to_id(self, piece):
        return self.tok.token_to_id(piece)


def _without_dummy_prefix(data, byte_level_space=True):
    """A copy of a tokenizer.json dict whose pipeline never prepends "▁" (Metaspace or a Prepend normalizer);
    with byte_level_space=False, nor a ByteLevel pre-tokenizer's "Ġ" (its add_prefix_space)."""
    data = json.loads(json.dumps(data))

    def fix(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace":
                node["prepend_scheme"] = "never"
                node.pop("add_prefix_space", None)  # pre-0.14 spelling of the same switch
            if node.get("type") == "ByteLevel" and not byte_level_space:
                node["add_prefix_space"] = False
            for key in ("normalizers", "pretokenizers"):
                if isinstance(node.get(key), list):
                    node[key] = [fix(n) for n in node[key] if not (isinstance(n, dict) and n.get("type") == "Prepend")]
        return node

    if isinstance(data.get("normalizer"), dict) and data["normalizer"].get("type") == "Prepend":
        data["normalizer"] = None
    fix(data.get("normalizer"))
    fix(data.get("pre_tokenizer"))
    return data


# ------------------------------------------------------------------------------------------------------------------
# loading


def load_tokenizer(path):
    """Load the tokenizer of a model directory (tokenizer.model and/or tokenizer.json, with tokenizer_config.json /
    special_tokens_map.json), or a SentencePiece .model file, or a tokenizer.json file."""
    path = Path(path)
    if path.is_file():
        if path.name.endswith(".json"):
            roles, _, source = _read_hf_config(path.parent)
            return JsonTokenizer(path, roles, source)
        return SentencePieceTokenizer(load_sp_proto(path), source=path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer file or model directory")
    roles, added, source = _read_hf_config(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer(load_sp_proto(path / "tokenizer.model"), added, roles,
                                      source or path / "tokenizer.model")
    if (path / "tokenizer.json").is_file():
        return JsonTokenizer(path / "tokenizer.json", roles, source)
    raise FileNotFoundError(f"{path}: no tokenizer found (expected tokenizer.model or tokenizer.json)")


# ------------------------------------------------------------------------------------------------------------------
# writing Hugging Face tokenizer files


def bpe_merges(proto):
    """Merge rules that make a `tokenizers` BPE reproduce SentencePiece BPE.

    SentencePiece BPE stores no merges: it repeatedly joins the adjacent pair whose concatenation is the
    normal piece with the highest score. So every split (left, right) of a normal piece into two pieces of
    the vocabulary is a merge, ranked by the score of the joined piece (ties: by its id).
    """
    P = sp_model_pb2().ModelProto.SentencePiece
    normal = {p.piece: (-p.score, i) for i, p in enumerate(proto.pieces) if p.type == P.NORMAL}
    merges = []
    for piece, rank in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((rank, normal[left], normal[right], left, right))
    merges.sort()
    return [[left, right] for *_, left, right in merges]


def _default_roles(proto):
    ts = proto.trainer_spec
    piece = lambda i: proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None  # noqa: E731
    return {"bos_token": piece(ts.bos_id), "eos_token": piece(ts.eos_id),
            "pad_token": piece(ts.pad_id), "unk_token": piece(ts.unk_id)}


def _metaspace(prefix):
    """The pre-tokenizer: spaces become "▁", and with SentencePiece's add_dummy_prefix one "▁" goes in front
    of the text's first segment (not after special tokens). A single Metaspace(prepend_scheme="first")
    skips the prefix when the text already starts with a space (" x" -> "▁x"), where sentencepiece always
    adds it (" x" -> "▁▁x"). So: spaces to "▁" (no prefix); a Metaspace whose replacement is " " now
    always finds a text that does not start with " " and prepends one; the third turns that " " to "▁"."""
    def metaspace(replacement, scheme):
        return {"type": "Metaspace", "replacement": replacement, "prepend_scheme": scheme, "split": False}
    if not prefix:
        return metaspace("▁", "never")
    return {"type": "Sequence", "pretokenizers": [metaspace("▁", "never"), metaspace(" ", "first"),
                                                  metaspace("▁", "never")]}


def write_hf_tokenizer_files(sp_model, out_dir, roles=None, chat_template=None, model_max_length=None):
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir.

    sp_model: a .model path, its bytes, or a ModelProto. roles: {"bos_token": text or None, ...}; default: the
    model's own bos/eos/pad/unk pieces. Control, unknown and user-defined pieces become special added tokens.
    The files describe the pipeline that `transformers`' LlamaTokenizer builds for itself (BPE with byte
    fallback, no normalizer, Metaspace prepending "▁" to the first section only), so the result is the same
    whether transformers reads tokenizer.json as is or rebuilds that pipeline around its vocab and merges.
    Callers that need the directory to appear whole write into a temporary directory and rename it.
    """
    pb2 = sp_model_pb2()
    if isinstance(sp_model, pb2.ModelProto):
        proto = sp_model
    elif isinstance(sp_model, bytes):
        proto = pb2.ModelProto()
        proto.ParseFromString(sp_model)
    else:
        proto = load_sp_proto(sp_model)
    sp_processor(proto)  # validate before writing anything
    norm = proto.normalizer_spec
    if (norm.name not in ("identity", "") and norm.precompiled_charsmap) or norm.remove_extra_whitespaces:
        raise ValueError(f"SentencePiece model with normalization {norm.name!r}, remove_extra_whitespaces="
                         f"{norm.remove_extra_whitespaces}: tokenizer.json can only reproduce identity "
                         "normalization without whitespace removal (train with train_tokenizer.py's defaults)")
    if proto.trainer_spec.treat_whitespace_as_suffix:
        raise ValueError("SentencePiece model with treat_whitespace_as_suffix: not supported by tokenizer.json")
    roles = {**_default_roles(proto), **(roles or {})}
    P = pb2.ModelProto.SentencePiece
    model_type = pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    unk = roles["unk_token"] or _default_roles(proto)["unk_token"]
    prefix = norm.add_dummy_prefix

    added_tokens = [
        {"id": i, "content": p.piece, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, p in enumerate(proto.pieces) if p.type in (P.CONTROL, P.UNKNOWN, P.USER_DEFINED)]
    if model_type == "BPE":
        model = {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": proto.trainer_spec.byte_fallback,
                 "ignore_merges": False, "vocab": {p.piece: i for i, p in enumerate(proto.pieces)},
                 "merges": bpe_merges(proto)}
    elif model_type == "UNIGRAM":
        model = {"type": "Unigram", "unk_id": proto.trainer_spec.unk_id,
                 "vocab": [[p.piece, p.score] for p in proto.pieces], "byte_fallback": proto.trainer_spec.byte_fallback}
    else:
        raise ValueError(f"SentencePiece model type {model_type}: only BPE and UNIGRAM can be written as tokenizer.json")
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos = roles["bos_token"]
    post_processor = None
    if bos is not None:
        bos_id = next(i for i, p in enumerate(proto.pieces) if p.piece == bos)
        post_processor = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": _metaspace(prefix),
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }
    tokenizer_config = {
        # the generic class: loads tokenizer.json as it is (transformers 4 and 5)
        "tokenizer_class": "PreTrainedTokenizerFast",
        **roles,
        "add_bos_token": bos is not None, "add_eos_token": False,
        "add_prefix_space": prefix, "legacy": False,  # read by LlamaTokenizer when transformers picks that class
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added_tokens},
    }
    if model_max_length is not None:
        tokenizer_config["model_max_length"] = model_max_length
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    special_map = {r: t for r, t in roles.items() if t is not None}
    role_texts = set(special_map.values())
    extra = [t["content"] for t in added_tokens if t["content"] not in role_texts]
    if extra:
        special_map["additional_special_tokens"] = extra

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    for name, obj in (("tokenizer.json", tokenizer_json), ("tokenizer_config.json", tokenizer_config),
                      ("special_tokens_map.json", special_map)):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=2 if name != "tokenizer.json" else None)
            f.write("\n")


# ------------------------------------------------------------------------------------------------
# chat templates (rendering with the assistant-only loss mask; shared by sft.py, distill.py, evaluate.py)
# ------------------------------------------------------------------------------------------------
# A conversation is a list of {"role": "system"|"user"|"assistant", "content": str}. Each template is
# written twice: as Python below, which also marks the supervised text (the loss mask), and as Jinja,
# saved into tokenizer_config.json so that transformers' apply_chat_template renders the same text.
# tests/test_sft.py checks that the two give the same ids.
CHAT_ROLES = ("system", "user", "assistant")

# ChatML, as Qwen uses it (without Qwen's default system prompt). bos only when the tokenizer has one:
# Llama/Mistral-family tokenizers (and train_tokenizer.py's) start every sequence with it; Qwen's has none.
CHATML_JINJA = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unknown role: ' + message['role']) }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Mistral's [INST] format, as in Mixtral-8x7B-Instruct-v0.1's tokenizer_config.json: one bos, a
# system message prepended to the first user turn, eos closing every assistant turn.
MISTRAL_JINJA = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, roles must alternate user/assistant') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles after an optional system message') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

CHAT_TEMPLATES = {"chatml": CHATML_JINJA, "mistral": MISTRAL_JINJA}
CHAT_SPECIAL_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"], "mistral": []}   # beyond bos/eos


def check_messages(messages, where="conversation"):
    """Stop with one clear message unless `messages` is a list of {role, content} turns with a known
    role, string content, and at least one assistant turn (else there is nothing to learn from)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(f"{where}: message {i} has unknown role {m['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: message {i} content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant turn (nothing to learn from)")


def jsonl_records(path):
    """(line number, dict) for every non-blank line of a .jsonl file, streamed. Every stage reads its .jsonl
    inputs (corpora, chat data, benchmarks, prompts) through this one reader: errors name the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
                yield n, record
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def jsonl_texts(path):
    """The 'text' field of every record of a .jsonl corpus (pretraining, tokenizer training, bits per byte)."""
    for n, record in jsonl_records(path):
        if not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{n}: expected a JSON object with a string field 'text'")
        yield record["text"]


def check_roles(messages, template):
    """The turn order a template can render: Mistral's [INST] needs user/assistant alternating after an
    optional system message (ChatML renders any order)."""
    if template == "mistral":
        first = 1 if messages[0]["role"] == "system" else 0
        for i, m in enumerate(messages[first:]):
            if m["role"] != ("user" if i % 2 == 0 else "assistant"):
                raise ValueError("mistral chat template: after an optional system message, "
                                 f"roles must alternate user/assistant (turn {i} is {m['role']!r})")


def read_conversations(path, template=None) -> list:
    """A .jsonl file of conversations: {"messages": [...]} or Alpaca {"instruction", "input", "output"}
    (the user turn is the instruction, then the input after a blank line when there is one).
    Blank lines are skipped; errors name the file and line, also a turn order `template` (when given)
    cannot render, so one bad record stops the run here with its line, not later without it."""
    conversations = []
    for n, record in jsonl_records(path):
        where = f"{path}:{n}"
        if "messages" in record:
            messages = record["messages"]
        elif "instruction" in record and "output" in record:
            if not all(isinstance(record.get(k, ""), str) for k in ("instruction", "input", "output")):
                raise ValueError(f"{where}: Alpaca fields 'instruction', 'input', 'output' must be strings")
            user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        else:
            raise ValueError(f"{where}: expected {{\"messages\": [...]}} or Alpaca "
                             f"{{\"instruction\", \"input\", \"output\"}}")
        check_messages(messages, where)
        if template is not None:
            try:
                check_roles(messages, template)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        conversations.append(messages)
    if not conversations:
        raise ValueError(f"{path}: no conversations (empty file)")
    return conversations


def chat_text_parts(messages, template, bos_token=None, eos_token=None, generation_prompt=False) -> list:
    """The conversation rendered as [(text, supervised)]: the texts joined are exactly what the Jinja
    template renders; supervised marks each assistant turn's content and its end-of-turn token."""
    parts = [(bos_token, False)] if bos_token else []
    if template == "chatml":
        for m in messages:
            if m["role"] == "assistant":
                parts += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
            else:
                parts.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
        if generation_prompt:
            parts.append(("<|im_start|>assistant\n", False))
    elif template == "mistral":
        if eos_token is None:
            raise ValueError("the mistral chat template needs an eos token; the tokenizer has none")
        check_roles(messages, template)
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        for i, m in enumerate(messages[1:] if system is not None else messages):
            if m["role"] == "user":
                content = f"{system}\n\n{m['content']}" if i == 0 and system is not None else m["content"]
                parts.append((f" [INST] {content} [/INST]", False))
            else:
                # the space belongs to the answer: "▁word" is its first token
                parts.append((" " + m["content"] + eos_token, True))
    else:
        raise ValueError(f"unknown chat template {template!r}; known: {', '.join(CHAT_TEMPLATES)}")
    return parts


def _role_token(tokenizer, token_id):
    return None if token_id is None else tokenizer.id_to_piece(token_id)


def render_chat(messages, template, tokenizer):
    """-> (ids, loss_mask): the token ids of a conversation and, per token, whether it is supervised
    (each assistant turn's content and its end-of-turn token, nothing else; Vikhr §3.3).

    The ids are those of encoding the whole rendered text at once, which is what apply_chat_template
    does. A part's tokens can depend on the text before it (SentencePiece's dummy prefix, merges across
    the seam), so parts are not encoded on their own: each seam between unsupervised and supervised
    text is located by encoding the text up to it, whose ids must be a prefix of the whole's ids (else
    the seam falls inside a token and the mask could not be exact, so we stop)."""
    parts = chat_text_parts(messages, template, _role_token(tokenizer, tokenizer.bos_id),
                            _role_token(tokenizer, tokenizer.eos_id))
    text = "".join(t for t, _ in parts)
    ids = tokenizer.encode(text)
    mask, end = [], 0
    for i, (part, supervised) in enumerate(parts):
        end += len(part)
        if i + 1 < len(parts) and parts[i + 1][1] == supervised:
            continue                                  # not a seam: same flag on both sides
        prefix = ids if end == len(text) else tokenizer.encode(text[:end])
        if prefix != ids[:len(prefix)]:
            raise UnmaskableTurn(f"chat template {template!r}: the tokenizer joins the text on both sides of "
                                 f"{text[max(0, end - 20):end]!r}|{text[end:end + 20]!r} into one token, so the "
                                 "assistant turn cannot be masked exactly")
        mask += [supervised] * (len(prefix) - len(mask))
    return ids, mask


class UnmaskableTurn(ValueError):
    """A turn's first or last token merges with the template around it (byte-level BPE joins "\n" + "\n"),
    so no token boundary separates what is supervised from what is not."""


def chat_prompt(messages, template, tokenizer):
    """Token ids of a conversation so far, ready for the assistant's next turn (for generation)."""
    parts = chat_text_parts(messages, template, _role_token(tokenizer, tokenizer.bos_id),
                            _role_token(tokenizer, tokenizer.eos_id), generation_prompt=True)
    return tokenizer.encode("".join(t for t, _ in parts))


def choose_chat_template(requested, model_dir, model_type, tokenizer):
    """--chat-template auto: the model's own chat_template when it is one of ours (a second SFT round, or
    a teacher sft.py wrote), else ChatML when the tokenizer already has its tokens or the model is a Qwen,
    else Mistral's [INST]. sft.py and distill.py both decide with this, so they render alike."""
    if requested not in (None, "auto"):
        return requested
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            own = json.load(f).get("chat_template")
        for name, jinja in CHAT_TEMPLATES.items():
            if own == jinja:
                return name
    has_chatml = all(t in tokenizer.special_tokens for t in CHAT_SPECIAL_TOKENS["chatml"])
    return "chatml" if has_chatml or model_type.startswith("qwen") else "mistral"


def render_conversations(conversations, template, tokenizer, max_len, overlong):
    """Render each conversation, applying the over-long policy: "drop" a conversation longer than
    max_len tokens, or "truncate" it to its first max_len (dropped anyway if no supervised token is left).
    A conversation whose assistant turn cannot be masked exactly (UnmaskableTurn) is dropped and counted.
    -> (examples [(ids, loss_mask)], counts {kept, truncated, dropped, unmaskable})."""
    examples, counts = [], {"kept": 0, "truncated": 0, "dropped": 0, "unmaskable": 0}
    for messages in conversations:
        try:
            ids, mask = render_chat(messages, template, tokenizer)
        except UnmaskableTurn:
            counts["unmaskable"] += 1
            continue
        if len(ids) > max_len:
            if overlong == "drop" or not any(mask[:max_len]):
                counts["dropped"] += 1
                continue
            ids, mask = ids[:max_len], mask[:max_len]
            counts["truncated"] += 1
        else:
            counts["kept"] += 1
        examples.append((ids, mask))
    return examples, counts


def pack_greedy(lengths, seq_len, order):
    """Greedy packing in the given order: each item joins the current row if it fits, else starts a new
    one. -> rows, each a list of item indices whose lengths sum to at most seq_len (or one longer item)."""
    rows, row, used = [], [], 0
    for i in order:
        if row and used + lengths[i] > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += int(lengths[i])
    if row:
        rows.append(row)
    return rows


def write_chat_tokenizer(model_dir, template, out_dir):
    """The tokenizer files of a chat model in out_dir: the base model's, plus each special token the template needs
    and the vocabulary lacks, plus the template's Jinja as `chat_template` in tokenizer_config.json.
    Returns (tokenizer, added tokens). Tokens are added as user-defined pieces at the end of the
    SentencePiece model, so every reader (sentencepiece, tokenizer.py, transformers) knows them."""
    tok = load_tokenizer(model_dir)
    missing = [t for t in CHAT_SPECIAL_TOKENS[template] if t not in tok.special_tokens]
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(tok, SentencePieceTokenizer):
        pb2 = sp_model_pb2()
        proto = pb2.ModelProto()
        proto.CopyFrom(tok.proto)
        # tokens tokenizer_config.json added on top of the .model go in first, so their ids stay the same
        for text in [tok.added_pieces[i] for i in sorted(tok.added_pieces)] + missing:
            if text in missing and tok.piece_to_id(text) is not None:
                raise ValueError(f"{model_dir}: {text!r} is an ordinary piece of the vocabulary, so it "
                                 "cannot become the special token the chat template needs")
            proto.pieces.add(piece=text, score=0.0, type=pb2.ModelProto.SentencePiece.USER_DEFINED)
        roles = {r: getattr(tok, r.replace("_token", "_id")) for r in ROLES}
        roles = {r: None if i is None else tok.id_to_piece(i) for r, i in roles.items()}
        write_hf_tokenizer_files(proto, tmp, roles, chat_template=CHAT_TEMPLATES[template])
    else:
        if missing:
            raise ValueError(f"{model_dir}: the tokenizer (tokenizer.json) lacks {missing}, which the {template} "
                             "template needs, and nanoadapt adds tokens only to SentencePiece models; "
                             "choose another --chat-template")
        os.makedirs(tmp)
        for name in TOKENIZER_FILES:
            if name != "chat_template.jinja" and os.path.isfile(os.path.join(model_dir, name)):
                shutil.copy2(os.path.join(model_dir, name), tmp)   # (a .jinja file would override ours)
        config_path = os.path.join(tmp, "tokenizer_config.json")
        config = json.load(open(config_path)) if os.path.isfile(config_path) else {}
        config["chat_template"] = CHAT_TEMPLATES[template]
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
    replace_dir(tmp, out_dir)
    return load_tokenizer(out_dir), missing
