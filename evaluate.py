"""Evaluate several models side by side: the numbers the language-adaptation papers report.

    python evaluate.py --models base/ adapted/ --text ru.txt en.txt --mc ru_mmlu.jsonl \\
        --prompts ru_seed_tasks.messages.jsonl --out report.json
    torchrun --nproc_per_node 8 evaluate.py ...      # the same report, the work sharded across ranks

One Markdown table on stdout (one column per model) and a JSON report with every number and every
completion. What is measured, and why each number is the one the papers use:

  * tokenizer efficiency per text: characters per token and tokens per (whitespace-separated) word --
    the gain a new tokenizer brings (Vikhr, ruadapt: ~1.6x fewer tokens for Russian);
  * bits per byte per text: the total negative log-likelihood of the text in bits over its UTF-8 bytes.
    Unlike perplexity it does not depend on how the text was cut into tokens, so a base model and its
    adapted copy with a new vocabulary compare (nanochat reports it for the same reason). Long texts
    are scored with a sliding window: each token is scored exactly once, with at least
    max_len - stride tokens of context. Per-token perplexity is shown alongside, but it is not
    comparable across vocabularies;
  * multiple-choice accuracy on {question, choices, answer} .jsonl, two ways:
      - log-likelihood: log p(" " + choice | question + "\\nAnswer:"), the argmax of the raw sum and
        of the sum divided by the choice's UTF-8 bytes (a length normalisation that is the same
        whatever the tokenizer, unlike dividing by tokens);
      - lettered (MMLU style): the choices listed as "A. ...", "B. ...", then "Answer:"; the pick is
        the letter with the highest log p(" A" | prompt);
  * generation: completions for plain or chat prompts, speed in tokens/s and in characters/s (the
    number that shows a tokenizer's gain: fewer tokens per character means more text per second),
    and language purity -- the share of words of the answer written in the target script (Vikhr
    Table 7 counts English words dropped into Russian answers).

Continuations are tokenized as continuations (tokenizer.encode_continuation): " A" after "Answer:"
is the token "▁A", the one the model sees in running text. Encoding " A" on its own would give
["▁", "▁A"] with SentencePiece's dummy prefix, and "A" alone is a different token in byte-level BPE.

Every sequence starts with the tokenizer's BOS token (or EOS when it has none, as Qwen's does: the
document separator it was trained with), so the first token of a text is scored too.

References: Vikhr (Nikolich et al. 2024), ruadapt (Tikhomirov & Chernyshev 2023/2024), MMLU
(Hendrycks et al. 2021); the sliding-window perplexity and the answer-cue prompts follow
transformers' perplexity guide and lm-evaluation-harness.
"""
import argparse
import json
import math
import os
import re
import sys
import time
import unicodedata

import torch
from tqdm import tqdm

from model import (CHAT_TEMPLATES, Config, Transformer, at_least, chat_prompt, close_distributed, generate,
                   init_distributed, is_rank0, load_tokenizer, print0, write_json_atomic)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class InputError(ValueError):
    """Bad input (a file, a line, a flag): main() prints the message alone, without a traceback."""


# ------------------------------------------------------------------------------------------------
# 1. inputs: texts, benchmarks, prompts -- read and checked before any model is loaded
# ------------------------------------------------------------------------------------------------
def read_utf8(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None


def jsonl_records(path):
    """(line number, dict) per non-empty line: model.jsonl_records, its errors as InputError."""
    from model import jsonl_records as records
    try:
        yield from records(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except ValueError as e:
        raise InputError(str(e)) from None


def read_text(path, max_chars):
    """A .txt file as it is, or a .jsonl file's `text` fields joined by blank lines; the first max_chars."""
    if path.endswith(".jsonl"):
        docs = []
        for n, record in jsonl_records(path):
            if not isinstance(record.get("text"), str):
                raise InputError(f"{path}:{n}: expected a string field 'text'")
            docs.append(record["text"])
        text = "\n\n".join(docs)
    else:
        text = read_utf8(path)
    text = text[:max_chars] if max_chars > 0 else text
    if not text.strip():
        raise InputError(f"{path}: no text to score")
    return text


def read_benchmark(path, limit=0):
    """[{question, choices, answer}] from a .jsonl file, each line checked; `limit` of them (0 = all) spread
    evenly over the file, not the first ones: benchmark files are often grouped by subject (MMLU's first
    100 questions are all abstract algebra)."""
    questions = []
    for n, record in jsonl_records(path):
        where = f"{path}:{n}"
        q, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise InputError(f"{where}: expected a non-empty string field 'question'")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise InputError(f"{where}: expected 'choices' to be a list of at least 2 non-empty strings")
        if len(choices) > len(LETTERS):
            raise InputError(f"{where}: {len(choices)} choices; the lettered format has letters for {len(LETTERS)}")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise InputError(f"{where}: expected an integer field 'answer' (index into 'choices')")
        if not 0 <= answer < len(choices):
            raise InputError(f"{where}: answer {answer} is out of range for {len(choices)} choices "
                             f"(expected 0..{len(choices) - 1})")
        questions.append(dict(question=q, choices=choices, answer=answer))
    if not questions:
        raise InputError(f"{path}: no questions")
    if limit and limit < len(questions):
        questions = [questions[i * len(questions) // limit] for i in range(limit)]
    return questions


def read_prompts(path, limit=0):
    """Prompts from a .txt file (one plain prompt per non-empty line) or a .jsonl file with, per line,
    {"prompt": str} (plain), {"messages": [...]} (chat; a trailing assistant turn is the reference
    answer, kept aside), or Alpaca {"instruction", "input"?, "output"?} (chat).
    Returns [{"text": str} or {"messages": [...], "reference": str|None}]."""
    prompts = []
    if not path.endswith(".jsonl"):
        prompts = [{"text": line} for line in read_utf8(path).splitlines() if line.strip()]
    else:
        for n, record in jsonl_records(path):
            where = f"{path}:{n}"
            if isinstance(record.get("prompt"), str):
                prompts.append({"text": record["prompt"]})
            elif isinstance(record.get("messages"), list):
                messages = record["messages"]
                for m in messages:
                    if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                            and isinstance(m.get("content"), str)):
                        raise InputError(f"{where}: each message needs 'role' (system, user or assistant) "
                                         f"and a string 'content'")
                reference = None
                if messages and messages[-1]["role"] == "assistant":
                    reference, messages = messages[-1]["content"], messages[:-1]
                if not messages or messages[-1]["role"] != "user":
                    raise InputError(f"{where}: the conversation must end with a user turn (after any final "
                                     f"assistant answer)")
                prompts.append({"messages": messages, "reference": reference})
            elif isinstance(record.get("instruction"), str):
                user = record["instruction"]
                if record.get("input"):
                    user += "\n\n" + str(record["input"])
                prompts.append({"messages": [{"role": "user", "content": user}], "reference": record.get("output")})
            else:
                raise InputError(f"{where}: expected a 'prompt' string, a 'messages' list or an 'instruction'")
    prompts = prompts[:limit] if limit else prompts
    if not prompts:
        raise InputError(f"{path}: no prompts")
    return prompts


def load_model(path, device, dtype):
    """The model in eval mode; a directory without (readable) weights is an InputError naming it."""
    try:
        return Transformer.from_pretrained(path, device=device, dtype=dtype).eval()
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"model {path}: {e}") from None


def start_token(tok, where):
    """The token every scored sequence starts with: BOS, or EOS (the document separator) without one."""
    start = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if start is None:
        raise InputError(f"{where}: the tokenizer has neither a BOS nor an EOS token to start a sequence with")
    return start


# ------------------------------------------------------------------------------------------------
# 2. scoring: sum of log-probabilities of the tail of each sequence, batched
# ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def sum_log_probs(model, requests, batch_size, desc="scoring", chunk=1024):
    """requests: [(ids, first)] -> [(sum over t >= first of log p(ids[t] | ids[:t]) in nats, count)].

    Sequences are sorted by length and right-padded: with causal attention a real token never sees
    the padding after it, so no mask is needed and the padded positions are simply not scored.
    Only the scored positions go through the LM head, a chunk at a time: the full (B, T, V) logits
    of a 150k vocabulary in fp32 would take gigabytes for nothing.
    """
    device = model.model.embed_tokens.weight.device
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    results = [None] * len(requests)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=not is_rank0() or not batches, file=sys.stderr, leave=False):
        T = len(requests[batch[0]][0])
        ids = torch.zeros(len(batch), T, dtype=torch.long)           # (B, T), pad id 0 is never scored
        scored = torch.zeros(len(batch), T, dtype=torch.bool)        # position t predicts ids[t + 1]
        for row, i in enumerate(batch):
            seq, first = requests[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            scored[row, first - 1:len(seq) - 1] = True
        ids, scored = ids.to(device), scored.to(device)
        hidden = model(ids, return_hidden=True)                      # (B, T, d)
        next_ids = torch.roll(ids, -1, dims=1)                       # (B, T): the token each position predicts
        h, targets = hidden[scored], next_ids[scored]                # (N, d), (N,)
        log_p = torch.empty(len(targets), dtype=torch.float64, device=device)
        for s in range(0, len(targets), chunk):
            logits = model.lm_head(h[s:s + chunk]).float()           # (chunk, V)
            log_p[s:s + chunk] = logits.log_softmax(-1).gather(-1, targets[s:s + chunk, None]).squeeze(-1).double()
        rows = scored.nonzero()[:, 0]                                # (N,) batch row of each scored position
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device).index_add_(0, rows, log_p)
        for i, total, count in zip(batch, sums.tolist(), scored.sum(1).tolist()):
            results[i] = (total, count)
    return results


# ------------------------------------------------------------------------------------------------
# 3. texts: tokenizer efficiency, bits per byte (sliding window), per-token perplexity
# ------------------------------------------------------------------------------------------------
def sliding_windows(ids, max_len, stride):
    """Cut one long sequence (start token first) into scoring requests [(ids[begin:end], first)].

    The first window scores tokens 1..max_len-1; each next one moves its end `stride` tokens on and
    scores only the tokens the previous windows did not, so every token is scored exactly once and
    sees at least max_len - stride tokens before it (all of them near the start)."""
    requests, scored_to = [], 1
    while scored_to < len(ids):
        end = min(len(ids), max_len if not requests else scored_to + stride)
        begin = max(0, end - max_len)
        requests.append((ids[begin:end], scored_to - begin))
        scored_to = end
    return requests


def text_requests(text, tok, start, max_len, stride):
    """Token counts of a text and its sliding-window scoring requests."""
    ids = tok.encode(text)
    stats = dict(chars=len(text), bytes=len(text.encode("utf-8")), words=len(text.split()), tokens=len(ids))
    return stats, sliding_windows([start] + ids, max_len, stride)


def text_metrics(stats, nll_nats):
    bits = nll_nats / math.log(2)
    return dict(stats, chars_per_token=stats["chars"] / stats["tokens"],
                tokens_per_word=stats["tokens"] / max(1, stats["words"]),
                nll_bits=bits, bits_per_byte=bits / stats["bytes"],
                ppl_per_token=math.exp(nll_nats / stats["tokens"]))


# ------------------------------------------------------------------------------------------------
# 4. multiple choice: log-likelihood of each choice, and the lettered A/B/C/D format
# ------------------------------------------------------------------------------------------------
def loglik_prompt(question, answer_cue):
    return f"{question}\n{answer_cue}"


def lettered_prompt(question, choices, answer_cue):
    lines = [question] + [f"{LETTERS[k]}. {c}" for k, c in enumerate(choices)] + [answer_cue]
    return "\n".join(lines)


def choice_request(context, continuation, tok, start, max_len, where):
    """(ids, first): the start token, the context, then the continuation, whose log-prob is summed.
    A context too long for max_len loses its beginning (the question's end and the choice are kept)."""
    ctx, cont = tok.encode(context), tok.encode_continuation(continuation)
    ids = [start] + ctx + cont
    first = 1 + len(ctx)
    if len(ids) > max_len:
        cut = len(ids) - max_len
        if cut >= first:
            raise InputError(f"{where}: the choice {continuation!r} alone is longer than --max-len {max_len} tokens; raise --max-len")
        ids, first = ids[cut:], first - cut
    return ids, first


def mc_requests(questions, tok, start, max_len, answer_cue, where):
    """Two groups of requests per question: each choice after the question, each letter after the list.
    The letters share one prompt, so one forward would do for them; scoring them as sequences of their
    own costs a few more forwards but keeps one scoring path, and stays right when a letter is more
    than one token (a tokenizer without "▁A")."""
    requests = []
    for k, q in enumerate(questions):
        ctx = loglik_prompt(q["question"], answer_cue)
        requests += [choice_request(ctx, " " + c, tok, start, max_len, f"{where} question {k + 1}") for c in q["choices"]]
        ctx = lettered_prompt(q["question"], q["choices"], answer_cue)
        requests += [choice_request(ctx, " " + LETTERS[j], tok, start, max_len, f"{where} question {k + 1}")
                     for j in range(len(q["choices"]))]
    return requests


def argmax(xs):
    return max(range(len(xs)), key=lambda i: xs[i])


def mc_metrics(questions, scores, tok):
    """scores: the (log-prob, count) of every request, in mc_requests' order -> accuracies and details."""
    details, pos = [], 0
    for q in questions:
        n = len(q["choices"])
        loglik = [s for s, _ in scores[pos:pos + n]]
        letters = [s for s, _ in scores[pos + n:pos + 2 * n]]
        pos += 2 * n
        per_byte = [ll / len((" " + c).encode("utf-8")) for ll, c in zip(loglik, q["choices"])]
        details.append(dict(answer=q["answer"], loglik=loglik, loglik_per_byte=per_byte, letter_loglik=letters,
                            pred_loglik=argmax(loglik), pred_loglik_per_byte=argmax(per_byte),
                            pred_lettered=argmax(letters)))
    acc = {key: sum(d[f"pred_{key}"] == d["answer"] for d in details) / len(details)
           for key in ("loglik", "loglik_per_byte", "lettered")}
    letter_pieces = [[tok.id_to_piece(i) for i in tok.encode_continuation(" " + L)] for L in LETTERS[:4]]
    return dict(n=len(details), accuracy=acc, letter_tokens=letter_pieces, questions=details)


# ------------------------------------------------------------------------------------------------
# 5. generation: chat rendering, speed, language purity
# ------------------------------------------------------------------------------------------------
def detect_chat_template(model_dir):
    """The model's own chat template (tokenizer_config.json or chat_template.jinja) as one of the
    templates model.py renders: 'chatml' or 'mistral' when it is one of ours (sft.py writes them) or
    recognisably the same format (Qwen's ChatML, Mistral's [INST]); 'plain' for a base model without
    one. Jinja is recognised, never executed (it is code from the model directory)."""
    template = ""
    config = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            template = json.load(f).get("chat_template") or ""
        if isinstance(template, list):                 # a list of named templates: look at them all
            template = " ".join(t.get("template", "") for t in template)
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            template += f.read()
    for name, ours in CHAT_TEMPLATES.items():
        if template == ours:
            return name
    if "<|im_start|>" in template:
        return "chatml"
    if "[INST]" in template:
        return "mistral"
    return "plain"


def encode_prompt(prompt, template, tok, where):
    """Token ids of a prompt: a plain one is the start of a text (BOS first); a conversation is
    rendered by model.py's chat template, or, with 'plain', its turns joined by blank lines for a
    base model to continue."""
    if "text" in prompt:
        return tok.encode(prompt["text"], add_bos=True)
    if template == "plain":
        return tok.encode("\n\n".join(m["content"] for m in prompt["messages"]) + "\n\n", add_bos=True)
    try:
        return chat_prompt(prompt["messages"], template, tok)
    except ValueError as e:                            # e.g. roles that do not alternate in [INST]
        raise InputError(f"{where}: {e}") from None


def stop_ids(tok, model, template):
    """Ids that end an answer: the tokenizer's EOS, the config's eos_token_id(s), ChatML's <|im_end|>."""
    ids = {tok.eos_id} if tok.eos_id is not None else set()
    eos = model.config.eos_token_id
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if template == "chatml" and "<|im_end|>" in tok.special_tokens:
        ids.add(tok.special_tokens["<|im_end|>"])
    return sorted(ids)


WORD = re.compile(r"[^\W\d_]+")       # a run of letters: \w without digits and underscore


def language_purity(text, script="CYRILLIC"):
    """Share of the words of text written in `script` (a Unicode script name: CYRILLIC, LATIN, GREEK...),
    or None when the text has no words. A word is a run of letters; it counts as in the script when
    all its letters are (so Kazakh "қазақ" is Cyrillic, "iPhone" is not). NFC first, so a letter
    and its combining accent stay one letter."""
    script = script.upper()
    words = WORD.findall(unicodedata.normalize("NFC", text))
    if not words:
        return None
    in_script = sum(all(unicodedata.name(ch, "").startswith(script + " ") for ch in w) for w in words)
    return in_script / len(words)


@torch.inference_mode()
def generate_all(model, tok, encoded, template, args):
    """Completions of encoded prompts {index: ids} (this rank's share), in batches of similar length.
    Returns [(index, completion, new tokens)] and the seconds spent generating."""
    device = model.model.embed_tokens.weight.device
    stops = stop_ids(tok, model, template)
    specials = set(tok.special_tokens.values())
    generator = torch.Generator(device=device).manual_seed(args.seed)
    order = sorted(encoded, key=lambda i: len(encoded[i]))
    batches = [order[s:s + args.batch_size] for s in range(0, len(order), args.batch_size)]
    if order:   # warm up (kernels, allocator, thread pools) so the first batch's speed is not an outlier;
        # with the first real batch: its padding takes other kernel variants (packed rows) than one prompt
        generate(model, [encoded[i] for i in batches[0]], 2, vocab_limit=tok.vocab_size)
    results, seconds = [], 0.0
    for batch in tqdm(batches, desc="generating", disable=not is_rank0() or not batches, file=sys.stderr, leave=False):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        outs = generate(model, [encoded[i] for i in batch], args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, eos_id=stops,
                        vocab_limit=tok.vocab_size, generator=generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        for i, out in zip(batch, outs):
            # the answer's text: no stop token, no other special token (their names are not words)
            text = tok.decode([t for t in out if t not in stops and t not in specials])
            results.append((i, text, len(out)))
    return results, seconds


# ------------------------------------------------------------------------------------------------
# 6. distributed: each rank takes every world-th item; rank 0 gathers and writes the report
# ------------------------------------------------------------------------------------------------
def world():
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather_to_rank0(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere (plain python: [obj])."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def score_sharded(model, requests, batch_size, desc):
    """sum_log_probs over all ranks: rank r scores requests r, r+W, ...; rank 0 gets them all in order."""
    rank, size = world()
    mine = list(range(rank, len(requests), size))
    scores = sum_log_probs(model, [requests[i] for i in mine], batch_size, desc)
    gathered = gather_to_rank0(list(zip(mine, scores)))
    if gathered is None:
        return None
    merged = [None] * len(requests)
    for part in gathered:
        for i, s in part:
            merged[i] = s
    return merged


# ------------------------------------------------------------------------------------------------
# 7. one model, then the table
# ------------------------------------------------------------------------------------------------
def tokenized_inputs(path, benchmarks, prompts, args):
    """What needs only a model's tokenizer and config.json: its start token, the benchmarks' scoring
    requests and the encoded prompts. run() calls it for every model before loading the first, so a
    tokenizer, choice or prompt that does not fit a later model stops the run in seconds, not after
    the models before it were evaluated. (Texts are tokenized later: they may be long.)"""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise InputError(f"model {path}: no config.json (expected a Hugging Face model directory)")
    try:
        vocab_rows = Config.from_file(config).vocab_size
    except ValueError as e:
        raise InputError(f"model {path}: {e}") from None
    try:
        tok = load_tokenizer(path)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise InputError(f"model {path}: cannot load its tokenizer: {e}") from None
    if tok.vocab_size > vocab_rows:
        raise InputError(f"model {path}: the tokenizer has {tok.vocab_size} tokens but the embedding only "
                         f"{vocab_rows} rows")
    start = start_token(tok, f"model {path}")
    mc = {name: mc_requests(questions, tok, start, args.max_len, args.answer_cue, f"{name} (model {path})")
          for name, questions in benchmarks.items()}
    template = detect_chat_template(path) if args.chat_template == "auto" else args.chat_template
    # a prompt too long for max_len keeps its end: the question and the assistant's cue
    encoded = [encode_prompt(p, template, tok, f"{args.prompts}: prompt {i + 1} (model {path})")
               [-(args.max_len - args.max_new_tokens):] for i, p in enumerate(prompts)]
    return dict(tok=tok, start=start, mc=mc, template=template, encoded=encoded)


def evaluate_model(path, inputs, texts, benchmarks, prompts, args, device, dtype):
    """Every measurement for one model (inputs: its tokenized_inputs); the report on rank 0, None elsewhere."""
    tok, start = inputs["tok"], inputs["start"]
    model = load_model(path, device, dtype)
    report = dict(path=path, vocab_size=tok.vocab_size, embedding_rows=model.config.vocab_size,
                  params=model.num_params(), dtype=str(model.model.embed_tokens.weight.dtype).removeprefix("torch."))

    # texts and benchmarks become one list of scoring requests, so the batches stay full
    requests, text_parts, mc_parts = [], {}, {}
    for name, text in texts.items():
        stats, reqs = text_requests(text, tok, start, args.max_len, args.stride)
        text_parts[name] = (stats, len(requests), len(reqs))
        requests += reqs
    for name, reqs in inputs["mc"].items():
        mc_parts[name] = (len(requests), len(reqs))
        requests += reqs
    scores = score_sharded(model, requests, args.batch_size, f"scoring {os.path.basename(path)}")
    if scores is not None:
        report["texts"] = {name: text_metrics(stats, -sum(s for s, _ in scores[a:a + n]))
                           for name, (stats, a, n) in text_parts.items()}
        report["mc"] = {name: mc_metrics(benchmarks[name], scores[a:a + n], tok) for name, (a, n) in mc_parts.items()}

    if prompts:
        template, rank, size = inputs["template"], *world()
        mine = {i: ids for i, ids in enumerate(inputs["encoded"]) if i % size == rank}
        gathered = gather_to_rank0(generate_all(model, tok, mine, template, args))
        if gathered is not None:
            completions = sorted(r for part, _ in gathered for r in part)
            seconds = max(s for _, s in gathered)    # ranks run side by side: the wall time is the slowest
            new_tokens = sum(n for _, _, n in completions)
            chars = sum(len(text) for _, text, _ in completions)
            purities = [language_purity(text, args.script) for _, text, _ in completions]
            scored = [p for p in purities if p is not None]
            report["generation"] = dict(
                chat_template=template, n=len(completions), new_tokens=new_tokens, chars=chars, seconds=seconds,
                tokens_per_s=new_tokens / seconds if seconds else None, chars_per_s=chars / seconds if seconds else None,
                script=args.script, purity=sum(scored) / len(scored) if scored else None,
                completions=[dict(prompt=prompts[i], completion=text, new_tokens=n, purity=p)
                             for (i, text, n), p in zip(completions, purities)])
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report if is_rank0() else None


def short_names(paths, suffix="", what="file"):
    """A name per input (a table column, a report key): the file or directory name without `suffix`,
    or the path as given where two names collide. The same path given twice is an error: its results
    would silently take one entry."""
    for p in paths:
        if paths.count(p) > 1:
            raise InputError(f"{what} {p} is given twice")
    names = [os.path.basename(os.path.normpath(p)).removesuffix(suffix) for p in paths]
    return [n if names.count(n) == 1 else p for n, p in zip(names, paths)]


def markdown_table(reports, names, script):
    """Rows are measurements, columns models. Missing numbers (a section not run) show as '-'."""
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    rows = [("vocabulary (tokenizer / embedding rows)", [f"{r['vocab_size']} / {r['embedding_rows']}" for r in reports]),
            ("parameters (M)", [f"{r['params'] / 1e6:.1f}" for r in reports])]
    first = reports[0]
    for name in first.get("texts", {}):
        cells = [r["texts"][name] for r in reports]
        rows += [(f"{name}: chars/token ↑", [fmt(c["chars_per_token"], ".2f") for c in cells]),
                 (f"{name}: tokens/word ↓", [fmt(c["tokens_per_word"], ".2f") for c in cells]),
                 (f"{name}: bits/byte ↓", [fmt(c["bits_per_byte"], ".4f") for c in cells]),
                 (f"{name}: ppl/token* ↓", [fmt(c["ppl_per_token"], ".2f") for c in cells])]
    for name in first.get("mc", {}):
        cells = [r["mc"][name] for r in reports]
        n = cells[0]["n"]
        rows += [(f"{name} (n={n}): acc log-likelihood ↑", [fmt(c["accuracy"]["loglik"], ".3f") for c in cells]),
                 (f"{name} (n={n}): acc log-likelihood/byte ↑", [fmt(c["accuracy"]["loglik_per_byte"], ".3f") for c in cells]),
                 (f"{name} (n={n}): acc lettered A/B/C/D ↑", [fmt(c["accuracy"]["lettered"], ".3f") for c in cells])]
    if "generation" in first:
        cells = [r["generation"] for r in reports]
        rows += [(f"generation (n={cells[0]['n']}): chat template", [c["chat_template"] for c in cells]),
                 ("generation: tokens/s ↑", [fmt(c["tokens_per_s"], ".1f") for c in cells]),
                 ("generation: chars/s ↑", [fmt(c["chars_per_s"], ".1f") for c in cells]),
                 (f"generation: {script.lower()} purity ↑", [fmt(c["purity"], ".3f") for c in cells])]
    lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    if first.get("texts"):
        lines.append("\n\\* ppl/token counts each model's own tokens: not comparable across vocabularies "
                     "(bits/byte is).")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# 8. command line
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # what to evaluate
    p.add_argument("--models", nargs="+", required=True, help="HF model directories, one table column each")
    p.add_argument("--text", nargs="*", default=[], help=".txt or .jsonl (field 'text') files for efficiency and bits/byte")
    p.add_argument("--mc", nargs="*", default=[], help="multiple-choice .jsonl files {question, choices, answer}")
    p.add_argument("--prompts", default=None, help=".txt (a prompt per line) or .jsonl (prompt / messages / "
                                                   "instruction) prompts to generate from")
    # how much of it
    p.add_argument("--max-chars", type=at_least(0), default=100_000,
                   help="score only the first N characters of each text (0 = all)")
    p.add_argument("--max-questions", type=at_least(0), default=0,
                   help="N questions of each benchmark, spread evenly over the file (0 = all)")
    p.add_argument("--max-prompts", type=at_least(0), default=0, help="first N prompts (0 = all)")
    # scoring
    p.add_argument("--max-len", type=at_least(1), default=1024, help="tokens per scored window (and longest prompt + answer)")
    p.add_argument("--stride", type=at_least(1), default=512, help="sliding window step in tokens: each token sees "
                                                           "at least max-len - stride tokens of context")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="sequences per forward pass (scoring and generation)")
    p.add_argument("--answer-cue", default="Answer:", help="line after a question, before the choice or letter "
                                                          "(e.g. 'Ответ:')")
    # generation
    p.add_argument("--max-new-tokens", type=at_least(1), default=128, help="tokens generated per prompt at most")
    p.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=at_least(1), default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with this much probability")
    p.add_argument("--chat-template", default="auto", choices=("auto", *CHAT_TEMPLATES, "plain"),
                   help="how chat prompts are rendered (model.py's templates); auto: the model's own template "
                        "when it is ChatML or [INST], else plain (turns joined by blank lines, for base models)")
    p.add_argument("--script", default="Cyrillic", help="target script of language purity: a Unicode script "
                                                        "name (Cyrillic, Latin, Greek, Arabic...)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    # hardware and output
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="weights dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if not 1 <= args.stride < args.max_len:
        p.error(f"--stride must be in 1..max-len-1 ({args.max_len - 1}), got {args.stride}")
    if args.prompts and args.max_new_tokens >= args.max_len:
        p.error("--max-new-tokens must be smaller than --max-len")
    if not (args.text or args.mc or args.prompts):
        p.error("nothing to evaluate: give --text, --mc and/or --prompts")
    if not any(unicodedata.name(chr(c), "").startswith(args.script.upper() + " ") for c in range(0x10000)):
        p.error(f"--script {args.script!r}: no Unicode character name starts with it (try Cyrillic, Latin, Greek)")
    return args


def run(args):
    """Read the inputs, evaluate every model, print the table; returns the report (rank 0) or None."""
    rank, local_rank, world_size, device = init_distributed()
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    print0(json.dumps(dict(vars(args), world_size=world_size, device=str(device), dtype=dtype)), file=sys.stderr)
    # every input is read and checked, on every rank, before the first (maybe long) evaluation:
    # a bad one stops all ranks alike (none is left waiting in a collective)
    if args.out and not os.access(os.path.dirname(os.path.abspath(args.out)), os.W_OK):
        raise InputError(f"--out {args.out}: its directory does not exist or is not writable")
    texts = {name: read_text(path, args.max_chars) for name, path in zip(short_names(args.text), args.text)}
    benchmarks = {name: read_benchmark(path, args.max_questions)
                  for name, path in zip(short_names(args.mc, ".jsonl"), args.mc)}
    prompts = read_prompts(args.prompts, args.max_prompts) if args.prompts else []
    names = short_names(args.models, what="model")
    inputs = [tokenized_inputs(path, benchmarks, prompts, args) for path in args.models]

    reports = [evaluate_model(path, model_inputs, texts, benchmarks, prompts, args, device, dtype)
               for path, model_inputs in zip(args.models, inputs)]
    if not is_rank0():
        return None
    report = dict(args=dict(vars(args), world_size=world_size, dtype=dtype), models=dict(zip(names, reports)))
    print(markdown_table(reports, names, args.script), flush=True)
    if args.out:
        write_json_atomic(args.out, report)
    return report


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except InputError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
