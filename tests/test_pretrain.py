"""pretrain.py: the KL term against float64 and gradcheck, chunked losses, the token cache and
packing, torchrun (2 CPU processes, gloo) against one process, a hard kill and resume, bad input.

Everything runs on a synthetic two-language corpus written here, a SentencePiece tokenizer trained
on it on the spot, and tiny random decoders (2 layers, hidden 64, sequences of 32 tokens).
"""
import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch

import pretrain
from launch import run_script
from model import Config, Transformer

EN_WORDS = ("the cat dog sat on a mat and ran to house big small red green tree river boat man woman child "
            "said saw had was is went came over under with from").split()
RU_WORDS = ("кот собака сидел на коврике и бежал к дому большой маленький красный зелёный дерево река лодка "
            "человек женщина ребёнок сказал видел был есть пошёл пришёл над под с из").split()


def sentences(words, n, rng):
    return " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
                    for _ in range(n))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core machine spinning
    OpenMP threads make every step many times slower (subprocesses get OMP_NUM_THREADS=1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """en.txt: documents separated by blank lines; ru.txt: one long document (no blank line), as
    in ../shared/data; docs.jsonl: a 'text' per line."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (root / "en.txt").write_text("\n\n".join(sentences(EN_WORDS, rng.randint(2, 8), rng) for _ in range(150)) + "\n")
    (root / "ru.txt").write_text("\n".join(sentences(RU_WORDS, 3, rng) for _ in range(300)) + "\n")
    with open(root / "docs.jsonl", "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": sentences(EN_WORDS, 3, rng), "id": 1}) + "\n")
    return root


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    import sentencepiece as spm
    out = tmp_path_factory.mktemp("tok")
    spm.SentencePieceTrainer.train(
        input=[str(corpus / "en.txt"), str(corpus / "ru.txt")], model_prefix=str(out / "tokenizer"),
        vocab_size=300, model_type="bpe", character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2)
    os.remove(out / "tokenizer.vocab")
    return out


def tiny_config(vocab_size, **kw):
    return dict(model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2, **kw)


def make_model(path, tok_dir, vocab_size=300, seed=0, **kw):
    """A tiny random decoder saved in HF format with the test tokenizer."""
    torch.manual_seed(seed)
    model = Transformer(Config.from_hf(tiny_config(vocab_size, **kw)))
    model.init_weights()
    model.save_pretrained(str(path), tokenizer_dir=str(tok_dir))
    return path


@pytest.fixture(scope="module")
def base(tok_dir, tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "base", tok_dir)


def common_args(out, cache, seq_len=32):
    return ["--seq-len", str(seq_len), "--val-fraction", "0.1", "--eval-tokens", "256", "--lr", "3e-3",
            "--warmup-steps", "2", "--tokenize-workers", "1", "--cache-dir", str(cache), "--out", str(out)]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_steps(out):
    return {m["step"]: m for m in metrics(out) if "loss" in m}


# ------------------------------------------------------------------------------------------------
# the KL term and the chunked loss
# ------------------------------------------------------------------------------------------------
def kl_float64(logits, ref_logits, direction, shared):
    """Straight from the definition, in numpy float64: probabilities, buckets, Σ a log(a / b)."""
    def probs(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
        if shared is not None:
            p = np.concatenate([p[:, :shared], p[:, shared:].sum(-1, keepdims=True)], -1)
        return p
    q, p = probs(logits.double().numpy()), probs(ref_logits.double().numpy())
    a, b = (q, p) if direction == "reverse" else (p, q)
    return (a * np.log(a / b)).sum(-1)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("shared", [None, 9])
def test_kl_matches_float64(direction, shared):
    g = torch.Generator().manual_seed(0)
    logits, ref_logits = 3 * torch.randn(7, 13, generator=g), 3 * torch.randn(7, 13, generator=g)
    ours = pretrain.kl_to_reference(logits, ref_logits, direction, shared)
    assert ours.dtype == torch.float32 and ours.shape == (7,)
    np.testing.assert_allclose(ours.numpy(), kl_float64(logits, ref_logits, direction, shared), rtol=1e-5, atol=1e-6)
    # bf16 logits are upcast, not softmaxed in bf16
    low = pretrain.kl_to_reference(logits.bfloat16(), ref_logits.bfloat16(), direction, shared)
    assert low.dtype == torch.float32
    # a distribution is at KL 0 from itself; the bucket sees only the total mass on ids >= shared
    assert pretrain.kl_to_reference(logits, logits, direction, shared).abs().max() < 1e-5
    if shared is not None:
        moved = logits.clone()
        moved[:, shared:] = moved[:, shared:].flip(-1)          # same bucket mass, split differently
        assert pretrain.kl_to_reference(moved, logits, direction, shared).abs().max() < 1e-5
        assert pretrain.kl_to_reference(moved, logits, direction, None).min() > 1e-3


@pytest.mark.parametrize("direction", ["reverse", "forward"])
@pytest.mark.parametrize("shared", [None, 4])
def test_kl_gradcheck(direction, shared):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ref_logits = torch.randn(3, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: pretrain.kl_to_reference(x, ref_logits, direction, shared), (logits,))


@pytest.mark.parametrize("shared", [None, 10])
def test_chunked_loss_equals_whole(shared):
    """CE and KL summed a chunk at a time (checkpointed) equal the whole-batch sums, and so do
    their gradients, in float64; masked labels contribute nothing to either term."""
    torch.manual_seed(0)
    B, T, d, V = 2, 9, 8, 13
    head, ref_head = torch.nn.Linear(d, V, bias=False).double(), torch.nn.Linear(d, V, bias=False).double()
    hidden = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    hidden_ref = torch.randn(B, T, d, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    labels[1, 5] = -100
    ce, kl = pretrain.loss_sums(hidden, labels, head, hidden_ref, ref_head, "reverse", shared, chunk=4)
    (ce + 0.7 * kl).backward()
    got = (ce.item(), kl.item(), hidden.grad.clone(), head.weight.grad.clone())

    hidden.grad, head.weight.grad = None, None
    valid = labels != -100
    logits, ref_logits = head(hidden[valid]), ref_head(hidden_ref[valid])
    ce_ref = torch.nn.functional.cross_entropy(logits, labels[valid], reduction="sum")
    kl_ref = torch.from_numpy(kl_float64(logits.detach(), ref_logits.detach(), "reverse", shared)).sum()
    (ce_ref + 0.7 * pretrain.kl_to_reference(logits, ref_logits, "reverse", shared).sum()).backward()
    assert got[0] == pytest.approx(ce_ref.item(), rel=1e-12)
    assert got[1] == pytest.approx(kl_ref.item(), rel=1e-10)
    torch.testing.assert_close(got[2], hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[3], head.weight.grad, rtol=1e-10, atol=1e-12)
    assert got[2][0, :3].abs().max() == 0                       # masked positions get no gradient


def test_vocab_relation():
    pieces = ["<unk>", "<s>", "</s>", "▁a", "b"]
    assert pretrain.vocab_relation(pieces, pieces, 5, 5, "ref", "tok") is None
    assert pretrain.vocab_relation(pieces, pieces + ["▁ab", "▁ба"], 5, 7, "ref", "tok") == 5     # extend
    assert pretrain.vocab_relation(pieces, pieces, 5, 8, "ref", "tok") == 5       # padded rows: a bucket too
    with pytest.raises(ValueError, match=r"--kl-ref ref.*first difference at id 3: '▁a' vs '▁c'"):
        pretrain.vocab_relation(pieces, pieces[:3] + ["▁c", "b", "x"], 5, 6, "ref", "tok")


# ------------------------------------------------------------------------------------------------
# data: documents, the cache, packing, mixing
# ------------------------------------------------------------------------------------------------
def test_read_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n\n\n  \nsecond doc\n\nthird\n")
    assert list(pretrain.read_documents(str(tmp_path / "a.txt"))) == ["first line\nsecond line", "second doc", "third"]
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "meta": 3}\n{"text": "  "}\n')
    assert list(pretrain.read_documents(str(tmp_path / "b.jsonl"))) == ["one", "two"]


def test_token_cache_and_packing(corpus, tok_dir, tmp_path):
    from model import load_tokenizer
    tok = load_tokenizer(str(tok_dir))
    args = pretrain.parse_args(["--model", "unused", "--data", str(corpus / "en.txt"), str(corpus / "docs.jsonl"),
                                "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                                "--tokenizer", str(tok_dir), "--tokenize-workers", "2", "--val-fraction", "0.1"])
    (_, [en], _), (_, [js], _) = pretrain.load_sources(args.data, tok, args, writer=True)

    docs = list(pretrain.read_documents(str(corpus / "en.txt")))
    expected = [[tok.bos_id] + tok.encode(d) + [tok.eos_id] for d in docs]
    assert en.tokens.dtype == np.uint16                          # a 300-piece vocabulary fits
    assert en.tokens.tolist() == [t for ids in expected for t in ids]
    assert en.offsets.tolist() == list(np.cumsum([0] + [len(ids) for ids in expected]))
    assert js.meta["n_docs"] == 60 and en.meta["max_id"] < 300
    assert en.n_train == len(en.tokens) - int(len(en.tokens) * 0.1)

    # a row across a document boundary: doc ids restart, the label after EOS (next doc's BOS) is masked
    T, b = 32, int(en.offsets[3])
    x, d, y = pretrain.training_stream([en]).row(b - 10, T)
    assert x.tolist() == en.tokens[b - 10:b - 10 + T].tolist()
    assert d.tolist() == [0] * 10 + [1] * 22
    assert x[9] == tok.eos_id and y[9] == -100
    assert (y[:9] == x[1:10]).all() and (y[10:] == en.tokens[b + 1:b - 10 + T + 1]).all()

    # cached: loading again tokenizes nothing; editing a file makes a new cache
    before = set(os.listdir(tmp_path / "cache"))
    pretrain.load_sources(args.data, tok, args, writer=False)           # a non-writer would wait forever otherwise
    assert set(os.listdir(tmp_path / "cache")) == before
    (tmp_path / "copy.txt").write_text("hello world\n")
    args.data = [str(tmp_path / "copy.txt")]
    pretrain.load_sources(args.data, tok, args, writer=True)
    (tmp_path / "copy.txt").write_text("hello there world\n")
    [(_, [copy], _)] = pretrain.load_sources(args.data, tok, args, writer=True)
    assert tok.decode(copy.tokens.tolist()) == "hello there world"
    assert len(os.listdir(tmp_path / "cache")) == len(before) + 2
    # another tokenizer (the same pieces, one score changed): the same file gets a cache of its own
    import shutil
    from sentencepiece import sentencepiece_model_pb2 as pb2
    other = tmp_path / "other_tok"
    shutil.copytree(tok_dir, other)
    proto = pb2.ModelProto()
    proto.ParseFromString((other / "tokenizer.model").read_bytes())
    proto.pieces[-1].score -= 1.0
    (other / "tokenizer.model").write_bytes(proto.SerializeToString())
    args.tokenizer = str(other)
    pretrain.load_sources(args.data, load_tokenizer(str(other)), args, writer=True)
    assert len(os.listdir(tmp_path / "cache")) == len(before) + 3


def test_a_directory_of_short_files_is_one_stream(corpus, tok_dir, tmp_path):
    """One article per file, each shorter than a row: rows run on from one file into the next (a file
    starts a document), every file trains and is held out in part, and the source keeps its weight."""
    from model import load_tokenizer
    tok = load_tokenizer(str(tok_dir))
    articles = tmp_path / "articles"
    articles.mkdir()
    docs = list(pretrain.read_documents(str(corpus / "en.txt")))
    for k, doc in enumerate(docs[:30]):
        (articles / f"{k:03d}.txt").write_text(doc + "\n")
    args = pretrain.parse_args(["--model", "unused", "--data", f"{articles}:1", f"{corpus / 'ru.txt'}:1",
                                "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                                "--tokenizer", str(tok_dir), "--tokenize-workers", "1", "--val-fraction", "0.2"])
    sources = pretrain.load_sources(args.data, tok, args, writer=True)
    files = sources[0][1]
    T = max(len(tf.tokens) for tf in files) + 8                        # every file is shorter than a row
    data = pretrain.PackedMixture(sources, T, seed=0)

    # the reference: each file's training tokens back to back, a document index per token
    train = np.concatenate([np.asarray(tf.tokens[:tf.n_train], dtype=np.int64) for tf in files])
    doc = np.concatenate([np.searchsorted(tf.offsets, np.arange(tf.n_train), side="right") - 1 + 1000 * f
                          for f, tf in enumerate(files)])
    assert data.rows_per_source[0] == (len(train) - 1) // T
    for start in (0, T, 3 * T, (data.rows_per_source[0] - 1) * T):
        x, d, y = data.streams[0].row(start, T)
        window, w_doc = train[start:start + T + 1], doc[start:start + T + 1]
        assert x.tolist() == window[:-1].tolist()
        assert d.tolist() == (np.unique(w_doc[:-1], return_inverse=True)[1]).tolist()
        assert y.tolist() == np.where(w_doc[1:] == w_doc[:-1], window[1:], -100).tolist()
    batches = [data.global_batch(step, 64) for step in range(1, 31)]
    assert abs(np.mean([i == 0 for b in batches for i, _ in b]) - 0.5) < 0.05   # weighted 1:1

    held = pretrain.held_out_rows(files, T, max_tokens=10 ** 6)
    stream = held[0][0]
    assert len(held) == (stream.n_tokens - 1) // T
    held_tokens = np.concatenate([np.asarray(tf.tokens[tf.n_train:], dtype=np.int64) for tf in files])
    assert [stream.row(start, T)[0].tolist() for _, start in held] == \
        [held_tokens[start:start + T].tolist() for _, start in held]


def test_mixture_weights_epochs_and_position(corpus, tok_dir, tmp_path):
    from model import load_tokenizer
    tok = load_tokenizer(str(tok_dir))
    args = pretrain.parse_args(["--model", "unused", "--data", f"{corpus / 'en.txt'}:3", f"{corpus / 'ru.txt'}:1",
                                "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
                                "--tokenizer", str(tok_dir), "--tokenize-workers", "1"])
    sources = pretrain.load_sources(args.data, tok, args, writer=True)
    data = pretrain.PackedMixture(sources, 32, seed=0)
    batches = [data.global_batch(step, 64) for step in range(1, 41)]
    files = np.array([i for b in batches for i, _ in b])
    assert abs((files == 0).mean() - 0.75) < 0.03                   # mixed 3:1 by weight
    en_starts = [s for b in batches for i, s in b if i == 0]
    n_rows = data.rows_per_source[0]
    assert len(en_starts) > n_rows                                   # more than one epoch of en.txt
    assert sorted(en_starts[:n_rows]) == [k * 32 for k in range(n_rows)]   # each row once per epoch
    # the data position: a fresh mixture restored from the state continues identically
    state = data.state_dict()
    again = pretrain.PackedMixture(sources, 32, seed=0)
    again.load_state_dict(state)
    assert again.global_batch(41, 64) == data.global_batch(41, 64)
    assert pretrain.PackedMixture(sources, 32, seed=1).global_batch(1, 64) != batches[0]


# ------------------------------------------------------------------------------------------------
# whole runs
# ------------------------------------------------------------------------------------------------
def test_random_init_run_learns_and_saves_hf_model(corpus, tok_dir, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config(300)))
    out = tmp_path / "run"
    pretrain.main(["--init-config", str(config), "--tokenizer", str(tok_dir), "--kl-weight", "0",
                   "--data", str(corpus / "en.txt"), "--batch-size", "4", "--grad-accum", "2", "--max-steps", "30",
                   "--eval-every", "0", "--save-every", "0", *common_args(out, tmp_path / "cache"), "--lr", "1e-2"])
    m = metrics(out)
    bpb = [x["val_bpb/en"] for x in m if "val_bpb/en" in x]
    assert len(bpb) == 2 and bpb[1] < 0.8 * bpb[0]                   # held-out bits/byte at start and end
    steps = train_steps(out)
    assert steps[30]["loss"] < steps[1]["loss"] - 1.0 and steps[1]["kl"] == 0
    assert json.loads((out / "args.json").read_text())["global_rows"] == 8
    # the final model is an HF directory with the tokenizer; it loads back with the same weights
    assert (out / "tokenizer.model").is_file() and not (out / ".final").exists()
    back = Transformer.from_pretrained(str(out))
    assert back.config.vocab_size == 300 and back.config.eos_token_id == 2


def test_activation_checkpointing_save_dtype_and_train_only_embeddings(corpus, base, tmp_path):
    def run(out, *extra):
        pretrain.main(["--model", str(base), "--data", str(corpus / "ru.txt"), "--batch-size", "2",
                       "--grad-accum", "2", "--max-steps", "3", "--eval-every", "0", "--save-every", "0",
                       *common_args(out, tmp_path / "cache"), *extra])
        return train_steps(out)
    plain = run(tmp_path / "plain", "--loss-chunk", "1024")
    other = run(tmp_path / "ckpt", "--activation-checkpointing", "1", "--loss-chunk", "7", "--save-dtype", "bfloat16")
    for step in plain:
        assert other[step]["loss"] == pytest.approx(plain[step]["loss"], rel=1e-5)
        assert other[step]["grad_norm"] == pytest.approx(plain[step]["grad_norm"], rel=1e-4)
    # --save-dtype bfloat16: the same fp32 training, its final weights rounded to bf16 as they are written
    trained = Transformer.from_pretrained(str(tmp_path / "plain")).state_dict()
    for k, v in Transformer.from_pretrained(str(tmp_path / "ckpt")).state_dict().items():
        assert v.dtype == torch.bfloat16, k
        torch.testing.assert_close(v.float(), trained[k], rtol=2**-8, atol=1e-6, msg=k)
    assert plain[1]["kl"] == pytest.approx(0, abs=1e-6) and plain[3]["kl"] > 1e-5   # the reference is the start

    run(tmp_path / "emb", "--train-only", "embeddings")
    start, after = Transformer.from_pretrained(str(base)).state_dict(), \
        Transformer.from_pretrained(str(tmp_path / "emb")).state_dict()
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight"}


def test_extend_mode_reference(corpus, base, tok_dir, tmp_path):
    """A model with 12 rows beyond the reference's vocabulary trains against the original reference:
    the reference reads the new ids through the starting model's rows, so at step 1 the KL is 0."""
    start = Transformer.from_pretrained(str(base))
    grown = torch.cat([start.model.embed_tokens.weight, 0.1 * torch.randn(12, 64)])
    start.set_vocab(grown, torch.cat([start.lm_head.weight, 0.1 * torch.randn(12, 64)]))
    start.save_pretrained(str(tmp_path / "grown"), tokenizer_dir=str(tok_dir))
    out = tmp_path / "run"
    pretrain.main(["--model", str(tmp_path / "grown"), "--kl-ref", str(base), "--data", str(corpus / "ru.txt"),
                   "--batch-size", "2", "--grad-accum", "1", "--max-steps", "3", "--eval-every", "0",
                   "--save-every", "0", *common_args(out, tmp_path / "cache")])
    assert json.loads((out / "args.json").read_text())["kl_extend_shared_ids"] == 300
    steps = train_steps(out)
    assert steps[1]["kl"] == pytest.approx(0, abs=1e-6) and steps[3]["kl"] > 1e-5

    import sentencepiece as spm                                        # another vocabulary: no KL possible
    (tmp_path / "other_tok").mkdir()
    spm.SentencePieceTrainer.train(input=str(corpus / "ru.txt"), model_prefix=str(tmp_path / "other_tok" / "tokenizer"),
                                   vocab_size=200, model_type="bpe", character_coverage=1.0, minloglevel=2)
    make_model(tmp_path / "other", tmp_path / "other_tok", vocab_size=200)
    with pytest.raises(ValueError, match="neither the model's"):
        pretrain.main(["--model", str(base), "--kl-ref", str(tmp_path / "other"), "--data", str(corpus / "ru.txt"),
                       "--max-steps", "1", *common_args(tmp_path / "bad", tmp_path / "cache")])


def run_subprocess(argv, env_extra=None, torchrun=0):
    """pretrain.py in a process of its own (torchrun with that many ranks); the caller checks the exit."""
    return run_script("pretrain.py", *argv, ranks=torchrun, env=env_extra, check=False)


def test_torchrun_two_processes_match_one(corpus, base, tmp_path):
    """The same global batch (2 ranks × 2 micro-batches vs 1 process × 4 micro-batches) gives the
    same losses, KL, gradient norms, held-out bits/byte and final weights, under DDP and FSDP2."""
    data = ["--data", f"{corpus / 'ru.txt'}:1", f"{corpus / 'en.txt'}:1", "--eval-data", str(corpus / "docs.jsonl")]
    common = ["--model", str(base), *data, "--batch-size", "1", "--max-steps", "4", "--eval-every", "2",
              "--save-every", "0"]
    pretrain.main([*common, "--grad-accum", "4", *common_args(tmp_path / "one", tmp_path / "cache")])
    one = metrics(tmp_path / "one")
    assert {"val_bpb/ru", "val_bpb/en", "val_bpb/docs"} <= set(one[0])
    w1 = Transformer.from_pretrained(str(tmp_path / "one")).state_dict()
    # FSDP2 shards weights, gradients and optimiser state over the 2 ranks; here also with each layer
    # compiled (inductor) and checkpointed, as a 7B run would be: still the same numbers. (Inductor
    # rounds differently, and Adam turns the sign of a near-zero gradient into a whole lr-sized step, so
    # there a weight or two differ by ~1e-4: each tensor's difference is measured against its update.)
    fsdp = ["--fsdp", "--compile", "--activation-checkpointing"]
    w0 = Transformer.from_pretrained(str(base)).state_dict()
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        r = run_subprocess([*common, "--grad-accum", "2", *common_args(out, tmp_path / "cache"),
                            *(fsdp if mode == "fsdp" else [])], {"TORCHINDUCTOR_CACHE_DIR": str(out / "inductor")},
                           torchrun=2)
        assert r.returncode == 0, r.stderr[-3000:]
        compiled = any(f.is_file() for f in (out / "inductor").rglob("*"))
        assert compiled == (mode == "fsdp")                         # --compile reached the layers: inductor ran
        two = metrics(out)
        assert [m["step"] for m in one] == [m["step"] for m in two]
        assert json.loads((out / "args.json").read_text())["world_size"] == 2
        for a, b in zip(one, two):
            for key in a:
                if key not in ("tokens_per_s", "mfu", "step"):
                    assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (mode, a["step"], key)
        w2 = Transformer.from_pretrained(str(out)).state_dict()
        for k in w1:
            if mode == "ddp":
                torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=f"{mode} {k}")
            else:
                assert (w2[k] - w1[k]).norm() <= 1e-3 * (w1[k] - w0[k]).norm(), k


def test_fsdp_maps_a_bf16_checkpoint_and_casts_it_layer_by_layer(corpus, tok_dir, tmp_path):
    """Under FSDP the ranks map the checkpoint's files (bf16 here, with a tied head) and cast each layer
    to fp32 as it is sharded; one process casts the whole model at load. Same losses, KL (the reference
    is cast to the compute dtype the same way), gradient norms and weights: had the cast untied the head,
    it would have trained apart from the embedding from the first step on."""
    m = Transformer.from_pretrained(str(make_model(tmp_path / "fp32", tok_dir, tie_word_embeddings=True)),
                                    dtype=torch.bfloat16)
    m.save_pretrained(str(tmp_path / "bf16"), tokenizer_dir=str(tok_dir))
    common = ["--model", str(tmp_path / "bf16"), "--data", str(corpus / "ru.txt"), "--batch-size", "1",
              "--max-steps", "3", "--eval-every", "0", "--save-every", "0"]
    pretrain.main([*common, "--grad-accum", "2", *common_args(tmp_path / "one", tmp_path / "cache")])
    r = run_subprocess([*common, "--grad-accum", "1", "--fsdp", *common_args(tmp_path / "fsdp", tmp_path / "cache")],
                       torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = train_steps(tmp_path / "one"), train_steps(tmp_path / "fsdp")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step, a in one.items():
        for key in ("loss", "ce", "kl", "grad_norm"):
            assert two[step][key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (step, key)
    w1, w2 = (Transformer.from_pretrained(str(tmp_path / d)) for d in ("one", "fsdp"))
    assert w2.config.torch_dtype == "float32"
    for k, v in w1.state_dict().items():
        torch.testing.assert_close(w2.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CPU offload moves FSDP's shards off a GPU (run by "
                                                           "bench/gpu_checks.sh)")
def test_cpu_offload_trains_like_fsdp_on_the_gpu(corpus, base, tmp_path):
    """--fsdp --cpu-offload under torchrun on one GPU: weights, gradients and AdamW state in pinned CPU
    memory, the optimizer step on the CPU, gradient clipping all-reduced there (gloo beside NCCL). The
    same losses as plain FSDP, to bf16 rounding. Its step-2 checkpoint (weights gathered from pinned CPU
    shards, the optimizer state written by torch.distributed.checkpoint) resumes to the same step 3."""
    common = ["--model", str(base), "--data", str(corpus / "ru.txt"), "--batch-size", "2", "--grad-accum", "1",
              "--max-steps", "3", "--eval-every", "0", "--save-every", "2"]
    runs = {}
    for name, extra in (("fsdp", ["--fsdp"]), ("offload", ["--fsdp", "--cpu-offload"])):
        r = run_subprocess([*common, *extra, *common_args(tmp_path / name, tmp_path / "cache")], torchrun=1)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = train_steps(tmp_path / name)
    assert sorted(runs["offload"]) == [1, 2, 3]
    for step, a in runs["fsdp"].items():               # (step 1's loss precedes any update; its grad norm not)
        for key in ("loss", "grad_norm"):
            assert runs["offload"][step][key] == pytest.approx(a[key], rel=1e-2), (step, key)
    w0 = Transformer.from_pretrained(str(base)).state_dict()
    w1, w2 = (Transformer.from_pretrained(str(tmp_path / name)).state_dict() for name in ("fsdp", "offload"))
    for k, v in w1.items():                            # the optimizer step on the CPU moved the weights alike
        assert (w2[k] - v).norm() <= 1e-2 * v.norm(), k
        assert (w2[k] - v).norm() <= 0.1 * (v - w0[k]).norm(), k       # (against the update: norms start at 1)
    offload, cut = ["--fsdp", "--cpu-offload"], tmp_path / "cut"
    killed = run_subprocess([*common, *offload, *common_args(cut, tmp_path / "cache")], {"NANOADAPT_KILL_AT_STEP": "3"},
                            torchrun=1)
    assert killed.returncode != 0 and not (cut / "config.json").exists()
    r = run_subprocess([*common, *offload, *common_args(cut, tmp_path / "cache"), "--resume"], torchrun=1)
    assert r.returncode == 0, r.stderr[-3000:]
    for key in ("loss", "grad_norm"):
        assert train_steps(cut)[3][key] == pytest.approx(runs["offload"][3][key], rel=1e-4), key


def test_random_init_in_bf16_keeps_rope_in_fp32(tmp_path):
    """--init-config with --dtype bfloat16: the weights become bf16, RoPE's inverse frequencies (a buffer,
    which model.to(bf16) would round) stay the fp32 values transformers computes."""
    import types
    from model import rope_inverse_frequencies
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(300)))
    args = types.SimpleNamespace(model=None, init_config=str(tmp_path / "config.json"), seed=0)
    tok = types.SimpleNamespace(vocab_size=300, bos_id=1, eos_id=2)
    model = pretrain.build_start_model(args, tok, torch.device("cpu"), torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.inv_freq.dtype == torch.float32
    assert torch.equal(model.inv_freq, rope_inverse_frequencies(model.config))


def assert_same_run(a, b, full, cut):
    """Every logged number but the timings, and the final weights, of two runs agree."""
    for x, y in zip(a, b):
        for key in x:
            if key not in ("tokens_per_s", "mfu"):
                assert y[key] == pytest.approx(x[key], rel=1e-6, abs=1e-8), (x["step"], key)
    w1, w2 = Transformer.from_pretrained(str(full)), Transformer.from_pretrained(str(cut))
    for (k, p), q in zip(w1.state_dict().items(), w2.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=k)


def test_hard_kill_and_resume_matches_uninterrupted(corpus, base, tmp_path, capsys):
    """SIGKILL at step 5 (after the step-4 checkpoint); --resume continues from step 4 and every
    logged number after it equals the uninterrupted run's."""
    common = ["--model", str(base), "--data", f"{corpus / 'ru.txt'}:2", f"{corpus / 'en.txt'}:1",
              "--batch-size", "2", "--grad-accum", "2", "--max-steps", "7", "--eval-every", "3",
              "--save-every", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    pretrain.main([*common, *common_args(full, tmp_path / "cache")])
    killed = run_subprocess([*common, *common_args(cut, tmp_path / "cache")], {"NANOADAPT_KILL_AT_STEP": "6"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (cut / "config.json").exists()                        # no final model from a killed run
    assert max(train_steps(cut)) == 5                                # it logged past its last checkpoint
    with pytest.raises(ValueError, match="pass --resume"):
        pretrain.main([*common, *common_args(cut, tmp_path / "cache")])
    # a checkpoint from before the data position counted rows per source: refused, not misread
    old = tmp_path / "old_layout"
    shutil.copytree(cut, old)
    state_path = old / "checkpoints" / "step_000004" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["args"]["data_layout"]
    torch.save(state, state_path)
    with pytest.raises(ValueError, match="'data_layout' was None in .*, now 'a token stream per source'"):
        pretrain.main([*common, *common_args(old, tmp_path / "cache"), "--resume"])
    capsys.readouterr()
    pretrain.main([*common, *common_args(cut, tmp_path / "cache"), "--resume"])
    assert f"resumed from {cut / 'checkpoints' / 'step_000004'} at step 4" in capsys.readouterr().out
    a, b = metrics(full), metrics(cut)
    assert [m["step"] for m in a] == [m["step"] for m in b]          # the interrupted run's step 5 was dropped
    assert_same_run(a, b, full, cut)


def test_fsdp_sharded_checkpoint_resumes(corpus, base, tmp_path):
    """Under FSDP2 each rank writes its part of a checkpoint: a safetensors file of the weights it gathered,
    and its shard of the optimizer state (torch.distributed.checkpoint). Killed after it and resumed, again
    sharded over 2 ranks, the run continues exactly as the uninterrupted one; resumed in one process without
    FSDP, or on 2 DDP ranks (the same global batch: the state is resharded, or read whole by each rank),
    it continues as that run to rounding."""
    common = ["--model", str(base), "--data", str(corpus / "ru.txt"), "--batch-size", "1",
              "--max-steps", "4", "--eval-every", "0", "--save-every", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run_subprocess([*common, "--grad-accum", "1", "--fsdp", *common_args(full, tmp_path / "cache")], torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    killed = run_subprocess([*common, "--grad-accum", "1", "--fsdp", *common_args(cut, tmp_path / "cache")],
                            {"NANOADAPT_KILL_AT_STEP": "3"}, torchrun=2)
    assert killed.returncode != 0 and not (cut / "config.json").exists()
    ckpt = cut / "checkpoints" / "step_000002"
    assert sorted(os.listdir(ckpt / "optimizer")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "optimizer" not in torch.load(ckpt / "trainer_state.pt", weights_only=True)
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) >= 2
    assert set(weight_map) == set(Transformer.from_pretrained(str(base)).state_dict())
    shutil.copytree(cut, tmp_path / "cut_one")
    shutil.copytree(cut, tmp_path / "cut_ddp")
    r = run_subprocess([*common, "--grad-accum", "1", "--fsdp", *common_args(cut, tmp_path / "cache"), "--resume"],
                       torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics(full), metrics(cut)
    assert [m["step"] for m in a] == [m["step"] for m in b]
    assert_same_run(a, b, full, cut)

    one, ddp = tmp_path / "cut_one", tmp_path / "cut_ddp"
    pretrain.main([*common, "--grad-accum", "2", *common_args(one, tmp_path / "cache"), "--resume"])
    r = run_subprocess([*common, "--grad-accum", "1", *common_args(ddp, tmp_path / "cache"), "--resume"], torchrun=2)
    assert r.returncode == 0, r.stderr[-3000:]
    w_full = Transformer.from_pretrained(str(full)).state_dict()
    for other in (one, ddp):
        assert [m["step"] for m in metrics(other)] == [m["step"] for m in a]
        for x, y in zip(a, metrics(other)):
            for key in x:
                if key not in ("tokens_per_s", "mfu", "step"):
                    assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (other.name, x["step"], key)
        w = Transformer.from_pretrained(str(other)).state_dict()
        for k in w_full:
            torch.testing.assert_close(w[k], w_full[k], rtol=1e-4, atol=1e-6, msg=f"{other.name} {k}")


# ------------------------------------------------------------------------------------------------
# bad input: one clear message
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script, argv, flag, value, message", [
    ("pretrain", ["--model", "m", "--data", "d", "--out", "o"], "--batch-size", "0", "must be at least 1, got 0"),
    ("pretrain", ["--model", "m", "--data", "d", "--out", "o"], "--log-every", "0", "must be at least 1, got 0"),
    ("pretrain", ["--model", "m", "--data", "d", "--out", "o"], "--lr", "-0.001", "must be at least 0.0, got -0.001"),
    ("pretrain", ["--model", "m", "--data", "d", "--out", "o"], "--grad-accum", "two", "invalid int value: 'two'"),
    ("sft", ["--model", "m", "--data", "d", "--out", "o"], "--log-every", "0", "must be at least 1, got 0"),
    ("sft", ["--model", "m", "--data", "d", "--out", "o"], "--keep", "0", "must be at least 1, got 0"),
    ("sft", ["--model", "m", "--data", "d", "--out", "o"], "--val-fraction", "-0.5", "must be in [0, 1), got -0.5"),
    ("distill", ["train", "--student", "s", "--store", "x", "--out", "o"], "--grad-accum", "0", "must be at least 1"),
    ("distill", ["train", "--student", "s", "--store", "x", "--out", "o"], "--temperature", "0", "must be positive"),
    ("distill", ["dump", "--teacher", "t", "--data", "d", "--out", "o"], "--pack-len", "-3", "must be at least 1"),
    ("resize_vocab", ["--model", "m", "--tokenizer", "t", "--out", "o"], "--pad-to-multiple", "0", "at least 1"),
    ("evaluate", ["--models", "m", "--text", "t"], "--max-prompts", "-1", "must be at least 0, got -1"),
])
def test_numeric_flags_are_refused_before_anything_runs(script, argv, flag, value, message, capsys):
    """A count of 0 or a negative rate is argparse's error naming the flag, not a ZeroDivisionError
    (--log-every 0) or an empty loop after the model is loaded; a valid value comes back typed."""
    import importlib
    parse_args = importlib.import_module(script).parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(argv + [flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err and (flag in err or message == "must be positive")
    good = "0.5" if flag in ("--lr", "--temperature", "--val-fraction") else "3"
    parsed = getattr(parse_args(argv + [flag, good]), flag[2:].replace("-", "_"))
    assert parsed == (0.5 if good == "0.5" else 3) and type(parsed) is (float if good == "0.5" else int)


def test_first_step_loss_and_gradient_equal_a_float64_reference(corpus, base, tok_dir, tmp_path):
    """Step 1 of pretrain.py (2 micro-batches of 2 packed rows, a KL reference other than the start)
    against transformers in float64, each document of each row run on its own: CE and KL(P_model ‖
    P_ref) summed over every valid label of the global batch and divided by their number, and the
    gradient norm of that. Catches a per-micro-batch mean, a flipped KL and attention across documents."""
    import transformers
    ref_dir = make_model(tmp_path / "ref", tok_dir, seed=1)
    T, kl_weight = 32, 0.5
    data_args = ["--data", str(corpus / "docs.jsonl"), f"{corpus / 'en.txt'}:2"]
    pretrain.main(["--model", str(base), "--kl-ref", str(ref_dir), "--kl-weight", str(kl_weight), *data_args,
                   "--batch-size", "2", "--grad-accum", "2", "--max-steps", "1", "--eval-every", "0",
                   *common_args(tmp_path / "run", tmp_path / "cache", seq_len=T)])
    logged = train_steps(tmp_path / "run")[1]

    from model import load_tokenizer
    args = pretrain.parse_args(["--model", str(base), *data_args, *common_args(tmp_path / "x", tmp_path / "cache", T)])
    sources = pretrain.load_sources(args.data, load_tokenizer(str(tok_dir)), args, writer=False)
    rows = pretrain.PackedMixture(sources, T, args.seed).global_batch(1, 4)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(ref_dir), dtype=torch.float64).eval()
    ce = kl = torch.zeros((), dtype=torch.float64)
    valid_per_row = []
    for source, start in rows:
        [tf] = sources[source][1]
        window = torch.tensor(np.asarray(tf.tokens[start:start + T + 1], dtype=np.int64))      # (T + 1,)
        doc = np.searchsorted(tf.offsets, np.arange(start, start + T + 1), side="right") - 1
        valid_per_row.append(int((doc[1:] == doc[:-1]).sum()))
        a = 0
        while a < T:                                   # each document's piece of the row, on its own
            b = a + 1
            while b < T and doc[b] == doc[a]:
                b += 1
            log_p = model(window[None, a:b]).logits[0].log_softmax(-1)                       # (b - a, V)
            with torch.no_grad():
                log_q = ref(window[None, a:b]).logits[0].log_softmax(-1)
            for t in range(a, b):
                if doc[t + 1] == doc[t]:               # the next token is in the same document
                    ce = ce - log_p[t - a, window[t + 1]]
                    kl = kl + (log_p[t - a].exp() * (log_p[t - a] - log_q[t - a])).sum()
            a = b
    n_valid = sum(valid_per_row)
    assert valid_per_row[0] + valid_per_row[1] != valid_per_row[2] + valid_per_row[3]   # micro-batches differ
    loss = (ce + kl_weight * kl) / n_valid
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm()
    assert logged["ce"] == pytest.approx((ce / n_valid).item(), rel=1e-5)
    assert logged["kl"] == pytest.approx((kl / n_valid).item(), rel=1e-4)
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert logged["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)

    # held-out bits per byte at step 0: the NLL in bits of every scored token over the UTF-8 bytes of
    # the text those tokens spell (decoded a document piece at a time)
    tok = load_tokenizer(str(tok_dir))
    nll, n_bytes = 0.0, 0
    with torch.no_grad():
        for stream, start in pretrain.held_out_rows(sources[0][1], T, args.eval_tokens):
            x, d, y = stream.row(start, T)
            for doc_id in np.unique(d):
                piece = np.flatnonzero(d == doc_id)
                log_p = model(torch.tensor(x[None, piece])).logits[0].log_softmax(-1)
                scored = y[piece] >= 0
                nll -= log_p[torch.tensor(scored), torch.tensor(y[piece][scored])].sum().item()
                n_bytes += len(tok.decode(y[piece][scored].tolist()).encode("utf-8"))
    assert metrics(tmp_path / "run")[0]["val_bpb/docs"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)


def test_an_eval_source_never_takes_a_training_sources_name(corpus, base, tmp_path):
    """--data c/ru.txt --eval-data other/ru.txt: two held-out numbers under two names, neither lost."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "ru.txt").write_text((corpus / "en.txt").read_text())
    pretrain.main(["--model", str(base), "--data", str(corpus / "ru.txt"), "--eval-data", str(other / "ru.txt"),
                   "--max-steps", "1", *common_args(tmp_path / "run", tmp_path / "cache")])
    first = metrics(tmp_path / "run")[0]
    assert {k for k in first if k.startswith("val_bpb/")} == {"val_bpb/ru", "val_bpb/ru_"}
    assert first["val_bpb/ru"] != first["val_bpb/ru_"]
    with pytest.raises(ValueError, match="positive, finite number"):
        pretrain.parse_source(f"{corpus / 'ru.txt'}:inf")


def test_bad_input(corpus, base, tok_dir, tmp_path):
    def run(*argv, out="out"):
        pretrain.main(["--model", str(base), "--max-steps", "1", *argv,
                       *common_args(tmp_path / out, tmp_path / "cache")])

    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match=r"empty\.txt: no text \(empty corpus\)"):
        run("--data", str(tmp_path / "empty.txt"))
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")   # nothing half-written

    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: expected a JSON object with a string field 'text'"):
        run("--data", str(tmp_path / "bad.jsonl"))

    make_model(tmp_path / "small", tok_dir, vocab_size=100)
    with pytest.raises(ValueError, match=r"ru\.txt: token id \d+ is outside the model's vocabulary of 100 rows"):
        pretrain.main(["--model", str(tmp_path / "small"), "--data", str(corpus / "ru.txt"), "--max-steps", "1",
                       *common_args(tmp_path / "small_out", tmp_path / "cache")])

    broken = Transformer.from_pretrained(str(base))
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    broken.save_pretrained(str(tmp_path / "nan"), tokenizer_dir=str(tok_dir))
    with pytest.raises(FloatingPointError, match="step 1: loss is nan"):
        pretrain.main(["--model", str(tmp_path / "nan"), "--kl-weight", "0", "--data", str(corpus / "ru.txt"),
                       "--max-steps", "2", *common_args(tmp_path / "nan_out", tmp_path / "cache")])
    assert not (tmp_path / "nan_out" / "config.json").exists()

    with pytest.raises(SystemExit):        # argparse: random weights are no reference to stay close to
        pretrain.main(["--init-config", "x.json", "--tokenizer", str(tok_dir), "--data", "x.txt", "--out", "o"])
