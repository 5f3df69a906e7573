"""resize_vocab.py: rows copied bit for bit, averaged rows checked against an independent computation,
extend mode leaves the base untouched, every edge case and bad input, and the output loads in transformers."""
import json
import types
import warnings
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import resize_vocab
import train_tokenizer
from model import Transformer
from tokenizer import write_hf_tokenizer_files
from tokenizer_samples import (EN, PARAGRAPH, RU, byte_level_tokenizer, make_model_dir, sp_without_dummy_prefix,
                               train_sp, write_corpus)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
LLAMA2 = SHARED / "base_tokenizers" / "llama2-32k-bpe.model"
HF_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("resize")


@pytest.fixture(scope="module")
def new_tok(work):
    """The new tokenizer: 600 BPE pieces trained by train_tokenizer.py, mostly on Russian."""
    ru, en = write_corpus(work / "corpus")
    out = work / "new_tok"
    train_tokenizer.main(["--input", str(ru), f"{en}:0.3", "--vocab-size", "600", "--out", str(out), "--threads", "1"])
    return out


@pytest.fixture(scope="module")
def base_sp(work):
    """A Llama-layout 'base' tokenizer (English and a little Russian, byte fallback) with an added <pad>
    (id 400, past the SentencePiece vocabulary) as pad token, as some Llama-2 fine-tunes ship."""
    d = work / "base_tok"
    model = train_sp(work / "base.model", EN + RU[:400], 400)
    write_hf_tokenizer_files(model, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["pad_token"] = "<pad>"
    cfg["added_tokens_decoder"]["400"] = {"content": "<pad>", "special": True}
    cfg["chat_template"] = "{{ messages }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def mistral_base(work, base_sp):
    # 416 rows for 401 tokens: a padded base; its padding rows must not enter the global mean
    return make_model_dir(work / "mistral_base", "mistral", [base_sp / f for f in HF_FILES], 416, pad_token_id=400)


def run(*argv):
    resize_vocab.main([str(a) for a in argv])


def final_pieces(out):
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def expected_rows(W, pieces, base_model_path, added=None):
    """Rows as the issue specifies, computed from sentencepiece directly: (copy id | None, expected row)."""
    sp = spm.SentencePieceProcessor(model_file=str(base_model_path))
    no_prefix = sp_without_dummy_prefix(base_model_path)
    base = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    base.update(added or {})
    global_mean = W[:len(base)].mean(0)
    rows = []
    for p in pieces:
        if p in base:
            rows.append((base[p], W[base[p]]))
        elif p in ("<|im_start|>", "<|im_end|>"):          # special tokens the base lacks
            rows.append((None, global_mean))
        elif len(p) == 6 and p.startswith("<0x"):           # a byte the base has no byte token for:
            ids = no_prefix.encode(chr(int(p[3:5], 16))) if int(p[3:5], 16) < 0x80 else []  # ASCII is text
            rows.append((None, W[ids].mean(0) if ids and sp.unk_id() not in ids else global_mean))
        else:
            ids = no_prefix.encode(p.replace("▁", " "))      # "▁мир" is " мир", no dummy prefix
            if not ids or sp.unk_id() in ids:
                rows.append((None, global_mean))
            else:
                rows.append((None, W[ids].mean(0)))
    return rows


def check_rows(W_new, W_base, pieces, base_model_path, added=None):
    for i, (src, want) in enumerate(expected_rows(W_base, pieces, base_model_path, added)):
        if src is not None:
            assert torch.equal(W_new[i], W_base[src]), f"row {i} {pieces[i]!r} is not a bitwise copy of {src}"
        else:
            torch.testing.assert_close(W_new[i], want, rtol=0, atol=1e-6, msg=f"row {i} {pieces[i]!r}")
    assert torch.count_nonzero(W_new[len(pieces):]) == 0, "padding rows must be zero"


def test_replace(work, new_tok, base_sp, mistral_base):
    out = work / "replaced"
    run("--model", mistral_base, "--tokenizer", new_tok, "--out", out, "--mode", "replace")
    base, model = Transformer.from_pretrained(mistral_base), Transformer.from_pretrained(out)
    pieces = final_pieces(out)
    assert pieces[:600] == final_pieces(new_tok) and pieces[600:] == ["<pad>"]  # <pad> carried over
    cfg = model.config
    assert cfg.vocab_size == 640 and cfg.vocab_size % 64 == 0 and not cfg.tie_word_embeddings
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 600)
    added = {"<pad>": 400}
    check_rows(model.model.embed_tokens.weight, base.model.embed_tokens.weight, pieces, work / "base.model", added)
    check_rows(model.lm_head.weight, base.lm_head.weight, pieces, work / "base.model", added)
    report = json.loads((out / "resize_vocab.json").read_text())
    assert report["copied"] + report["averaged"] + report["global_mean"] == 601 and report["padding"] == 39
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(601, 640))   # transformers' generate never picks a padding row
    assert report["roles"] == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    assert report["averaged_examples"] and report["global_mean_tokens"] == ["<|im_start|>", "<|im_end|>"]
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == "{{ messages }}" and tok_cfg["pad_token"] == "<pad>"
    assert not [p for p in work.iterdir() if p.name.startswith(".")], "temporary directory left behind"

    # the output loads in transformers, computes what nanoadapt computes, and encodes like sentencepiece
    from transformers import AutoModelForCausalLM, AutoTokenizer
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_tok = AutoTokenizer.from_pretrained(str(out))
        hf_model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = sp.encode(PARAGRAPH)
    assert hf_tok.encode(PARAGRAPH, add_special_tokens=False) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_model(x).logits, rtol=1e-4, atol=1e-4)


def test_extend_keeps_what_the_base_knew(work, new_tok, mistral_base):
    out = work / "extended"
    run("--model", mistral_base, "--tokenizer", new_tok, "--out", out, "--mode", "extend")
    from sentencepiece import sentencepiece_model_pb2 as pb2
    base_p, new_p, merged = pb2.ModelProto(), pb2.ModelProto(), pb2.ModelProto()
    base_p.ParseFromString((work / "base.model").read_bytes())
    new_p.ParseFromString((new_tok / "tokenizer.model").read_bytes())
    merged.ParseFromString((out / "tokenizer.model").read_bytes())
    # base pieces keep ids and scores; the added <pad> keeps id 400; new pieces follow, scores below every base score
    n = len(base_p.pieces)
    assert [(p.piece, p.score, p.type) for p in merged.pieces[:n]] == [(p.piece, p.score, p.type) for p in base_p.pieces]
    assert merged.pieces[n].piece == "<pad>"
    appended = [p for p in merged.pieces[n + 1:] if p.type == pb2.ModelProto.SentencePiece.NORMAL]
    assert appended and all(p.score < min(q.score for q in base_p.pieces) for p in appended)
    assert all(a.score > b.score for a, b in zip(appended, appended[1:]))
    base_pieces = {p.piece for p in base_p.pieces}
    assert {p.piece for p in merged.pieces} == base_pieces | {"<pad>"} | {p.piece for p in new_p.pieces
                                                                           if p.type in (1, 4)}  # normal, user-defined

    # text encoded with the base tokenizer: the same logits from the resized model as from the base
    base, model = Transformer.from_pretrained(mistral_base), Transformer.from_pretrained(out)
    sp_base, sp_merged = (spm.SentencePieceProcessor(model_file=str(f)) for f in (work / "base.model",
                                                                                  out / "tokenizer.model"))
    ids = torch.tensor([sp_base.encode(PARAGRAPH + " " + EN[:200])])
    with torch.no_grad():
        assert torch.equal(model(ids)[..., :401], base(ids)[..., :401])
    pieces = final_pieces(out)
    check_rows(model.model.embed_tokens.weight, base.model.embed_tokens.weight, pieces, work / "base.model",
               {"<pad>": 400})
    check_rows(model.lm_head.weight, base.lm_head.weight, pieces, work / "base.model", {"<pad>": 400})
    # the merged tokenizer spells Russian shorter than the base, English as the base does
    assert len(sp_merged.encode(RU)) < len(sp_base.encode(RU))
    assert model.config.vocab_size == -(-len(pieces) // 64) * 64


def test_tied_head_stays_tied(work, new_tok, base_sp):
    base_dir = make_model_dir(work / "llama_tied", "llama_tied", [base_sp / f for f in HF_FILES], 401)
    out = work / "llama_tied_out"
    run("--model", base_dir, "--tokenizer", new_tok / "tokenizer.model", "--out", out)  # a .model file as NEW
    base, model = Transformer.from_pretrained(base_dir), Transformer.from_pretrained(out)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    check_rows(model.model.embed_tokens.weight, base.model.embed_tokens.weight, final_pieces(out),
               work / "base.model", {"<pad>": 400})


def test_base_without_byte_fallback_spells_with_unk(work, new_tok):
    """English-only base without byte fallback: Cyrillic pieces are unk to it -> global mean."""
    model = train_sp(work / "nobytes.model", EN, 300, byte_fallback=False)
    d = work / "nobytes_tok"
    write_hf_tokenizer_files(model, d)
    base_dir = make_model_dir(work / "nobytes_base", "mistral", [d / f for f in HF_FILES], 300)
    out = work / "nobytes_out"
    run("--model", base_dir, "--tokenizer", new_tok, "--out", out)
    base, new = Transformer.from_pretrained(base_dir), Transformer.from_pretrained(out)
    pieces = final_pieces(out)
    check_rows(new.model.embed_tokens.weight, base.model.embed_tokens.weight, pieces, model)
    report = json.loads((out / "resize_vocab.json").read_text())
    assert "▁в" in report["global_mean_tokens"] and report["global_mean"] > 128 + 100  # bytes >= 0x80, Cyrillic


def test_byte_level_json_base_replace(work, new_tok):
    """A Qwen-style base (tokenizer.json, byte-level BPE, no bos, eos <|im_end|>) works in replace mode."""
    from tokenizers import Tokenizer
    tok_dir = byte_level_tokenizer(work / "qwen_tok", RU + EN, 400)
    base_dir = make_model_dir(work / "qwen_base", "qwen2", [tok_dir / "tokenizer.json", tok_dir / "tokenizer_config.json"],
                              400, bos_token_id=None, eos_token_id=[2, 0], pad_token_id=0)
    # ids that only generation_config.json holds (base ids: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>);
    # its bos is a byte-level merge the new vocabulary has no piece for: dropped, not left pointing elsewhere
    merged = max(Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab().values())
    gen_path = base_dir / "generation_config.json"
    gen_path.write_text(json.dumps({**json.loads(gen_path.read_text()), "bos_token_id": merged,
                                    "eos_token_id": [2, 0], "decoder_start_token_id": 1}))
    out = work / "qwen_out"
    run("--model", base_dir, "--tokenizer", new_tok, "--out", out)
    gen = json.loads((out / "generation_config.json").read_text())
    assert "bos_token_id" not in gen and (gen["decoder_start_token_id"], gen["pad_token_id"]) == (3, 600)
    assert gen["eos_token_id"] == [4, 600]              # the stop list, remapped (it holds config.json's eos)
    base, model = Transformer.from_pretrained(base_dir), Transformer.from_pretrained(out)
    W0, W1 = base.model.embed_tokens.weight, model.model.embed_tokens.weight
    hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    vocab = hf.get_vocab()
    from tokenizer import byte_level_alphabet
    table = byte_level_alphabet()
    pieces = final_pieces(out)
    assert pieces[600:] == ["<|endoftext|>"]  # the base's specials the new tokenizer lacks are carried over
    global_mean = W0[:400].mean(0)
    for i, p in enumerate(pieces):
        if p in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
            assert torch.equal(W1[i], W0[vocab[p]])
        elif p.startswith("<0x") and len(p) == 6:                                  # byte -> its byte-level char
            assert torch.equal(W1[i], W0[vocab[table[int(p[3:5], 16)]]])
        elif p in ("<unk>", "<s>", "</s>"):
            torch.testing.assert_close(W1[i], global_mean, rtol=0, atol=1e-6)
        else:
            ids = hf.encode(p.replace("▁", " "), add_special_tokens=False).ids
            torch.testing.assert_close(W1[i], W0[ids].mean(0), rtol=0, atol=1e-6)
    cfg = model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (None, [4, 600], 600)   # a list, remapped
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == (None, "<|im_end|>", "<|endoftext|>")
    assert tok_cfg["add_bos_token"] is False and "<|im_start|>" in tok_cfg["chat_template"]
    assert "Qwen2Tokenizer" in json.loads((out / "resize_vocab.json").read_text())["note"]


def test_carried_over_tokens_keep_the_base_order_and_leave_out_whitespace(base_sp):
    """The base's special tokens the new vocabulary lacks are appended in the base's id order (not by
    text); one with whitespace in it is left out: sentencepiece could never match it."""
    from tokenizer import load_sp_proto
    base = types.SimpleNamespace(special_tokens={"<s>": 1, "<|z_last|>": 9, "    ": 7, "<|a_first|>": 5,
                                                 "<|end of text|>": 6})
    proto = load_sp_proto(base_sp / "tokenizer.model")
    n = len(proto.pieces)
    appended, left_out = resize_vocab.carry_over_special_tokens(proto, base)
    assert appended == ["<|a_first|>", "<|z_last|>"] and left_out == ["<|end of text|>", "    "]
    assert [p.piece for p in proto.pieces[n:]] == appended


def test_bad_inputs_leave_nothing(work, new_tok, mistral_base, base_sp):
    bad = work / "bad"
    bad.mkdir()
    out = bad / "out"

    def fails(match, *argv):
        with pytest.raises(SystemExit, match=match):
            run(*argv, "--out", out)
        assert not out.exists() and list(bad.iterdir()) == [p for p in bad.iterdir() if not p.name.startswith(".")]

    fails("missing.model: SentencePiece model file not found", "--model", mistral_base,
          "--tokenizer", bad / "missing.model")
    (bad / "corrupt.model").write_bytes(b"\x08\x96\x01 definitely not a model \xff\xfe")
    fails("corrupt.model: not a valid SentencePiece model", "--model", mistral_base, "--tokenizer", bad / "corrupt.model")
    fails("no tokenizer.model", "--model", mistral_base, "--tokenizer", bad)
    no_tok = make_model_dir(bad / "no_tok_base", "mistral", [], 416)
    fails("no_tok_base: no tokenizer found", "--model", no_tok, "--tokenizer", new_tok)
    unigram = train_sp(bad / "unigram.model", RU + EN, 500, model_type="unigram")
    fails("the base tokenizer is BPE and the new one UNIGRAM.*use --mode replace", "--model", mistral_base,
          "--tokenizer", unigram, "--mode", "extend")
    (bad / "uni_tok").mkdir()
    (bad / "uni_tok" / "tokenizer.model").write_bytes(unigram.read_bytes())
    unigram_base = make_model_dir(bad / "uni_base", "mistral", [bad / "uni_tok" / "tokenizer.model"], 512)
    fails("the tokenizers are UNIGRAM; extend works with BPE", "--model", unigram_base, "--tokenizer", unigram,
          "--mode", "extend")
    json_base = make_model_dir(bad / "json_base", "qwen2",
                               [byte_level_tokenizer(bad / "qt", RU + EN, 300) / "tokenizer.json"], 300)
    fails("is tokenizer.json, not SentencePiece.*use --mode replace", "--model", json_base, "--tokenizer", new_tok,
          "--mode", "extend")


# ------------------------------------------------------------------------------------------------------------------
# the real Llama-2 tokenizer (../shared/data)


@pytest.mark.skipif(not LLAMA2.is_file(), reason="../shared/data is absent")
@pytest.mark.parametrize("mode", ["replace", "extend"])
def test_llama2_base_end_to_end(work, mode):
    tok_dir = work / "llama2_tok"
    if not tok_dir.exists():
        write_hf_tokenizer_files(LLAMA2, tok_dir)
    base_dir = work / "llama2_base"
    if not base_dir.exists():
        make_model_dir(base_dir, "mistral", [tok_dir / f for f in HF_FILES], 32000, hidden_size=32,
                       num_attention_heads=2, num_key_value_heads=1, intermediate_size=48)
    ru_tok = work / "ru_tok"
    if not ru_tok.exists():
        train_tokenizer.main(["--input", str(SHARED / "ru" / "Gogol_Taras.txt"), "--vocab-size", "2000",
                              "--out", str(ru_tok), "--threads", "1"])
    out = work / f"llama2_{mode}"
    run("--model", base_dir, "--tokenizer", ru_tok, "--out", out, "--mode", mode)
    base, model = Transformer.from_pretrained(base_dir), Transformer.from_pretrained(out)
    pieces = final_pieces(out)
    llama_pieces = set(final_pieces(tok_dir))
    assert len(pieces) == (2000 if mode == "replace" else
                           32000 + sum(1 for p in final_pieces(ru_tok) if p not in llama_pieces))
    assert model.config.vocab_size % 64 == 0
    W0, W1 = base.model.embed_tokens.weight, model.model.embed_tokens.weight
    check_rows(W1, W0, pieces, LLAMA2)
    text = (SHARED / "ru" / "Turgenev_Rudin.txt").read_text(encoding="utf-8")[:3000]
    sp_base = spm.SentencePieceProcessor(model_file=str(LLAMA2))
    sp_new = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    if mode == "extend":  # the base's vocabulary plus Russian pieces: shorter Russian
        assert len(sp_new.encode(text)) < len(sp_base.encode(text))
    from transformers import AutoTokenizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert AutoTokenizer.from_pretrained(str(out)).encode(text, add_special_tokens=False) == sp_new.encode(text)
    if mode == "extend":
        ids = torch.tensor([sp_base.encode(text[:500])])
        with torch.no_grad():
            assert torch.equal(model(ids)[..., :32000], base(ids))
