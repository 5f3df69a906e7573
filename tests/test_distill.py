"""distill.py: the store against an independent recomputation with transformers, the loss against a float64
reference (and gradcheck), the CE/KD positions on a hand-built conversation, refusals, resume, DDP.

A tiny SentencePiece tokenizer is trained here; the teacher (hidden 64) and the student (hidden 32) are tiny
random transformers checkpoints that share it."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import distill
import model as nano
from launch import run_script
from tiny_models import make_hf_model
from tokenizer_samples import EN, RU, train_sp

os.environ.setdefault("NANOADAPT_ATTENTION", "sdpa")
K = 10


# ------------------------------------------------------------------------------------------------
# fixtures: tokenizer, teacher, student, chat data, one finished store
# ------------------------------------------------------------------------------------------------
def model_dir(path, tok_model, vocab_size, seed, **overrides):
    make_hf_model("llama", path, seed=seed, vocab_size=vocab_size, **overrides)
    shutil.copy(tok_model, os.path.join(path, "tokenizer.model"))
    return str(path)


def sentences():
    return [s.strip() for s in (RU + EN).replace("\n", " ").split(".") if len(s.strip()) > 10]


def chat_records():
    """14 conversations: messages (one and two turns, with a system prompt) and Alpaca records."""
    s, records = sentences(), []
    for i in range(10):
        turns = [{"role": "user", "content": s[i]}, {"role": "assistant", "content": s[i + 1]}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": s[i + 2]}, {"role": "assistant", "content": s[i + 3]}]
        if i % 4 == 1:
            turns = [{"role": "system", "content": "Отвечай кратко."}] + turns
        records.append({"messages": turns})
    for i in range(10, 14):
        records.append({"instruction": s[i], "input": s[i + 1] if i % 2 else "", "output": s[i + 2]})
    return records


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    os.makedirs(root / "tok")
    tok_model = train_sp(root / "tok" / "tokenizer.model", RU + EN, vocab_size=450,
                         user_defined=("<|im_start|>", "<|im_end|>"))
    V = nano.load_tokenizer(str(tok_model)).vocab_size
    e = {"root": root, "tok_model": str(tok_model), "V": V,
         "teacher": model_dir(root / "teacher", tok_model, V, seed=1),
         "student": model_dir(root / "student", tok_model, V, seed=2, hidden_size=32, intermediate_size=48),
         "data": write_jsonl(root / "chat.jsonl", chat_records())}
    e["store"] = str(root / "store")
    distill.main(dump_args(e, e["store"]))
    return e


def dump_args(e, out, *extra):
    return ["dump", "--teacher", e["teacher"], "--data", e["data"], "--out", out, "--top-k", str(K),
            "--chunk-conversations", "4", "--pack-len", "512", "--batch-size", "2", "--max-len", "512", *extra]


def train_args(e, out, *extra):
    return ["train", "--student", e["student"], "--store", e["store"], "--out", out, "--lr", "3e-3",
            "--batch-size", "2", "--grad-accum", "2", "--seq-len", "512", "--warmup-steps", "1", *extra]


# ------------------------------------------------------------------------------------------------
# the store equals an independent recomputation with transformers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher", ["random", "peaked"])
def test_store_equals_transformers_recomputation(env, teacher, tmp_path):
    """peaked: a teacher whose head is scaled ×60, so the top-k holds all but ~1e-20 of the mass; there
    log(1 - Σ top-k) would be lost to rounding, the logsumexp over the complement is not."""
    import transformers
    path, store_dir = env["teacher"], env["store"]
    if teacher == "peaked":
        hf = make_hf_model("llama", seed=1, vocab_size=env["V"])
        with torch.no_grad():
            hf.lm_head.weight.mul_(60)
        path, store_dir = str(tmp_path / "peaked"), str(tmp_path / "store")
        hf.save_pretrained(path)
        shutil.copy(env["tok_model"], os.path.join(path, "tokenizer.model"))
        distill.main(dump_args(env, store_dir, "--teacher", path))
    store = distill.TopkStore(store_dir)
    meta = store.meta
    assert meta["counts"]["conversations"] == len(store) == 14 and len(meta["chunks"]) == 4
    assert store.chunks[0]["topk_ids"].dtype == np.uint16 and store.chunks[0]["topk_logprobs"].dtype == np.float16
    assert meta["bytes_per_row"] == 4 + K * 4 + 12
    if teacher == "peaked":
        assert np.median(np.concatenate([c["tail_logprob"] for c in store.chunks])) < -25   # fp32 1 - Σ: > -17
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = 0
    for i in range(len(store)):
        tokens, r = store.conversation(i)
        with torch.no_grad():
            logits = hf(torch.from_numpy(tokens)[None]).logits[0].double()          # (L, V), this conversation alone
        pos = torch.from_numpy(r["positions"].astype(np.int64))
        log_z = logits.logsumexp(-1)[pos]
        lp = logits.log_softmax(-1)[pos]                                               # (n, V) float64
        values, ids = lp.topk(K, dim=-1)
        outside = lp.scatter(1, ids, float("-inf")).logsumexp(-1)
        gold = lp.gather(1, torch.from_numpy(tokens)[pos + 1][:, None])[:, 0]
        assert np.array_equal(r["topk_ids"].astype(np.int64), ids.numpy())              # ids exactly
        # fp16 storage: within half an fp16 ulp (2^-11 relative) plus the fp32-vs-fp64 difference
        np.testing.assert_allclose(r["topk_logprobs"].astype(np.float64), values.numpy(), rtol=2 ** -11, atol=1e-5)
        # fp32: log-probs are logits - log Z, so their rounding error scales with |log Z| (large when peaked)
        atol = 1e-5 + 1e-6 * log_z.abs().max().item()
        for name, ref in (("log_partition", log_z), ("tail_logprob", outside), ("gold_logprob", gold)):
            np.testing.assert_allclose(r[name].astype(np.float64), ref.numpy(), rtol=1e-5, atol=atol, err_msg=name)
        assert (r["tail_logprob"] < 0).all()
        rows += len(pos)
    assert rows == meta["counts"]["rows"]


# ------------------------------------------------------------------------------------------------
# the loss: a float64 reference written row by row, and gradcheck
# ------------------------------------------------------------------------------------------------
def random_rows(n=12, V=40, k=6, seed=0, dtype=torch.float64):
    """Student logits and stored teacher arrays made as the dump makes them, from random teacher logits.
    Half the gold tokens are inside the teacher's top-k, half outside; every third row's student gives
    its gold token a negative logit, which the seed weight clamps to 0."""
    g = torch.Generator().manual_seed(seed)
    teacher = 2 * torch.randn(n, V, generator=g, dtype=torch.float64) + 3          # raw logits, log Z != 0
    log_z = teacher.logsumexp(-1)
    lp = teacher - log_z[:, None]
    values, ids = lp.topk(k, dim=-1)
    tail = lp.scatter(1, ids, float("-inf")).logsumexp(-1)
    outside = lp.scatter(1, ids, float("-inf"))
    gold = torch.where(torch.arange(n) % 2 == 0, ids[:, 1], outside.argmax(-1))
    student = torch.randn(n, V, generator=g, dtype=torch.float64) + 1.5
    negative = torch.arange(0, n, 3)
    student[negative, gold[negative]] = -1.0
    student = student.to(dtype)
    return dict(logits=student, gold=gold, topk_ids=ids, topk_logprobs=values.half(), tail_logprob=tail.float(),
                gold_logprob=lp.gather(1, gold[:, None])[:, 0].float(), log_partition=log_z.float())


def reference_loss(rows, kd_weight, T, tail, weighting, eps=1e-6):
    """The loss, one row at a time in float64 numpy, straight from the definitions."""
    z = rows["logits"].double().numpy()
    ids, gold = rows["topk_ids"].numpy(), rows["gold"].numpy()
    lp = rows["topk_logprobs"].double().numpy()
    out = []
    for r in range(z.shape[0]):
        p = np.exp(z[r] - z[r].max())
        p /= p.sum()                                                   # student distribution, T = 1
        ce = -np.log(p[gold[r]])
        if tail == "renorm":
            q = np.exp(lp[r] / T)
            s = np.exp((z[r][ids[r]] - z[r].max()) / T)
        else:
            q = np.append(np.exp(lp[r]), np.exp(float(rows["tail_logprob"][r])))
            q = (q / q.sum()) ** (1 / T)                               # the teacher's k+1 buckets, tempered
            s = np.append(p[ids[r]], 1 - p[ids[r]].sum()) ** (1 / T)
        q, s = q / q.sum(), s / s.sum()
        kd = T * T * np.sum(q * np.log(q / s))
        if weighting == "constant":
            w = 1.0
        elif weighting == "seed":
            t = float(rows["gold_logprob"][r]) + float(rows["log_partition"][r]) if gold[r] in ids[r] else 0.0
            with np.errstate(over="ignore"):
                w = min(max(1 - np.exp(-z[r][gold[r]] / (t + eps)), 0.0), 1.0)
        else:
            w = 1 - np.exp(-np.exp(float(rows["gold_logprob"][r])) / p[gold[r]])
        out.append(ce + kd_weight * w * kd)
    return np.array(out)


MODES = [(tail, weighting, T) for tail in ("bucket", "renorm") for weighting in ("seed", "slim", "constant")
         for T in (1.0, 2.0)]


@pytest.mark.parametrize("tail,weighting,T", MODES)
def test_loss_equals_float64_reference(tail, weighting, T):
    rows = random_rows()
    loss, ce, kd, w = distill.distill_loss(**rows, kd_weight=0.7, temperature=T, tail=tail, weighting=weighting)
    ref = reference_loss(rows, 0.7, T, tail, weighting)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-9, atol=1e-12)
    assert (kd >= -1e-12).all() and ((w >= 0) & (w <= 1)).all()
    if weighting == "seed":                      # both ends of the clamp and the in-between are exercised
        assert (w == 0).any() and (w == 1).any() and ((w > 0) & (w < 1)).any()


@pytest.mark.parametrize("tail,weighting,T", MODES)
def test_loss_gradcheck(tail, weighting, T):
    rows = random_rows(n=3, V=8, k=3, seed=1)
    w = distill.kd_token_weights(rows["logits"], rows["gold"], rows["topk_ids"], rows["gold_logprob"],
                                 rows["log_partition"], weighting)
    rest = {k: v for k, v in rows.items() if k != "logits"}

    def f(z, weights=w):
        return distill.distill_loss(z, **rest, kd_weight=0.7, temperature=T, tail=tail, weighting=weighting,
                                    weights=weights)[0].sum()
    z = rows["logits"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (z,))
    # w is detached: the gradient with w computed inside equals the gradient with w held fixed
    g_inside, = torch.autograd.grad(f(z, None), z)
    g_fixed, = torch.autograd.grad(f(z), z)
    torch.testing.assert_close(g_inside, g_fixed)


def test_zero_kd_weight_is_plain_cross_entropy():
    rows = random_rows()
    loss, *_ = distill.distill_loss(**rows, kd_weight=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(rows["logits"], rows["gold"], reduction="none"))


# ------------------------------------------------------------------------------------------------
# CE and KD on the same shifted positions: a hand-built two-turn conversation
# ------------------------------------------------------------------------------------------------
def test_two_turn_positions_by_hand(env, tmp_path):
    tok = nano.load_tokenizer(env["teacher"])
    im_start, im_end, bos = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"], tok.bos_id
    c = tok.encode_continuation
    messages = [{"role": "user", "content": "Почему небо голубое?"}, {"role": "assistant", "content": "Из-за рассеяния."},
                {"role": "user", "content": "А зимой?"}, {"role": "assistant", "content": "Тоже голубое."}]
    # by hand: ChatML, text after a special token never gets the dummy prefix; 1 = supervised token
    pieces = [([bos, im_start], 0), (c("user\nПочему небо голубое?"), 0), ([im_end], 0), (c("\n"), 0),
              ([im_start], 0), (c("assistant\n"), 0), (c("Из-за рассеяния."), 1), ([im_end], 1), (c("\n"), 0),
              ([im_start], 0), (c("user\nА зимой?"), 0), ([im_end], 0), (c("\n"), 0),
              ([im_start], 0), (c("assistant\n"), 0), (c("Тоже голубое."), 1), ([im_end], 1), (c("\n"), 0)]
    ids = [i for p, _ in pieces for i in p]
    supervised = [i for i, s in enumerate(s for p, flag in pieces for s in [flag] * len(p)) if s]
    answers = c("Из-за рассеяния.") + [im_end] + c("Тоже голубое.") + [im_end]

    data = write_jsonl(tmp_path / "two_turns.jsonl", [{"messages": messages}, chat_records()[1]])
    store_dir = str(tmp_path / "store")
    distill.main(["dump", "--teacher", env["teacher"], "--data", data, "--out", store_dir, "--top-k", "5",
                  "--chat-template", "chatml"])
    store = distill.TopkStore(store_dir)
    tokens, rows = store.conversation(0)
    assert tokens.tolist() == ids
    # stored rows: the positions whose NEXT token is supervised, i.e. one before each supervised token
    assert rows["positions"].tolist() == [i - 1 for i in supervised]
    assert tokens[rows["positions"] + 1].tolist() == answers
    assert tokens[rows["positions"][0]] == c("assistant\n")[-1]        # "\n" after "assistant" predicts the answer

    # a training batch packing both conversations: CE targets and KD rows index the same positions
    input_ids, doc_ids, flat, gold, t = distill.load_batch(store, [[0, 1]], torch.device("cpu"))
    n0 = len(supervised)
    assert flat[:n0].tolist() == rows["positions"].tolist()
    assert gold.tolist() == input_ids.flatten()[flat + 1].tolist()
    assert gold[:n0].tolist() == answers
    teacher = nano.Transformer.from_pretrained(env["teacher"])
    with torch.no_grad():
        lp = teacher(input_ids, doc_ids=doc_ids).flatten(0, 1)[flat].log_softmax(-1)     # (N, V) at the CE rows
    assert torch.equal(lp.topk(5, -1).indices, t["topk_ids"])                          # the KD rows are those rows
    torch.testing.assert_close(lp.gather(1, gold[:, None])[:, 0], t["gold_logprob"], rtol=1e-4, atol=1e-4)
    # and one position off would not match: the guard against a KD mask shifted against the CE mask
    assert not torch.equal(teacher_topk_at(teacher, input_ids, doc_ids, flat + 1), t["topk_ids"])


def teacher_topk_at(teacher, input_ids, doc_ids, flat):
    with torch.no_grad():
        return teacher(input_ids, doc_ids=doc_ids).flatten(0, 1)[flat].topk(5, -1).indices


def test_dump_tokenizes_and_supervises_as_sft(env, tmp_path):
    """The store's tokens are sft.py's ids, and its rows are exactly where sft.py's labels are not IGNORE."""
    import sft
    tok = nano.load_tokenizer(env["teacher"])
    teacher = nano.Transformer.from_pretrained(env["teacher"])
    template = nano.choose_chat_template("auto", env["teacher"], teacher.config.model_type, tok)
    assert distill.choose_template(None, env["teacher"], teacher.config.model_type, tok) == template == "chatml"
    examples, counts = nano.render_conversations(nano.read_conversations(env["data"]), template, tok, 512, "drop")
    store = distill.TopkStore(env["store"])
    assert len(examples) == len(store) and counts["dropped"] == store.meta["counts"]["dropped"] == 0
    for i, (ids, _) in enumerate(examples):
        _, labels, _ = sft.make_batch([[i]], examples, 512, 0)
        tokens, rows = store.conversation(i)
        assert tokens.tolist() == ids
        assert rows["positions"].tolist() == torch.nonzero(labels[0] != sft.IGNORE)[:, 0].tolist()
    # truncation keeps the first --max-len tokens and only the positions inside them
    cut, counts = distill.tokenize_conversations([env["data"]], tok, template, 60, "truncate")
    assert counts["truncated"] > 0 and all(len(ids) <= 60 and max(pos) < len(ids) - 1 for ids, pos in cut)


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
def copy_store(env, tmp_path):
    dst = str(tmp_path / "store")
    shutil.copytree(env["store"], dst)
    return dst


def test_store_without_meta_is_refused(env, tmp_path):
    store = copy_store(env, tmp_path)
    os.remove(os.path.join(store, "meta.json"))
    with pytest.raises(FileNotFoundError, match="no meta.json.*did not finish.*resume"):
        distill.TopkStore(store)
    with pytest.raises(FileNotFoundError, match="not a top-k store"):
        distill.TopkStore(str(tmp_path))


def test_truncated_shard_is_refused(env, tmp_path):
    store = copy_store(env, tmp_path)
    path = os.path.join(store, "chunk_000002", "topk_logprobs.npy")
    a = np.load(path)
    np.save(path, a[:-3])                                       # a shard with rows missing
    with pytest.raises(ValueError, match=r"topk_logprobs.npy: shape .* meta.json records"):
        distill.TopkStore(store)
    np.save(path, a)
    path = os.path.join(store, "chunk_000001", "topk_ids.npy")
    with open(path, "r+b") as f:                                # a file cut short by a crash or a full disk
        f.truncate(os.path.getsize(path) - 7)
    with pytest.raises(ValueError, match="topk_ids.npy: truncated"):
        distill.TopkStore(store)


def test_student_with_another_tokenizer_is_refused(env, tmp_path):
    other_tok = train_sp(tmp_path / "other.model", EN + RU, vocab_size=env["V"],
                         user_defined=("<|im_start|>", "<|im_end|>", "<|other|>"))
    student = model_dir(tmp_path / "student", other_tok, env["V"] + 1, seed=3, hidden_size=32, intermediate_size=48)
    with pytest.raises(ValueError, match="tokenizer differs from the teacher.s"):
        distill.main(train_args(env, str(tmp_path / "run"), "--student", student))


def test_resumed_dump_with_other_settings_is_refused(env, tmp_path):
    store = copy_store(env, tmp_path)
    os.remove(os.path.join(store, "meta.json"))
    with pytest.raises(ValueError, match="different settings.*k"):
        distill.main(dump_args(env, store, "--top-k", "7"))


def test_resumed_dump_with_a_retrained_teacher_is_refused(env, tmp_path, monkeypatch):
    """Same path, same config.json, new weights written over the old ones: the chunks would mix two teachers.
    The same weights copied anew (new file times, as cp or a node-local copy gives) resume."""
    teacher = str(tmp_path / "teacher")
    shutil.copytree(env["teacher"], teacher)
    e = {**env, "teacher": teacher}
    monkeypatch.setenv(distill.STOP_ENV, "1")
    with pytest.raises(SystemExit, match="stopping after 1 chunk"):
        distill.main(dump_args(e, str(tmp_path / "store")))
    for name in os.listdir(teacher):
        os.utime(os.path.join(teacher, name), (1e9, 1e9))         # copied: other times, same bytes
    with pytest.raises(SystemExit, match="stopping after 1 chunk"):
        distill.main(dump_args(e, str(tmp_path / "store")))    # resumed: a second chunk
    assert os.path.isdir(os.path.join(tmp_path, "store", "chunk_000001"))
    monkeypatch.delenv(distill.STOP_ENV)
    config = open(os.path.join(teacher, "config.json"), "rb").read()
    retrained = nano.Transformer.from_pretrained(teacher)
    with torch.no_grad():
        retrained.lm_head.weight.mul_(1.5)
    retrained.save_pretrained(teacher)
    with open(os.path.join(teacher, "config.json"), "wb") as f:     # the same config.json to the byte
        f.write(config)
    with pytest.raises(ValueError, match=r"different settings \(teacher_weights\)"):
        distill.main(dump_args(e, str(tmp_path / "store")))


# ------------------------------------------------------------------------------------------------
# an interrupted dump resumes to the same store
# ------------------------------------------------------------------------------------------------
def store_contents(path):
    out = {}
    for d in sorted(os.listdir(path)):
        if d.startswith("chunk_"):
            for f in sorted(os.listdir(os.path.join(path, d))):
                with open(os.path.join(path, d, f), "rb") as fh:
                    out[f"{d}/{f}"] = fh.read()
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    meta.pop("last_run")
    return out, meta


def test_interrupted_dump_resumes_to_the_same_store(env, tmp_path, monkeypatch):
    store = str(tmp_path / "store")
    monkeypatch.setenv(distill.STOP_ENV, "1")
    with pytest.raises(SystemExit, match="stopping after 1 chunk"):
        distill.main(dump_args(env, store))
    assert os.path.isdir(os.path.join(store, "chunk_000000")) and not os.path.exists(os.path.join(store, "chunk_000001"))
    assert not os.path.exists(os.path.join(store, "meta.json"))
    with pytest.raises(FileNotFoundError, match="did not finish"):
        distill.TopkStore(store)
    os.makedirs(os.path.join(store, ".chunk_000001.tmp-killed"))     # what a kill mid-chunk leaves behind
    monkeypatch.delenv(distill.STOP_ENV)
    distill.main(dump_args(env, store))
    assert store_contents(store) == store_contents(env["store"])
    assert not [d for d in os.listdir(store) if d.startswith(".")]


# ------------------------------------------------------------------------------------------------
# training: runs, improves the held-out KL, resumes exactly; LoRA; DDP
# ------------------------------------------------------------------------------------------------
def read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def weights(path):
    """Every tensor of a saved model: one safetensors file, or the several an FSDP save writes."""
    from safetensors.torch import load_file
    files = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    return {k: v for n in files for k, v in load_file(os.path.join(path, n)).items()}


def test_train_lowers_kl_saves_hf_and_resumes_exactly(env, tmp_path):
    import transformers
    run = str(tmp_path / "run")
    args = train_args(env, run, "--epochs", "6", "--max-steps", "6", "--save-every", "3", "--eval-conversations", "3",
                      "--eval-every", "3", "--kd-weight", "1.0", "--kd-weighting", "constant")
    distill.main(args)
    m = read_metrics(run)
    evals = [r for r in m if "eval_kl" in r]
    assert [r["step"] for r in m if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in evals] == [0, 3, 6] and evals[-1]["eval_kl"] < evals[0]["eval_kl"]
    assert os.path.isfile(os.path.join(run, "args.json")) and nano.latest_checkpoint(run).endswith("step_000003")
    hf = transformers.AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)          # an HF checkpoint
    assert hf.config.hidden_size == 32

    # killed after step 3: drop the final model (the step-3 checkpoint is the last one kept), resume, and
    # land on the same weights
    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    os.remove(os.path.join(resumed, "model.safetensors"))
    distill.main(args[:args.index("--out") + 1] + [resumed] + args[args.index("--out") + 2:] + ["--resume"])
    a, b = weights(run), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_trains_only_the_adapter_and_resumes_exactly_with_dropout(env, tmp_path):
    """LoRA with dropout: only the adapted layers change, and the rows of ChatML's two tokens in the embedding
    and the head (as in sft.py); a run resumed from its step-2 checkpoint draws the same dropout masks
    (reseeded per step) and lands on the same weights."""
    run = str(tmp_path / "lora")
    args = train_args(env, run, "--max-steps", "4", "--save-every", "2", "--lora-rank", "4", "--lora-alpha", "8",
                      "--lora-dropout", "0.3", "--lora-targets", "q_proj,v_proj", "--kd-tail", "renorm",
                      "--kd-weighting", "slim")
    distill.main(args)
    base, merged = weights(env["student"]), weights(run)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    rows = {"model.embed_tokens.weight", "lm_head.weight"}
    assert rows < changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed - rows)
    chatml = sorted(nano.load_tokenizer(env["student"]).special_tokens[t] for t in ("<|im_start|>", "<|im_end|>"))
    for k in rows:
        assert (base[k] != merged[k]).any(1).nonzero().flatten().tolist() == chatml, k
    assert os.path.isfile(os.path.join(run, "adapter", "adapter_model.safetensors"))

    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    os.remove(os.path.join(resumed, "model.safetensors"))
    shutil.rmtree(os.path.join(resumed, "adapter"))
    distill.main(args[:args.index("--out") + 1] + [resumed] + args[args.index("--out") + 2:] + ["--resume"])
    a, b = weights(run), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_kinds_of_held_out_conversations_are_refused(env, tmp_path, capsys):
    """--eval-conversations with --eval-store would drop the store's last N from training and score
    the other store: N conversations neither trained on nor held out."""
    with pytest.raises(SystemExit):
        distill.parse_args(train_args(env, str(tmp_path / "run"), "--eval-store", env["store"],
                                      "--eval-conversations", "3"))
    assert "--eval-store and --eval-conversations" in capsys.readouterr().err


def test_save_dtype_rounds_only_the_final_model(env, tmp_path):
    """--save-dtype bfloat16: the same training, its final weights each rounded to bf16 as written."""
    full, rounded = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    distill.main(train_args(env, full, "--max-steps", "1"))
    distill.main(train_args(env, rounded, "--max-steps", "1", "--save-dtype", "bfloat16"))
    a, b = weights(full), weights(rounded)
    assert set(a) == set(b) and all(t.dtype == torch.float32 for t in a.values())
    assert all(b[k].dtype == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)) for k in a)


def torchrun(*args, env=None):
    run_script("distill.py", *args, ranks=2, env=env)


def test_ddp_dump_and_train_equal_one_process(env, tmp_path):
    """2 ranks write the same store as 1; 2 ranks × 1 micro-batch train to the same weights as 1 rank × 2."""
    store = str(tmp_path / "store")
    torchrun(*dump_args(env, store))
    assert store_contents(store) == store_contents(env["store"])
    common = ["--max-steps", "2", "--grad-clip", "0"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    distill.main(train_args(env, one, *common))
    torchrun(*train_args(env, two, *common), "--grad-accum", "1")
    a, b = weights(one), weights(two)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    assert [r["loss"] for r in read_metrics(one)] == pytest.approx([r["loss"] for r in read_metrics(two)], rel=1e-5)
    # FSDP2 (sharded weights, gradients and optimizer state) trains and evaluates the same; 3 held-out
    # conversations do not split evenly over 2 ranks, so a rank runs a spare forward (else FSDP would hang)
    held = ["--eval-conversations", "3"]
    one_held, sharded = str(tmp_path / "one_held"), str(tmp_path / "fsdp")
    distill.main(train_args(env, one_held, *common, *held))
    torchrun(*train_args(env, sharded, *common, *held), "--grad-accum", "1", "--fsdp", "--compile",
             "--activation-checkpointing",                  # each layer compiled (inductor) and checkpointed too
             env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert any(f.is_file() for f in (tmp_path / "inductor").rglob("*"))     # --compile reached the layers
    a, c = weights(one_held), weights(sharded)
    assert all(torch.allclose(a[k], c[k], rtol=1e-4, atol=1e-6) for k in a)
    m1, m2 = read_metrics(one_held), read_metrics(sharded)
    assert [r.get("loss", r.get("eval_ce")) for r in m1] == pytest.approx([r.get("loss", r.get("eval_ce")) for r in m2], rel=1e-5)
    assert any("eval_ce" in r for r in m2)
