"""evaluate.py against an independent computation with transformers, on tiny checkpoints and a tiny
SentencePiece tokenizer trained here: bits per byte (whole and sliding window), choice log-likelihoods,
MC picks on hand-built questions, generation, language purity, bad input, torchrun sharding."""
import io
import json
import math
import os
import re

import pytest
import torch

import evaluate
from evaluate import InputError, language_purity, parse_args, run, sliding_windows
from launch import run_script
from tiny_models import make_hf_model

os.environ.setdefault("NANOADAPT_ATTENTION", "sdpa")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data")

RU = ("Говорили, что на набережной появилось новое лицо: дама с собачкой. Дмитрий Дмитрич Гуров, "
      "проживший в Ялте уже две недели и привыкший тут, тоже стал интересоваться новыми лицами. "
      "Сидя в павильоне у Верне, он видел, как по набережной прошла молодая дама, невысокого роста блондинка. "
      "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива по-своему. ")
EN = ("Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do. "
      "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want "
      "of a wife. To Sherlock Holmes she is always the woman. A. B. C. D. Answer: A, B, C or D? ")


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


# ------------------------------------------------------------------------------------------------
# fixtures: a tiny tokenizer and tiny transformers checkpoints that carry it
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_model_bytes():
    import sentencepiece as spm
    lines = [s.strip() + "." for s in (RU + EN).split(".") if s.strip()] * 4
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=600, model_type="bpe",
                                   character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


def tiny_model_dir(path, family, sp_bytes, seed=0):
    """A transformers checkpoint (2 layers, hidden 64) with the tiny tokenizer as tokenizer.model."""
    from tokenizer import SentencePieceTokenizer, load_sp_proto
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(sp_bytes)
    vocab = SentencePieceTokenizer(load_sp_proto(os.path.join(path, "tokenizer.model"))).vocab_size
    hf = make_hf_model(family, path, seed=seed, vocab_size=vocab)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:    # save_pretrained may clear the dir
        f.write(sp_bytes)
    return hf


@pytest.fixture(scope="module")
def llama(tmp_path_factory, sp_model_bytes):
    path = str(tmp_path_factory.mktemp("models") / "llama")
    hf = tiny_model_dir(path, "llama", sp_model_bytes)
    from model import load_tokenizer
    return path, hf, load_tokenizer(path)


def hf_log_probs(hf, ids):
    """(len(ids) - 1,) float64: log p(ids[t] | ids[:t]) for t >= 1, from one transformers forward."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def evaluate_args(model_dirs, *extra):
    return parse_args(["--models", *map(str, model_dirs), *map(str, extra)])


# ------------------------------------------------------------------------------------------------
# bits per byte
# ------------------------------------------------------------------------------------------------
def test_sliding_windows_score_every_token_once():
    ids = list(range(100))
    for max_len, stride in ((16, 5), (16, 15), (16, 1), (200, 100), (100, 50), (99, 3)):
        requests = sliding_windows(ids, max_len, stride)
        scored = []
        for k, (window, first) in enumerate(requests):
            assert len(window) <= max_len and first >= 1
            scored += window[first:]
            if k > 0:   # every scored token sees at least max_len - stride tokens before it
                assert first >= max_len - stride
        assert scored == ids[1:]


@pytest.mark.parametrize("family", ["llama", "qwen3_tied"])
def test_bits_per_byte_equals_transformers(family, tmp_path, sp_model_bytes):
    """Whole-text and sliding-window bits/byte, tokens and perplexity against our own loop over transformers."""
    path = str(tmp_path / family)
    hf = tiny_model_dir(path, family, sp_model_bytes)
    from model import load_tokenizer
    tok = load_tokenizer(path)
    text = (RU + EN) * 2
    text_file = tmp_path / "text.txt"
    text_file.write_text(text, encoding="utf-8")
    ids = [tok.bos_id] + tok.encode(text)
    L = len(ids)
    assert 200 < L < 1000

    whole = -hf_log_probs(hf, ids).sum().item()       # nats, every text token with all the text before it
    max_len, stride = 48, 20
    windowed, scored_to, k = 0.0, 1, 0
    while scored_to < L:                              # window k ends at max_len + k * stride (or the text's end)
        end = min(max_len + k * stride, L)
        begin = max(0, end - max_len)
        windowed -= hf_log_probs(hf, ids[begin:end])[scored_to - begin - 1:].sum().item()
        scored_to, k = end, k + 1
    assert k > 10 and abs(windowed - whole) > 1e-3   # the short context really changes the numbers

    n_bytes = len(text.encode("utf-8"))
    for (ml, st), nats in (((1024, 512), whole), ((max_len, stride), windowed)):
        report = run(evaluate_args([path], "--text", text_file, "--max-len", ml, "--stride", st, "--batch-size", 3))
        t = report["models"][family]["texts"]["text.txt"]
        assert t["tokens"] == L - 1 and t["bytes"] == n_bytes and t["chars"] == len(text)
        assert rel(t["bits_per_byte"], nats / math.log(2) / n_bytes) < 1e-5
        assert rel(t["ppl_per_token"], math.exp(nats / (L - 1))) < 1e-4
        assert rel(t["chars_per_token"], len(text) / (L - 1)) < 1e-12
        assert rel(t["tokens_per_word"], (L - 1) / len(text.split())) < 1e-12


def test_max_chars_and_jsonl_text(tmp_path, llama):
    path, _, tok = llama
    f = write_jsonl(tmp_path / "docs.jsonl", [{"text": RU}, {"text": EN}])
    report = run(evaluate_args([path], "--text", f, "--max-chars", 300))
    t = report["models"]["llama"]["texts"]["docs.jsonl"]
    assert t["chars"] == 300 and t["tokens"] == len(tok.encode((RU + "\n\n" + EN)[:300]))


# ------------------------------------------------------------------------------------------------
# multiple choice
# ------------------------------------------------------------------------------------------------
QUESTIONS = [
    {"question": "Кто сидел в павильоне у Верне?", "choices": ["Гуров", "дама с собачкой", "Алиса", "Холмс"], "answer": 0},
    {"question": "Alice was beginning to get very", "choices": ["tired", "happy"], "answer": 0},
    {"question": "Все счастливые семьи похожи друг на друга?", "choices": ["да", "нет", "по-своему"], "answer": 2},
]


def test_choice_log_likelihoods_equal_transformers(tmp_path, llama):
    """Every choice's and every letter's log-likelihood, from independent transformers forwards (no padding)."""
    path, hf, tok = llama
    bench = write_jsonl(tmp_path / "bench.jsonl", QUESTIONS)
    report = run(evaluate_args([path], "--mc", bench, "--batch-size", 3))   # batches mix lengths: padding
    mc = report["models"]["llama"]["mc"]["bench"]
    assert mc["n"] == 3
    for q, d in zip(QUESTIONS, mc["questions"]):
        context = tok.encode(q["question"] + "\nAnswer:")
        lettered = tok.encode(q["question"] + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", q["choices"])) + "\nAnswer:")
        for k, c in enumerate(q["choices"]):
            cont = tok.encode_continuation(" " + c)
            ref = hf_log_probs(hf, [tok.bos_id] + context + cont)[-len(cont):].sum().item()
            assert rel(d["loglik"][k], ref) < 1e-5
            assert rel(d["loglik_per_byte"][k], ref / len((" " + c).encode())) < 1e-5
            letter = tok.encode_continuation(" " + "ABCD"[k])
            ref = hf_log_probs(hf, [tok.bos_id] + lettered + letter)[-len(letter):].sum().item()
            assert rel(d["letter_loglik"][k], ref) < 1e-5


def test_long_context_loses_its_beginning_not_the_choice(llama):
    _, _, tok = llama
    context, choice = RU * 3, " Гуров"
    cont = tok.encode_continuation(choice)
    ids, first = evaluate.choice_request(context, choice, tok, tok.bos_id, 40, "q")
    full = [tok.bos_id] + tok.encode(context) + cont
    assert ids == full[-40:] and ids[first:] == cont
    with pytest.raises(InputError, match="longer than --max-len"):
        evaluate.choice_request(context, choice * 20, tok, tok.bos_id, 40, "q")


def word_start_pieces(tok):
    """Ids of pieces "▁word" that spell themselves: encode_continuation(" word") is that one id."""
    out = []
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if piece.startswith("▁") and len(piece) > 2 and tok.encode_continuation(" " + piece[1:]) == [i]:
            out.append(i)
    return out


def test_mc_picks_the_models_own_greedy_continuation(tmp_path, llama):
    """Log-likelihood format: the right choice is the model's greedy continuation (from transformers),
    the wrong ones random words of the same token and byte count; the answer's index changes each time."""
    path, hf, tok = llama
    words = word_start_pieces(tok)
    assert len(words) > 30
    gen = torch.Generator().manual_seed(0)
    questions, prompts = [], [RU[:60], EN[:50], RU[100:170], EN[120:180], RU[200:240], EN[200:260]]
    for k, prompt in enumerate(prompts):
        ids = [tok.bos_id] + tok.encode(prompt + "\nAnswer:")
        greedy = []
        for _ in range(3):          # greedy over word pieces, so the choice text re-encodes to these very ids
            with torch.no_grad():
                logits = hf(torch.tensor([ids + greedy])).logits[0, -1]
            greedy.append(words[logits[words].argmax().item()])
        spell = lambda toks: "".join(tok.id_to_piece(t) for t in toks).replace("▁", " ")[1:]  # noqa: E731
        wrong = []
        while len(wrong) < 3:       # as many tokens and UTF-8 bytes, so the per-byte pick must be right too
            candidate = spell([words[j] for j in torch.randint(len(words), (3,), generator=gen)])
            if len(candidate.encode()) == len(spell(greedy).encode()) and candidate != spell(greedy):
                wrong.append(candidate)
        answer = k % 4
        choices = wrong[:answer] + [spell(greedy)] + wrong[answer:]
        assert tok.encode_continuation(" " + choices[answer]) == greedy
        questions.append({"question": prompt, "choices": choices, "answer": answer})
    bench = write_jsonl(tmp_path / "greedy.jsonl", questions)
    mc = run(evaluate_args([path], "--mc", bench))["models"]["llama"]["mc"]["greedy"]
    assert mc["accuracy"]["loglik"] == 1.0 and mc["accuracy"]["loglik_per_byte"] == 1.0
    assert [d["pred_loglik"] for d in mc["questions"]] == [k % 4 for k in range(len(prompts))]


def test_lettered_format_picks_the_letter_the_model_prefers(tmp_path, llama):
    """Lettered format: the right letter is the one transformers gives the highest probability after the
    listed choices; the letters differ across questions, so a constant answer cannot pass."""
    path, hf, tok = llama
    questions = []
    for k in range(8):
        q = {"question": (RU + EN)[k * 40:k * 40 + 50], "choices": ["Гуров", "Alice", "дама", "Holmes"]}
        q["choices"] = q["choices"][k % 4:] + q["choices"][:k % 4]
        prompt = tok.encode(evaluate.lettered_prompt(q["question"], q["choices"], "Answer:"))
        scores = []
        for L in "ABCD":
            letter = tok.encode_continuation(" " + L)
            scores.append(hf_log_probs(hf, [tok.bos_id] + prompt + letter)[-len(letter):].sum().item())
        q["answer"] = max(range(4), key=scores.__getitem__)
        questions.append(q)
    assert len({q["answer"] for q in questions}) > 1
    bench = write_jsonl(tmp_path / "letters.jsonl", questions)
    mc = run(evaluate_args([path], "--mc", bench, "--batch-size", 5))["models"]["llama"]["mc"]["letters"]
    assert mc["accuracy"]["lettered"] == 1.0

    shifted = [dict(q, answer=(q["answer"] + 1) % 4) for q in questions]
    bench = write_jsonl(tmp_path / "letters.jsonl", shifted)
    mc = run(evaluate_args([path], "--mc", bench))["models"]["llama"]["mc"]["letters"]
    assert mc["accuracy"]["lettered"] == 0.0


def test_letters_are_single_word_tokens_with_a_real_sentencepiece_tokenizer():
    """With Llama-2's tokenizer " A" after "Answer:" is the one token "▁A", not "▁" + "A" or "▁" + "▁A"."""
    model_file = os.path.join(SHARED, "base_tokenizers", "llama2-32k-bpe.model")
    if not os.path.isfile(model_file):
        pytest.skip("../shared/data is absent")
    from model import load_tokenizer
    tok = load_tokenizer(model_file)
    for L in "ABCD":
        assert [tok.id_to_piece(i) for i in tok.encode_continuation(" " + L)] == ["▁" + L]
        whole = tok.encode("Question?\nAnswer: " + L)
        assert whole[-1] == tok.encode_continuation(" " + L)[0]     # what the model sees in running text


# ------------------------------------------------------------------------------------------------
# generation and language purity
# ------------------------------------------------------------------------------------------------
def test_language_purity_on_hand_written_strings():
    assert language_purity("Привет, мир!") == 1.0
    assert language_purity("Привет, world") == 0.5
    assert language_purity("Купил iPhone-а за 1000$") == 0.75          # Купил, iPhone, а, за
    assert language_purity("Сәлем, әлем! Қазақстан Ұлы Өзен") == 1.0   # Kazakh letters are Cyrillic
    assert language_purity("в 2024 году, 12:30 — ок") == 1.0           # numbers are not words
    assert language_purity("snake_case слово") == pytest.approx(1 / 3)  # the underscore splits words
    assert language_purity("123 + 456 = ???") is None
    assert language_purity("Hello мир", script="Latin") == 0.5
    assert language_purity("Γειά σου κόσμε", script="greek") == 1.0
    assert language_purity("йод", script="Cyrillic") == 1.0
    assert language_purity("и\u0306од and") == 0.5     # NFD "й" is one letter after NFC: [йод, and], not [и, од, and]


def test_chat_template_is_recognised(tmp_path):
    from model import CHAT_TEMPLATES
    assert evaluate.detect_chat_template(str(tmp_path)) == "plain"
    for name, jinja in CHAT_TEMPLATES.items():       # the templates sft.py writes
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": jinja}))
        assert evaluate.detect_chat_template(str(tmp_path)) == name
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"}))
    assert evaluate.detect_chat_template(str(tmp_path)) == "chatml"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ '[INST] ' + m.content }}"}))
    assert evaluate.detect_chat_template(str(tmp_path)) == "mistral"


def test_prompt_rendering(llama):
    _, _, tok = llama
    msgs = [{"role": "system", "content": "Будь краток."}, {"role": "user", "content": "Привет"},
            {"role": "assistant", "content": "Здравствуй"}, {"role": "user", "content": "Как дела?"}]
    encode = lambda p, t: evaluate.encode_prompt(p, t, tok, "p.jsonl: prompt 1")  # noqa: E731
    assert encode({"text": "Привет"}, "chatml") == [tok.bos_id] + tok.encode("Привет")
    assert encode({"messages": msgs}, "plain") == tok.encode("Будь краток.\n\nПривет\n\nЗдравствуй\n\nКак дела?\n\n",
                                                             add_bos=True)
    assert encode({"messages": msgs}, "chatml") == tok.encode(
        "<s><|im_start|>system\nБудь краток.<|im_end|>\n<|im_start|>user\nПривет<|im_end|>\n"
        "<|im_start|>assistant\nЗдравствуй<|im_end|>\n<|im_start|>user\nКак дела?<|im_end|>\n<|im_start|>assistant\n")
    assert encode({"messages": msgs}, "mistral") == tok.encode(
        "<s> [INST] Будь краток.\n\nПривет [/INST] Здравствуй</s> [INST] Как дела? [/INST]")
    with pytest.raises(InputError, match="p.jsonl: prompt 1: .*alternate"):
        encode({"messages": [msgs[1], msgs[1]]}, "mistral")


def test_generation_equals_transformers_greedy(tmp_path, llama):
    """Completions of plain and chat prompts (batched, left-padded) equal transformers' greedy generation."""
    path, hf, tok = llama
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": RU[:30]},
        {"messages": [{"role": "user", "content": "Кто такой Гуров?"}, {"role": "assistant", "content": "Герой."}]},
        {"instruction": "Tell me about Alice", "input": "briefly", "output": "She is tired."},
    ])
    report = run(evaluate_args([path], "--prompts", prompts, "--max-new-tokens", 12, "--batch-size", 2,
                               "--chat-template", "chatml"))
    g = report["models"]["llama"]["generation"]
    assert g["n"] == 3 and g["chat_template"] == "chatml"
    prompt_ids = [[tok.bos_id] + tok.encode(RU[:30]),
                  tok.encode("<s><|im_start|>user\nКто такой Гуров?<|im_end|>\n<|im_start|>assistant\n"),
                  tok.encode("<s><|im_start|>user\nTell me about Alice\n\nbriefly<|im_end|>\n<|im_start|>assistant\n")]
    assert g["completions"][1]["prompt"]["reference"] == "Герой."
    new_tokens = 0
    for ids, c in zip(prompt_ids, g["completions"]):
        ids = torch.tensor([ids])
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id,
                              pad_token_id=0)[0, ids.shape[1]:].tolist()
        new_tokens += len(out)
        assert c["completion"] == tok.decode([t for t in out if t != tok.eos_id])
        assert c["new_tokens"] == len(out)
        assert c["purity"] == language_purity(c["completion"])
    assert g["new_tokens"] == new_tokens and g["chars"] == sum(len(c["completion"]) for c in g["completions"])
    assert g["seconds"] > 0
    assert g["tokens_per_s"] == pytest.approx(new_tokens / g["seconds"])
    assert g["chars_per_s"] == pytest.approx(g["chars"] / g["seconds"])


# ------------------------------------------------------------------------------------------------
# several models, the table, bad input
# ------------------------------------------------------------------------------------------------
def test_two_models_one_table(tmp_path, llama, sp_model_bytes, capsys):
    path, _, _ = llama
    other = str(tmp_path / "other")
    tiny_model_dir(other, "qwen3_tied", sp_model_bytes, seed=1)
    (tmp_path / "t.txt").write_text(RU, encoding="utf-8")
    bench = write_jsonl(tmp_path / "b.jsonl", QUESTIONS)
    out = tmp_path / "report.json"
    evaluate.main(["--models", path, other, "--text", str(tmp_path / "t.txt"), "--mc", bench, "--out", str(out)])
    table = capsys.readouterr().out
    assert table.startswith("| measure | llama | other |")
    assert "| t.txt: bits/byte ↓ |" in table and "| b (n=3): acc lettered A/B/C/D ↑ |" in table
    report = json.loads(out.read_text())
    a, b = (report["models"][n]["texts"]["t.txt"] for n in ("llama", "other"))
    assert a["tokens"] == b["tokens"] and a["bits_per_byte"] != b["bits_per_byte"]


@pytest.mark.parametrize("line, message", [
    ('{"question": "Q?", "choices": ["a", "b"], "answer": 0', r"bad\.jsonl:2: not valid JSON"),
    ('{"question": "Q?", "choices": ["a", "b"], "answer": 2}', r"bad\.jsonl:2: answer 2 is out of range for 2 choices"),
    ('{"question": "Q?", "choices": ["a", "b"], "answer": -1}', r"bad\.jsonl:2: answer -1 is out of range"),
    ('{"question": "Q?", "choices": ["a", "b"], "answer": "0"}', r"bad\.jsonl:2: expected an integer field 'answer'"),
    ('{"question": "Q?", "choices": "a b", "answer": 0}', r"bad\.jsonl:2: expected 'choices' to be a list"),
    ('["Q?", ["a", "b"], 0]', r"bad\.jsonl:2: expected a JSON object"),
])
def test_malformed_benchmark_line_names_file_and_line(tmp_path, line, message):
    bench = write_jsonl(tmp_path / "bad.jsonl", [QUESTIONS[1], line])
    with pytest.raises(InputError, match=message):
        evaluate.read_benchmark(bench)


def test_max_questions_spreads_over_the_file(tmp_path):
    """--max-questions 4 of 10 questions, the first five of one subject and the last five of another (as
    MMLU files are grouped): questions 0, 2, 5 and 7, so both subjects, not the first four; every line is
    still checked (a bad tenth line is an error)."""
    rows = [{"question": f"{'algebra' if i < 5 else 'biology'} {i}?", "choices": ["a", "b"], "answer": 0}
            for i in range(10)]
    bench = write_jsonl(tmp_path / "b.jsonl", rows)
    assert [q["question"] for q in evaluate.read_benchmark(bench, 4)] == ["algebra 0?", "algebra 2?", "biology 5?",
                                                                         "biology 7?"]
    assert len(evaluate.read_benchmark(bench, 10)) == len(evaluate.read_benchmark(bench, 99)) == 10
    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:9] + ['{"question": "Q?"}'])
    with pytest.raises(InputError, match=r"bad\.jsonl:10:"):
        evaluate.read_benchmark(bad, 4)


def test_bad_input_is_one_clear_message(tmp_path, llama, capsys):
    path, _, _ = llama
    no_tok = tmp_path / "no_tokenizer"
    make_hf_model("llama", no_tok)
    bench = write_jsonl(tmp_path / "bench.jsonl", QUESTIONS[:1] + [{"question": "Q", "choices": ["a", "b"], "answer": 5}])
    text = tmp_path / "t.txt"
    text.write_text(RU, encoding="utf-8")
    for argv, message in (
            (["--models", str(no_tok), "--mc", bench], "bench.jsonl:2: answer 5 is out of range"),
            (["--models", path, str(no_tok), "--text", text], f"model {no_tok}: cannot load its tokenizer"),
            (["--models", str(tmp_path / "nowhere"), "--text", text], "nowhere: no config.json"),
            (["--models", path, "--text", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
            (["--models", path, "--prompts", write_jsonl(tmp_path / "p.jsonl", [{"messages": []}])],
             r"p.jsonl:1: the conversation must end with a user turn")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(list(map(str, argv)))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("evaluate.py: error: ") and message in err
    with pytest.raises(SystemExit):
        parse_args(["--models", path, "--text", str(text), "--max-len", "64", "--stride", "64"])
    with pytest.raises(SystemExit):
        parse_args(["--models", path, "--text", str(text), "--script", "Klingon"])
    for flag, value in (("--batch-size", 0), ("--batch-size", -1), ("--max-new-tokens", 0), ("--max-prompts", -1),
                        ("--max-questions", -1), ("--max-chars", -1)):
        with pytest.raises(SystemExit):
            parse_args(["--models", path, "--text", str(text), flag, str(value)])


def test_a_later_models_bad_input_stops_the_run_before_any_evaluation(tmp_path, llama, monkeypatch, capsys):
    """Everything that needs only a tokenizer is checked for every model before the first is loaded:
    a run of several 7B models must not fail after hours on the input of the last one."""
    import shutil
    path, _, _ = llama
    mistral = tmp_path / "mistral"            # the same model with an [INST] chat template
    shutil.copytree(path, mistral)
    (mistral / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ '[INST] ' }}"}))
    small = tmp_path / "small"                # an embedding with fewer rows than its tokenizer has tokens
    shutil.copytree(path, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(dict(config, vocab_size=100)))
    two_users = write_jsonl(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                                 {"role": "user", "content": "b"}]}])
    text = tmp_path / "t.txt"
    text.write_text(RU, encoding="utf-8")
    loaded = []
    monkeypatch.setattr(evaluate.Transformer, "from_pretrained", staticmethod(lambda *a, **k: loaded.append(a)))
    for argv, message in (
            (["--models", path, mistral, "--prompts", two_users],
             re.escape(f"p.jsonl: prompt 1 (model {mistral}): ") + ".*alternate"),
            (["--models", path, small, "--text", text],
             re.escape(f"model {small}: the tokenizer has ") + r"\d+ tokens but the embedding only 100 rows"),
            (["--models", path, path, "--text", text], re.escape(f"model {path} is given twice")),
            (["--models", path, "--text", text, text], re.escape(f"file {text} is given twice")),
            (["--models", path, "--text", text, "--out", tmp_path / "no_dir" / "r.json"],
             "no_dir/r.json: its directory does not exist")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(list(map(str, argv)))
        assert e.value.code == 2
        assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])
    assert not loaded


def test_two_texts_with_one_name_keep_both(tmp_path, llama, monkeypatch):
    """sub/t.txt and t.txt share a name: each is keyed by its path, neither result replaces the other."""
    path, _, _ = llama
    monkeypatch.chdir(tmp_path)
    os.mkdir("sub")
    ru, en = os.path.join("sub", "t.txt"), "t.txt"
    for name, text in ((ru, RU), (en, EN)):
        with open(name, "w", encoding="utf-8") as f:
            f.write(text)
    texts = run(evaluate_args([path], "--text", ru, en))["models"]["llama"]["texts"]
    assert sorted(texts) == sorted([ru, en])
    assert texts[ru]["chars"] == len(RU) and texts[en]["chars"] == len(EN)


# ------------------------------------------------------------------------------------------------
# torchrun: the same report, the work shared by two ranks
# ------------------------------------------------------------------------------------------------
def strip_timings(report):
    report["args"].pop("world_size")
    report["args"].pop("out")
    for m in report["models"].values():
        for key in ("seconds", "tokens_per_s", "chars_per_s"):
            m["generation"].pop(key)
    return report


def assert_close(a, b, path="report"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert rel(a, b) < 1e-6, path
    else:
        assert a == b, path


def test_torchrun_gives_the_same_report_as_plain_python(tmp_path, llama):
    path, _, _ = llama
    (tmp_path / "t.txt").write_text(RU + EN, encoding="utf-8")
    bench = write_jsonl(tmp_path / "b.jsonl", QUESTIONS)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": RU[:20]}, {"prompt": EN[:30]}, {"prompt": "Гуров"}])
    common = ["--models", path, "--text", str(tmp_path / "t.txt"), "--mc", bench, "--prompts", prompts,
              "--max-len", "64", "--stride", "24", "--max-new-tokens", "8", "--batch-size", "2"]
    run_script("evaluate.py", *common, "--out", tmp_path / "ddp.json", ranks=2)
    plain = run(parse_args(common + ["--out", str(tmp_path / "plain.json")]))
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    assert ddp["args"]["world_size"] == 2
    assert_close(strip_timings(ddp), strip_timings(json.loads(json.dumps(plain))))
