"""sft.py, lora.py and tokenizer.py's chat templates: the loss mask by hand, rendering against
transformers' apply_chat_template, LoRA (identity at step 0, merge, gradients, HF loading, trained rows
for added tokens, PEFT loading the adapter), packing, bad input, and an end-to-end run with a resume
after a simulated kill."""
import io
import json
import os
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

import model as M
import sft
from model import Transformer
from tiny_models import make_hf_model, rel_err

os.environ.setdefault("NANOADAPT_ATTENTION", "sdpa")

TEXTS = ["Привет, как дела? Hello world, this is a test.", "Кошка сидит на окне и смотрит на улицу.",
         "The quick brown fox jumps over the lazy dog.", "Ответ: да, конечно. Собака, дом, окно."]
CONVERSATIONS = [
    [{"role": "user", "content": "Привет!"}, {"role": "assistant", "content": "Hello world."}],
    [{"role": "system", "content": "Ты помощник."}, {"role": "user", "content": "Кошка?"},
     {"role": "assistant", "content": "Да, кошка сидит на окне."}, {"role": "user", "content": "А собака?\n"},
     {"role": "assistant", "content": " дом\n\nокно "}],
    [{"role": "user", "content": "  leading spaces"}, {"role": "assistant", "content": "\nnew line first"},
     {"role": "user", "content": "The quick brown fox"}, {"role": "assistant", "content": "jumps."}],
]


def write_sp_tokenizer(path, chat_tokens=False):
    """A tiny SentencePiece BPE (train_tokenizer.py's settings), as HF tokenizer files in `path`."""
    import sentencepiece as spm
    from tokenizer import write_hf_tokenizer_files
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 50), model_writer=buf, model_type="bpe", vocab_size=400,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"] if chat_tokens else [], minloglevel=2)
    write_hf_tokenizer_files(buf.getvalue(), path)


def make_base(path, family="qwen2", chat_tokens=False):
    """A tiny random model (transformers) with the tiny tokenizer, as one HF directory."""
    write_sp_tokenizer(path, chat_tokens)
    make_hf_model(family, path, vocab_size=400)
    write_sp_tokenizer(path, chat_tokens)      # save_pretrained of transformers may rewrite tokenizer files
    return str(path)


def hf_ids(tok_dir, messages, **kw):
    from transformers import AutoTokenizer
    out = AutoTokenizer.from_pretrained(tok_dir).apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"] if not isinstance(out, list) else out)


# ------------------------------------------------------------------------------------------------
# chat templates and the loss mask
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_tokenizers(tmp_path_factory):
    """{template: (tokenizer, dir, added)} from a base tokenizer that has no ChatML tokens."""
    root = tmp_path_factory.mktemp("tok")
    write_sp_tokenizer(root / "base")
    return {t: (*M.write_chat_tokenizer(str(root / "base"), t, str(root / t)), str(root / t))
            for t in M.CHAT_TEMPLATES}


def test_loss_mask_two_turns_by_hand(chat_tokenizers):
    """Expected ids and mask assembled piece by piece with encode_continuation (no dummy prefix:
    every piece here follows other text), independently of render_chat's prefix encoding."""
    messages = [{"role": "user", "content": "Привет!"}, {"role": "assistant", "content": "Hello world."},
                {"role": "user", "content": "Кошка?"}, {"role": "assistant", "content": "Да, кошка."}]
    tok, _, _ = chat_tokenizers["chatml"]
    S, E = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    c = tok.encode_continuation
    expected = [(tok.bos_id, 0), (S, 0)] + [(i, 0) for i in c("user\nПривет!")] + [(E, 0)] + \
        [(i, 0) for i in c("\n")] + [(S, 0)] + [(i, 0) for i in c("assistant\n")] + \
        [(i, 1) for i in c("Hello world.")] + [(E, 1)] + [(i, 0) for i in c("\n")] + \
        [(S, 0)] + [(i, 0) for i in c("user\nКошка?")] + [(E, 0)] + [(i, 0) for i in c("\n")] + \
        [(S, 0)] + [(i, 0) for i in c("assistant\n")] + [(i, 1) for i in c("Да, кошка.")] + [(E, 1)] + \
        [(i, 0) for i in c("\n")]
    ids, mask = M.render_chat(messages, "chatml", tok)
    assert list(zip(ids, map(int, mask))) == expected
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Hello world.<|im_end|>Да, кошка.<|im_end|>"

    tok, _, _ = chat_tokenizers["mistral"]
    B, E = tok.bos_id, tok.eos_id
    expected = [(B, 0)] + [(i, 0) for i in c(" [INST] Привет! [/INST]")] + [(i, 1) for i in c(" Hello world.")] + \
        [(E, 1)] + [(i, 0) for i in c(" [INST] Кошка? [/INST]")] + [(i, 1) for i in c(" Да, кошка.")] + [(E, 1)]
    ids, mask = M.render_chat(messages, "mistral", tok)
    assert list(zip(ids, map(int, mask))) == expected


@pytest.mark.parametrize("template", list(M.CHAT_TEMPLATES))
def test_rendering_equals_apply_chat_template(chat_tokenizers, template):
    tok, added, tok_dir = chat_tokenizers[template]
    assert added == M.CHAT_SPECIAL_TOKENS[template]          # the base tokenizer had none of them
    for messages in CONVERSATIONS:
        ids, mask = M.render_chat(messages, template, tok)
        assert ids == hf_ids(tok_dir, messages), messages
        assert len(mask) == len(ids) and any(mask)
        prompt = messages[:-1]
        assert M.chat_prompt(prompt, template, tok) == hf_ids(tok_dir, prompt, add_generation_prompt=True)


def test_mistral_template_rejects_non_alternating_roles(chat_tokenizers):
    tok = chat_tokenizers["mistral"][0]
    with pytest.raises(ValueError, match="alternate"):
        M.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                       {"role": "assistant", "content": "c"}], "mistral", tok)


def test_added_token_rows_are_the_mean(tmp_path):
    base = make_base(tmp_path / "base", family="llama")            # untied head
    model = Transformer.from_pretrained(base)
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    sft.add_token_rows(model, 402, [400, 401], 400, torch.float32)
    assert model.model.embed_tokens.weight.shape == (402, 64) and model.config.vocab_size == 402
    assert torch.equal(model.model.embed_tokens.weight[:400], embed)
    assert torch.allclose(model.model.embed_tokens.weight[400:], embed.mean(0).expand(2, -1))
    assert torch.allclose(model.lm_head.weight[401], head.mean(0))
    # under FSDP the weights are still the checkpoint's bf16 here: the mean is taken and kept in fp32
    stored = Transformer.from_pretrained(base, dtype=torch.bfloat16)
    sft.add_token_rows(stored, 402, [400, 401], 400, torch.float32)
    rows = stored.model.embed_tokens.weight[400:]
    exact = embed.to(torch.bfloat16).double().mean(0)                 # float64 mean of the stored values
    assert rows.dtype == torch.float32 and (rows.double() - exact).abs().max() < 1e-7


# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------
def test_lora(tmp_path):
    import transformers
    from safetensors.torch import load_file
    base = make_base(tmp_path / "base", family="qwen2")
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    model = Transformer.from_pretrained(base)
    base_keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(ids)
    targets = ["q_proj", "v_proj", "down_proj"]
    wrapped = M.add_lora(model, targets, rank=4, alpha=8)
    assert len(wrapped) == 3 * 2
    with torch.no_grad():
        assert torch.equal(model(ids), ref)                  # B = 0: exactly the base model at step 0

    # a few steps: only the adapter gets gradients
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):
        model(ids).logsumexp(-1).mean().backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (".lora_" in name), name
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        out = model(ids)
    assert rel_err(out, ref) > 1e-3                           # the adapter did change the model

    # under bf16 autocast a wrapped layer computes W x + b + (alpha / r) B A x with every matmul in bf16,
    # and takes its bf16 input (what it gets in training) as it is: no fp32 copy of x is made on the way
    from torch.overrides import TorchFunctionMode

    class FloatCopies(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.Tensor.to and out.dtype == torch.float32 and args[0].dtype != torch.float32:
                self.shapes.append(tuple(out.shape))
            return out
    layer, bf = model.model.layers[0].self_attn.q_proj, torch.bfloat16
    xb = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1)).to(bf)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=bf), FloatCopies() as copies:
            got = layer(xb)
        low_rank = F.linear(F.linear(xb, layer.lora_A.weight.to(bf)), layer.lora_B.weight.to(bf))
        want = F.linear(xb, layer.weight.to(bf), layer.bias.to(bf)) + layer.scale * low_rank
    assert got.dtype == bf and torch.equal(got, want)
    assert copies.shapes == []

    # merged: the base keys only, same logits in our model and in transformers
    merged = M.merged_state_dict(model)
    assert set(merged) == base_keys
    model.save_pretrained(tmp_path / "merged")                # a model with adapters is saved merged
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert set(saved) == base_keys and all(torch.equal(saved[k], merged[k]) for k in saved)
    with torch.no_grad():
        assert rel_err(Transformer.from_pretrained(tmp_path / "merged")(ids), out) < 1e-5
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert rel_err(hf(ids).logits, out) < 1e-5

    # the adapter on its own: PEFT names and config; loads back into a freshly wrapped base
    M.save_lora_adapter(model, tmp_path / "adapter", base_model=base)
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["peft_type"]) == (4, 8, sorted(targets), "LORA")
    state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state and len(state) == 12
    fresh = Transformer.from_pretrained(base)
    M.add_lora(fresh, targets, rank=4, alpha=8)
    M.load_lora_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(ids), out)

    with pytest.raises(ValueError, match="match no linear layer"):
        M.add_lora(Transformer.from_pretrained(base), ["qproj"], rank=4, alpha=8)


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_trainable_token_rows(tmp_path, family):
    """train_token_rows under LoRA: embedding and head compute what plain F.embedding / F.linear compute with
    the rows written in (float64 reference); only those rows get gradients (a tied head and its embedding
    share them); merging writes them into both matrices, nothing else changes; the adapter holds them."""
    from safetensors.torch import load_file
    make_hf_model(family, tmp_path / "hf", vocab_size=64)
    model = Transformer.from_pretrained(tmp_path / "hf")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    M.add_lora(model, ["q_proj"], rank=2, alpha=4)
    rows = [5, 9]
    M.train_token_rows(model, rows)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 + (1 if family == "llama_tied" else 2)   # 2 layers' A and B, the rows
    with torch.no_grad():
        for p in model.model.embed_tokens.trainable_rows, model.lm_head.trainable_rows:
            p.add_(torch.randn_like(p))                      # rows that differ from the base's
    ids = torch.tensor([[1, 5, 7, 9, 9, 3]])
    emb, head = model.model.embed_tokens, model.lm_head
    emb_w, head_w = base["model.embed_tokens.weight"].double().clone(), base["lm_head.weight"].double().clone()
    emb_w[rows], head_w[rows] = emb.trainable_rows.detach().double(), head.trainable_rows.detach().double()
    h = torch.randn(3, 64, dtype=torch.float64)
    assert torch.allclose(emb(ids).double(), F.embedding(ids, emb_w), atol=1e-6)
    assert torch.allclose(head(h.float()).double(), F.linear(h, head_w), atol=1e-4)

    opt = torch.optim.SGD(trainable, lr=0.1)
    model(ids).logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    for p in {emb.trainable_rows, head.trainable_rows}:
        assert p.grad is not None and p.grad.abs().sum(1).gt(0).all()
    opt.step()
    merged = M.merged_state_dict(model)
    for key in "model.embed_tokens.weight", "lm_head.weight":
        changed = (merged[key] != base[key]).any(1).nonzero().flatten().tolist()
        assert changed == rows, key                           # the rows, and only they
    assert torch.equal(merged["model.embed_tokens.weight"][rows], emb.trainable_rows.detach())
    assert torch.equal(merged["lm_head.weight"][rows], head.trainable_rows.detach())
    assert set(merged) == set(base)

    M.save_lora_adapter(model, tmp_path / "adapter")
    cfg = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    modules = ["embed_tokens"] + ([] if family == "llama_tied" else ["lm_head"])
    assert cfg["trainable_token_indices"] == {m: rows for m in modules}
    state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert torch.equal(state["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"],
                       emb.trainable_rows.detach())
    assert ("base_model.model.lm_head.token_adapter.trainable_tokens_delta" in state) == (family == "llama")

    # an adapter from before trained rows existed: a clear refusal, not a list of missing keys
    lora_only = {k: v for k, v in M.lora_state_dict(model).items() if ".lora_" in k}
    with pytest.raises(ValueError, match="no trained rows for the chat template's tokens.*start the run again"):
        M.load_lora_state_dict(model, lora_only, "old checkpoint")
    if family == "llama":                                     # LoRA on the (untied) head cannot also take rows
        other = Transformer.from_pretrained(tmp_path / "hf")
        M.add_lora(other, ["q_proj", "lm_head"], rank=2, alpha=4)
        with pytest.raises(ValueError, match="drop lm_head from --lora-targets"):
            M.train_token_rows(other, rows)


# ------------------------------------------------------------------------------------------------
# packing and data
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mistral", "qwen2"])       # mistral: sliding window 8 < conversation
def test_packed_conversations_have_the_same_per_token_loss(chat_tokenizers, tmp_path, family):
    tok = chat_tokenizers["chatml"][0]
    make_hf_model(family, tmp_path / "m", vocab_size=tok.vocab_size)
    model = Transformer.from_pretrained(tmp_path / "m")
    examples = [M.render_chat(m, "chatml", tok) for m in CONVERSATIONS]
    T = sum(len(ids) for ids, _ in examples) + 5                     # room for padding at the end
    with torch.no_grad():
        packed = sft.token_losses(model, *sft.make_batch([[0, 1, 2]], examples, T, pad_id=0))[0]
        start = 0
        for i, (ids, mask) in enumerate(examples):
            batch = sft.make_batch([[i]], examples, len(ids), pad_id=0)
            alone = sft.token_losses(model, *batch)[0]
            assert int((batch[1] != sft.IGNORE).sum()) == sum(mask[1:]) == sum(mask)   # first token never supervised
            assert torch.allclose(packed[start:start + len(ids)], alone, rtol=1e-5, atol=1e-6)
            start += len(ids)
        assert (packed[start:] == 0).all()


def test_pack_and_overlong_policy(chat_tokenizers):
    assert M.pack_greedy([5, 3, 4, 8, 1], seq_len=8, order=[0, 1, 2, 3, 4]) == [[0, 1], [2], [3], [4]]
    tok = chat_tokenizers["chatml"][0]
    lengths = [len(M.render_chat(m, "chatml", tok)[0]) for m in CONVERSATIONS]
    seq_len = sorted(lengths)[1]                                     # the longest one does not fit
    kept, counts = M.render_conversations(CONVERSATIONS, "chatml", tok, seq_len, "drop")
    assert counts == {"kept": 2, "truncated": 0, "dropped": 1, "unmaskable": 0} and len(kept) == 2
    kept, counts = M.render_conversations(CONVERSATIONS, "chatml", tok, seq_len, "truncate")
    assert counts == {"kept": 2, "truncated": 1, "dropped": 0, "unmaskable": 0} and max(len(ids) for ids, _ in kept) == seq_len


def test_unmaskable_turn_is_dropped_not_fatal(tmp_path):
    """A byte-level BPE (Qwen-style, regex splitting "\s*[\r\n]+") merges the template's "assistant\n"
    with an answer that starts with "\n" into one token: that conversation cannot be masked exactly, so
    it is dropped and counted; the others are kept (it used to stop the whole run)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizer_samples import EN, RU
    split = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator((EN + RU + "\n\n\n").split(" "), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    tok = M.load_tokenizer(tmp_path)
    convs = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
             for answer in ("Hello", "\nHello", " Hello")]
    with pytest.raises(ValueError, match="cannot be masked exactly"):
        M.render_chat(convs[1], "chatml", tok)
    kept, counts = M.render_conversations(convs, "chatml", tok, 64, "drop")
    assert counts == {"kept": 2, "truncated": 0, "dropped": 0, "unmaskable": 1}
    supervised = [[i for i, m in zip(ids, mask) if m] for ids, mask in kept]    # the answer, then <|im_end|>
    assert [tok.decode(s[:-1]) for s in supervised] == ["Hello", " Hello"]
    assert [s[-1] for s in supervised] == [tok.special_tokens["<|im_end|>"]] * 2


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]\n', "bad.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:2: no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}\n', "bad.jsonl:2: message 0 has unknown role 'bot'"),
    ('{"prompt": "hi", "completion": "x"}\n', "bad.jsonl:2: expected"),
    ('["hi"]\n', "bad.jsonl:2: expected a JSON object, got list"),
])
def test_bad_input_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n' + content)
    with pytest.raises(ValueError, match=message):
        M.read_conversations(str(path))


def test_a_turn_order_the_template_cannot_render_names_file_and_line(tmp_path):
    """Two user turns in a row: ChatML renders them, Mistral's [INST] cannot; given the template,
    reading stops at that record's line (sft.py and distill.py read with their template)."""
    path = tmp_path / "chat.jsonl"
    two_users = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                              {"role": "assistant", "content": "c"}]}
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n' + json.dumps(two_users) + "\n")
    assert len(M.read_conversations(str(path), "chatml")) == 2
    with pytest.raises(ValueError, match=r"chat.jsonl:2: mistral chat template: .*alternate"):
        M.read_conversations(str(path), "mistral")
    base = make_base(tmp_path / "base", family="llama")
    with pytest.raises(ValueError, match=r"chat.jsonl:2: mistral chat template"):
        sft.main(["--model", base, "--data", str(path), "--out", str(tmp_path / "run"), "--chat-template", "mistral"])


def test_labels_are_the_next_supervised_token(chat_tokenizers):
    """make_batch by hand: labels[t] = ids[t + 1] exactly where token t + 1 is supervised, in each packed
    conversation, IGNORE elsewhere (the answer's first token is learnt, the template after <|im_end|> not)."""
    tok = chat_tokenizers["chatml"][0]
    convs = [[{"role": "user", "content": "Привет"}, {"role": "assistant", "content": "Здравствуй"}],
             [{"role": "user", "content": "Как дела?"}, {"role": "assistant", "content": "Хорошо"},
              {"role": "user", "content": "А ты?"}, {"role": "assistant", "content": "Тоже"}]]
    examples = [M.render_chat(c, "chatml", tok) for c in convs]
    seq_len = sum(len(ids) for ids, _ in examples) + 3
    ids, labels, doc_ids = sft.make_batch([[0, 1]], examples, seq_len, pad_id=0)
    expected = []
    for tokens, mask in examples:
        expected += [tokens[t + 1] if mask[t + 1] else sft.IGNORE for t in range(len(tokens) - 1)] + [sft.IGNORE]
    expected += [sft.IGNORE] * 3
    assert labels[0].tolist() == expected
    assert ids[0].tolist() == examples[0][0] + examples[1][0] + [0] * 3
    assert doc_ids[0].tolist() == [0] * len(examples[0][0]) + [1] * len(examples[1][0]) + [2] * 3
    im_end = tok.special_tokens["<|im_end|>"]
    assert expected.count(im_end) == 3                    # each answer's end-of-turn token is learnt


def test_empty_file_and_alpaca_records(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no conversations"):
        M.read_conversations(str(tmp_path / "empty.jsonl"))
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "Переведи", "input": "cat", "output": "кошка"}) + "\n")
    assert M.read_conversations(str(tmp_path / "a.jsonl")) == [
        [{"role": "user", "content": "Переведи\n\ncat"}, {"role": "assistant", "content": "кошка"}]]


# ------------------------------------------------------------------------------------------------
# end to end: sft.py runs, its output chats in transformers, and a resumed run repeats the losses
# ------------------------------------------------------------------------------------------------
def write_chat_data(path, n=40, seed=0):
    rng, words = random.Random(seed), ["кошка", "собака", "дом", "окно", "cat", "dog"]
    with open(path, "w") as f:
        for i in range(n):
            w, k = rng.choice(words), rng.randint(1, 4)
            record = ({"messages": [{"role": "user", "content": f"Повтори {w} {k} раз"},
                                    {"role": "assistant", "content": " ".join([w] * k)}]} if i % 2 else
                      {"instruction": f"Повтори {w}", "input": str(k), "output": " ".join([w] * k)})
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return str(path)


def run_sft(base, data, out, *extra):
    sft.main(["--model", base, "--data", data, "--out", str(out), "--seq-len", "64", "--batch-size", "2",
              "--grad-accum", "2", "--lr", "3e-3", "--epochs", "1", "--max-steps", "4", "--save-every", "2",
              "--eval-every", "2", "--samples", "1", "--sample-tokens", "4", "--seed", "1", *extra])
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sft_end_to_end_and_resume(tmp_path, mode):
    import transformers
    base = make_base(tmp_path / "base", family="llama")      # a tokenizer without ChatML tokens
    data = write_chat_data(tmp_path / "chat.jsonl")
    extra = ["--chat-template", "chatml"] + (["--lora-rank", "4", "--lora-alpha", "16", "--lora-dropout", "0.1"]
                                             if mode == "lora" else [])
    out = tmp_path / "run"
    metrics = run_sft(base, data, out, *extra)
    losses = {r["step"]: r["loss"] for r in metrics if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4]
    val = [r["val_loss"] for r in metrics if "val_loss" in r]
    assert val[-1] < val[0]                                       # held-out loss went down

    # the output: tokens added, template in tokenizer_config.json, same ids and logits in transformers
    tok = M.load_tokenizer(out)
    assert tok.special_tokens["<|im_start|>"] == 400 and tok.special_tokens["<|im_end|>"] == 401
    messages = [{"role": "user", "content": "Повтори дом 2 раз"}, {"role": "assistant", "content": "дом дом"}]
    ids = M.render_chat(messages, "chatml", tok)[0]
    assert hf_ids(str(out), messages) == ids
    ours = Transformer.from_pretrained(out)
    assert set(ours.state_dict()) == set(Transformer.from_pretrained(base).state_dict())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(hf(torch.tensor([ids])).logits, ours(torch.tensor([ids]))) < 1e-5
    assert json.load(open(out / "generation_config.json"))["eos_token_id"] == [401, 2]
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors") == (mode == "lora")
    if mode == "lora":
        start, trained = Transformer.from_pretrained(base).state_dict(), ours.state_dict()
        for key in "model.embed_tokens.weight", "lm_head.weight":
            assert torch.equal(trained[key][:400], start[key]), key           # the base's rows: frozen
            assert not torch.equal(trained[key][400], trained[key][401]), key  # the added two trained apart
        import peft                                         # PEFT applies adapter/ to the base, rows included
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        hf_base.resize_token_embeddings(ours.config.vocab_size)             # room for the added rows
        with torch.no_grad():
            with_adapter = peft.PeftModel.from_pretrained(hf_base, out / "adapter").eval()
            assert rel_err(with_adapter(torch.tensor([ids])).logits, ours(torch.tensor([ids]))) < 1e-5

    # a kill after step 3: the step-4 work and the final model are lost, a half-written checkpoint remains
    shutil.rmtree(out / "checkpoints" / "step_000004", ignore_errors=True)
    os.makedirs(out / "checkpoints" / ".step_000004.tmp-dead")
    # and a step directory killed while being replaced: its trainer state but no config.json (written last)
    os.makedirs(out / "checkpoints" / "step_000003")
    shutil.copy(out / "checkpoints" / "step_000002" / "trainer_state.pt", out / "checkpoints" / "step_000003")
    with pytest.raises(SystemExit, match="--resume"):
        run_sft(base, data, out, *extra)
    assert M.latest_checkpoint(str(out)).endswith("step_000002")
    with pytest.raises(ValueError, match="'seq_len' was 64 .*, now 48; step 2 would not mean the same rows"):
        run_sft(base, data, out, *extra, "--resume", "--seq-len", "48")
    assert json.load(open(out / "args.json"))["seq_len"] == 64          # the refused run wrote nothing
    other = ["--lora-rank", "4"] if mode == "full" else []
    with pytest.raises(ValueError, match="is a (full fine-tuning|LoRA) checkpoint; resume it with"):
        run_sft(base, data, out, *(extra if mode == "full" else extra[:2]), *other, "--resume")
    resumed = run_sft(base, data, out, *extra, "--resume")
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4]          # no duplicated records
    for r in resumed:
        if "loss" in r and r["step"] > 2:
            assert r["loss"] == pytest.approx(losses[r["step"]], rel=1e-5), r["step"]


def test_every_epoch_trains_every_conversation_once(tmp_path):
    """Two epochs, conversations packed several to a row: the supervised tokens each epoch's steps
    count add up to those of all the conversations, rendered here on their own (a dropped last
    partial step, or a conversation packed twice or never, would not)."""
    base = make_base(tmp_path / "base", family="llama")
    data = write_chat_data(tmp_path / "chat.jsonl")
    out = tmp_path / "run"
    metrics = run_sft(base, data, out, "--chat-template", "chatml", "--epochs", "2", "--max-steps", "0",
                      "--val-fraction", "0", "--seq-len", "128", "--save-every", "0", "--samples", "0")
    examples, counts = M.render_conversations(M.read_conversations(data), "chatml", M.load_tokenizer(out), 128, "drop")
    assert counts["kept"] == 40
    supervised = sum(sum(mask) for _, mask in examples)
    steps = [r for r in metrics if "loss" in r]
    per_epoch = [sum(r["supervised_tokens"] for r in steps if r["epoch"] == e) for e in (0, 1)]
    assert per_epoch == [supervised, supervised]
    assert len(steps) < 20                                 # rows hold several conversations (40 in 4-row steps)


def test_loss_is_normalised_over_the_global_batch(tmp_path):
    """The same rows per optimizer step, split into micro-batches differently (and over two ranks):
    the same losses, which holds only when every supervised token of the step weighs the same."""
    from launch import run_script
    base = make_base(tmp_path / "base", family="qwen2", chat_tokens=True)
    data = write_chat_data(tmp_path / "chat.jsonl")

    def losses(metrics, key="loss"):
        return [r[key] for r in metrics if key in r]
    single = run_sft(base, data, tmp_path / "a", "--batch-size", "4", "--grad-accum", "1")
    one_micro = losses(single)
    four_micro = losses(run_sft(base, data, tmp_path / "b", "--batch-size", "1", "--grad-accum", "4"))
    assert four_micro == pytest.approx(one_micro, rel=1e-5)

    # torchrun, two ranks on CPU (gloo): 1 row per rank and micro-step, 2 micro-steps; the held-out rows
    # are dealt one per rank, so the held-out loss is right only when summed over both
    common = ["--model", base, "--data", data, "--seq-len", "64", "--batch-size", "1", "--grad-accum", "2",
              "--lr", "3e-3", "--epochs", "1", "--max-steps", "4", "--save-every", "2", "--eval-every", "2",
              "--samples", "0", "--seed", "1"]
    run_script("sft.py", *common, "--out", tmp_path / "ddp", ranks=2)
    ddp = [json.loads(line) for line in open(tmp_path / "ddp" / "metrics.jsonl")]
    assert losses(ddp) == pytest.approx(one_micro, rel=1e-5)
    # the gradient too (Adam would hide a gradient scaled by a constant from the losses)
    assert losses(ddp, "grad_norm") == pytest.approx(losses(single, "grad_norm"), rel=1e-4)
    assert losses(ddp, "val_loss") == pytest.approx(losses(single, "val_loss"), rel=1e-5)

    # FSDP2: weights, gradients and optimizer state sharded over the two ranks, with each layer compiled
    # (inductor) and checkpointed: the same losses
    run_script("sft.py", *common, "--out", tmp_path / "fsdp", "--fsdp", "--compile", "--activation-checkpointing",
               ranks=2, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert any(f.is_file() for f in (tmp_path / "inductor").rglob("*"))     # --compile reached the layers
    fsdp = [json.loads(line) for line in open(tmp_path / "fsdp" / "metrics.jsonl")]
    assert losses(fsdp) == pytest.approx(one_micro, rel=1e-5)
    assert [r["val_loss"] for r in fsdp if "val_loss" in r] == \
        pytest.approx([r["val_loss"] for r in ddp if "val_loss" in r], rel=1e-5)


def test_scale_flags_are_the_same_in_every_training_script(capsys, monkeypatch):
    """--fsdp, --cpu-offload, --compile, --activation-checkpointing (alias --gradient-checkpointing) mean the
    same in pretrain.py, sft.py and distill.py train; each refuses --cpu-offload without --fsdp or outside
    torchrun (it would silently not offload), and --fsdp with LoRA."""
    import distill
    import pretrain
    parsers = {"pretrain": (pretrain.parse_args, ["--model", "m", "--data", "d.txt", "--out", "o"]),
               "sft": (sft.parse_args, ["--model", "m", "--data", "d.jsonl", "--out", "o"]),
               "distill": (distill.parse_args, ["train", "--student", "s", "--store", "t", "--out", "o"])}
    refusals = {("--cpu-offload",): "--cpu-offload offloads FSDP's shards: it needs --fsdp",
                ("--fsdp", "--lora-rank", "8"): "--fsdp is for full fine-tuning"}
    for name, (parse, required) in parsers.items():
        monkeypatch.setenv("RANK", "0")                                # as torchrun sets it
        args = parse(required + ["--fsdp", "--cpu-offload", "--compile", "--gradient-checkpointing"])
        assert (args.fsdp, args.cpu_offload, args.compile, args.activation_checkpointing) == (True,) * 4, name
        args = parse(required)
        assert not (args.fsdp or args.cpu_offload or args.compile or args.activation_checkpointing), name
        for flags, message in refusals.items():
            if name == "pretrain" and "--lora-rank" in flags:
                continue                                                # (pretrain has no LoRA)
            with pytest.raises(SystemExit):
                parse(required + list(flags))
            assert message in capsys.readouterr().err, (name, flags)
        monkeypatch.delenv("RANK")
        with pytest.raises(SystemExit):
            parse(required + ["--fsdp", "--cpu-offload"])
        assert "torchrun --nproc_per_node 1" in capsys.readouterr().err, name


def test_lora_adapters_stay_fp32_on_a_bf16_base(tmp_path):
    """--dtype bfloat16 puts the base in bf16; the adapters (and so their Adam state) stay fp32, the trained
    rows of ChatML's tokens too. The base has those tokens already (as resize_vocab.py's output of
    train_tokenizer.py's tokenizer does): under LoRA their rows train all the same."""
    from safetensors.torch import load_file
    base = make_base(tmp_path / "base", family="qwen2", chat_tokens=True)
    data = write_chat_data(tmp_path / "chat.jsonl")
    run_sft(base, data, tmp_path / "run", "--dtype", "bfloat16", "--max-steps", "1", "--lora-rank", "4",
            "--samples", "0")
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    rows = adapter["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    chatml = [M.load_tokenizer(base).special_tokens[t] for t in ("<|im_start|>", "<|im_end|>")]
    cfg = json.load(open(tmp_path / "run" / "adapter" / "adapter_config.json"))
    assert rows.shape == (2, 64) and cfg["trainable_token_indices"]["embed_tokens"] == sorted(chatml)
    assert Transformer.from_pretrained(str(tmp_path / "run")).model.embed_tokens.weight.dtype == torch.bfloat16


def test_save_dtype_rounds_only_the_final_model(tmp_path):
    """--save-dtype bfloat16: the same training, its final weights each rounded to bf16 as written."""
    base = make_base(tmp_path / "base", family="qwen2", chat_tokens=True)
    data = write_chat_data(tmp_path / "chat.jsonl")
    quick = ["--max-steps", "1", "--samples", "0", "--save-every", "0", "--eval-every", "0"]
    run_sft(base, data, tmp_path / "fp32", *quick)
    run_sft(base, data, tmp_path / "bf16", *quick, "--save-dtype", "bfloat16")
    full, rounded = (Transformer.from_pretrained(str(tmp_path / d)).state_dict() for d in ("fp32", "bf16"))
    assert full["lm_head.weight"].dtype == torch.float32
    for k, v in full.items():
        assert rounded[k].dtype == torch.bfloat16 and torch.equal(rounded[k], v.to(torch.bfloat16)), k
