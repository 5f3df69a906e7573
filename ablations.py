#!/usr/bin/env python3
"""The papers' ablations in miniature, with tables: what nanoadapt's stages do, measured, not assumed.

    .venv/bin/python ablations.py                       # OUT=runs/ablations DATA=../shared/data SEEDS="0 1 2"
    OUT=/tmp/abl DATA=../shared/data SEEDS="0 1" JOBS=2 .venv/bin/python ablations.py

  1. KL on/off (Vikhr Table 10): a tiny English base (English tokenizer, trained from scratch), a Russian
     tokenizer, resize_vocab.py --mode extend, then continued pretraining on Russian only with
     --kl-weight 0 / 0.1 / 1 to the untouched base: Russian and English held-out bits/byte, MC accuracy.
  2. Vocabulary size (Vikhr Table 8, in bits/byte so sizes compare): Russian tokenizers of 2k/4k/8k
     pieces, each extended into the base and pretrained with the same budget (steps x rows x seq-len),
     plus the base's own English tokenizer (no surgery) as the control.
  3. KD vs SFT (seed 003 Tables 2-5): a larger teacher and a smaller student sharing one tokenizer, on
     Russian chat data; distill.py train with λ = 0 (plain SFT, the same code path) and top-10 / top-100
     stores with λ ∈ {0.1, 0.2, 0.5, 1}: held-out CE and KL(teacher‖student) on a held-out store, and
     the store's bytes per token for each k.
  4. Several seeds per cell (SEEDS): mean ± sample standard deviation, and the number of seeds.

Every stage is the repository's own script, run as a subprocess; this file imports only the standard
library. Finished steps are skipped on a rerun (a marker in $OUT/done/ holds what each ran with), so an
interrupted run resumes; a step whose command line changed runs again, and other data, sizes or
ABLATIONS_SMOKE redo every step.
Sizes are set for a 2-core CPU shared with other work (about 20-30 minutes); the printed tables also go to $OUT/tables.md.
"""
import argparse
import concurrent.futures as cf
import json
import math
import os
import shutil
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.abspath(__file__))

# -- sizes: chosen so the whole script fits in ~30 minutes on 2 shared CPU cores -----------------------
BASE_VOCAB = 2000
RU_VOCABS = [2000, 4000, 8000]
MAIN_VOCAB = 4000                      # the tokenizer of the KL and KD ablations
HIDDEN, LAYERS = 128, 4                # base / student
TEACHER_HIDDEN, TEACHER_LAYERS = 192, 4
SEQ, BATCH = 256, 4                    # pretraining rows: 1,024 tokens per optimiser step
BASE_STEPS = 400                       # English base from scratch (~0.4M tokens)
RU_STEPS = 150                         # continued pretraining on Russian (~0.15M tokens), every cell
TEACHER_STEPS = 400                    # teacher from scratch on ru 0.8 / en 0.2
CHAT_LEN, CHAT_BATCH = 512, 2          # SFT / distillation rows
TEACHER_SFT_STEPS = 100
KD_STEPS = 50
KL_WEIGHTS = [0.0, 0.1, 1.0]
KD_LAMBDAS = [0.1, 0.2, 0.5, 1.0]
KD_KS = [10, 100]
EVAL_CHARS = 30000                     # characters of each held-out text scored by evaluate.py
MAX_QUESTIONS = 100                    # per benchmark (the Russian ones have 50)
RU_EVAL_NAME = "Turgenev_Rudin.txt"                             # held out of every training set
EN_EVAL_NAME = "pg1661_doyle_adventures_of_sherlock_holmes.txt"
# ru_mmlu is left out: the English base spells Cyrillic in bytes, so its longest choices exceed --max-len 256
BENCHES = ["ru_parus.jsonl", "ru_openbookqa.jsonl", "en_mmlu.jsonl"]
CHAT_FILES = ["ru_seed_tasks.messages.jsonl", "ru_saiga_tasks.alpaca.jsonl"]
CHAT_EVAL_EVERY = 10                   # every 10th conversation is held out (never seen by teacher or student)
if os.environ.get("ABLATIONS_SMOKE"):  # a check that the script runs end to end, in a few minutes; numbers are noise
    BASE_STEPS, RU_STEPS, TEACHER_STEPS, TEACHER_SFT_STEPS, KD_STEPS = 20, 10, 20, 5, 5
    EVAL_CHARS, MAX_QUESTIONS = 3000, 5


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "runs/ablations"), help="output directory (env OUT)")
    p.add_argument("--data", default=os.environ.get("DATA", os.path.join(ROOT, "..", "shared", "data")),
                   help="corpora: ru/, en/, chat/, bench/ as in ../shared/data (env DATA)")
    p.add_argument("--seeds", default=os.environ.get("SEEDS", "0 1 2"),
                   help="seeds of the KL and KD/SFT cells; the vocabulary cells other than the main one use the first two (env SEEDS)")
    p.add_argument("--jobs", default=os.environ.get("JOBS", "2"), help="runs side by side, one thread each (env JOBS)")
    p.add_argument("--python", default=os.environ.get("PY", os.path.join(ROOT, ".venv", "bin", "python")))
    args = p.parse_args()
    # checked before anything trains: a bad value would otherwise fail after the base model is built
    try:
        args.seeds = list(dict.fromkeys(int(s) for s in args.seeds.replace(",", " ").split()))  # once each
        args.jobs = int(args.jobs)
    except ValueError as e:
        p.error(f"--seeds (SEEDS) must be integers and --jobs (JOBS) one integer: {e}")
    if not args.seeds:
        p.error("--seeds (SEEDS) is empty: give at least one seed")
    if args.jobs < 1:
        p.error(f"--jobs (JOBS) must be at least 1, got {args.jobs}")
    for sub in ("ru", "en", "chat", "bench"):
        if not os.path.isdir(os.path.join(args.data, sub)):
            p.error(f"--data (DATA) {args.data}: no {sub}/ folder (expected the layout of ../shared/data)")
    return args


A = parse_args()
OUT = os.path.abspath(A.out)
DATA = os.path.abspath(A.data)
SEEDS = A.seeds
SMOKE = bool(os.environ.get("ABLATIONS_SMOKE"))
VOCAB_SEEDS = SEEDS[:2]
THREADS = 1                            # one thread per run: OpenMP teams stall on a CPU shared with other work
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# What every step's result depends on beyond its own command line (a step reads earlier steps' outputs):
# a rerun with other sizes or data redoes every step, not only those whose arguments changed.
SETTINGS = json.dumps(dict(data=DATA, smoke=SMOKE, sizes=[BASE_VOCAB, RU_VOCABS, MAIN_VOCAB, HIDDEN, LAYERS,
                                                        TEACHER_HIDDEN, TEACHER_LAYERS, SEQ, BATCH, BASE_STEPS,
                                                        RU_STEPS, TEACHER_STEPS, CHAT_LEN, CHAT_BATCH,
                                                        TEACHER_SFT_STEPS, KD_STEPS, EVAL_CHARS, MAX_QUESTIONS]))


def run(name, args, threads=None):
    """One script run; output to $OUT/logs/<name>.log. Skipped when $OUT/done/<name> says it ran with these
    SETTINGS and this very command line; a step that ran otherwise has its --out removed and runs again."""
    marker = os.path.join(OUT, "done", name)
    cmd = [A.python] + [str(a) for a in args]
    done = SETTINGS + "\n" + " ".join(cmd)
    if os.path.exists(marker):
        with open(marker) as f:
            if f.read() == done:
                return
        out = cmd[cmd.index("--out") + 1]
        if os.path.isdir(out):
            shutil.rmtree(out)
        elif os.path.exists(out):
            os.remove(out)
        os.remove(marker)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or THREADS), MKL_NUM_THREADS=str(threads or THREADS),
               TOKENIZERS_PARALLELISM="false")
    t = time.time()
    with open(os.path.join(OUT, "logs", name + ".log"), "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc:
        raise RuntimeError(f"{name} failed (exit {rc}); see {OUT}/logs/{name}.log")
    with open(marker + ".tmp", "w") as f:
        f.write(done)
    os.replace(marker + ".tmp", marker)
    log(f"{name}: {time.time() - t:.0f}s")


def pool(jobs):
    """[(name, args)] side by side, A.jobs at a time; the first failure stops the script (the runs under way
    finish, the queued ones never start)."""
    with cf.ThreadPoolExecutor(A.jobs) as ex:
        futures = [ex.submit(run, name, args) for name, args in jobs]
        try:
            for fut in cf.as_completed(futures):
                fut.result()
        except BaseException:
            ex.shutdown(cancel_futures=True)
            raise


def write_config(path, hidden, layers, vocab):
    cfg = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": hidden * 3, "num_hidden_layers": layers,
           "num_attention_heads": hidden // 32, "num_key_value_heads": hidden // 64, "head_dim": 32,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "sliding_window": None, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def last_metric(run_dir, key):
    """The last value of `key` in a run's metrics.jsonl (None when absent)."""
    val = None
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if key in rec:
                    val = rec[key]
    return val


def first_metric(run_dir, key):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if key in rec:
                return rec[key]


def ms(values, spec=".3f"):
    """'mean ± sd' over seeds (sd: the sample standard deviation); when some seeds have no value (missing
    or NaN) the cell says how many of them do, '(2 of 3 seeds)', rather than pass for a full cell."""
    n = len(values)
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return "-"
    cell = format(values[0], spec) if len(values) == 1 else \
        f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec.lstrip('+'))}"
    return cell if len(values) == n else f"{cell} ({len(values)} of {n} seeds)"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# 0. data: training sets without the held-out files, a chat train/held-out split
# ------------------------------------------------------------------------------------------------
for d in ("done", "logs", "data/ru_train", "data/en_train", "data/chat"):
    os.makedirs(os.path.join(OUT, d), exist_ok=True)


def link_dir(src, dst, skip):
    """dst/ holds links to src's .txt files but `skip` (training sets are folders); links from a run with
    other data are removed first."""
    for name in os.listdir(dst):
        os.remove(os.path.join(dst, name))
    files = []
    for name in sorted(os.listdir(src)):
        if name.endswith(".txt") and name != skip:
            link = os.path.join(dst, name)
            os.symlink(os.path.join(src, name), link)
            files.append(link)
    return files


RU_FILES = link_dir(os.path.join(DATA, "ru"), os.path.join(OUT, "data/ru_train"), RU_EVAL_NAME)
EN_FILES = link_dir(os.path.join(DATA, "en"), os.path.join(OUT, "data/en_train"), EN_EVAL_NAME)
RU_TRAIN, EN_TRAIN = os.path.join(OUT, "data/ru_train"), os.path.join(OUT, "data/en_train")
RU_EVAL, EN_EVAL = os.path.join(DATA, "ru", RU_EVAL_NAME), os.path.join(DATA, "en", EN_EVAL_NAME)
CHAT_TRAIN, CHAT_EVAL = [], []
for name in CHAT_FILES:
    with open(os.path.join(DATA, "chat", name)) as f:
        lines = [line for line in f if line.strip()]
    for part, keep, dst in (("train", lambda i: i % CHAT_EVAL_EVERY != 0, CHAT_TRAIN),
                            ("eval", lambda i: i % CHAT_EVAL_EVERY == 0, CHAT_EVAL)):
        path = os.path.join(OUT, "data/chat", f"{part}_{name}")
        with open(path + ".tmp", "w") as f:
            f.writelines(line for i, line in enumerate(lines) if keep(i))
        os.replace(path + ".tmp", path)
        dst.append(path)
MC = [os.path.join(DATA, "bench", b) for b in BENCHES]
CACHE = os.path.join(OUT, "token_cache")
log(f"out {OUT} | data {DATA} | seeds {SEEDS} | {A.jobs} jobs x {THREADS} threads")

PT_COMMON = ["--seq-len", SEQ, "--batch-size", BATCH, "--grad-accum", 1, "--warmup-steps", 10, "--beta1", 0.9,
             "--save-every", 0, "--eval-every", 0, "--log-every", 25, "--eval-tokens", 16384, "--cache-dir", CACHE]
CHAT_COMMON = ["--seq-len", CHAT_LEN, "--batch-size", CHAT_BATCH, "--grad-accum", 1, "--warmup-steps", 5,
               "--beta1", 0.9, "--save-every", 0, "--lr", 1e-3]


def o(*parts):
    return os.path.join(OUT, *parts)


# ------------------------------------------------------------------------------------------------
# 1. shared artifacts: the English base, the Russian tokenizers, the extended models, token caches
# ------------------------------------------------------------------------------------------------
run("en_tokenizer", ["train_tokenizer.py", "--input", *EN_FILES, "--vocab-size", BASE_VOCAB, "--out", o("en_tokenizer")])
write_config(o("base_config.json"), HIDDEN, LAYERS, BASE_VOCAB)
run("base", ["pretrain.py", "--init-config", o("base_config.json"), "--tokenizer", o("en_tokenizer"), "--data", EN_TRAIN,
             "--kl-weight", 0, "--lr", 3e-3, "--max-steps", BASE_STEPS, *PT_COMMON, "--out", o("base")])
for v in RU_VOCABS:
    run(f"ru_tokenizer_{v}", ["train_tokenizer.py", "--input", *[f + ":0.5" for f in RU_FILES], "--vocab-size", v,
                              "--eval-text", RU_EVAL, EN_EVAL, "--compare", o("base"), "--out", o(f"ru_tokenizer_{v}")])
    run(f"adapted_{v}", ["resize_vocab.py", "--model", o("base"), "--tokenizer", o(f"ru_tokenizer_{v}"),
                         "--mode", "extend", "--out", o(f"adapted_{v}")])
for m in ["base"] + [f"adapted_{v}" for v in RU_VOCABS]:      # fill the token caches once, before runs share them
    run(f"cache_{m}", ["pretrain.py", "--model", o(m), "--data", RU_TRAIN, EN_TRAIN, "--tokenize-only",
                       "--cache-dir", CACHE, "--out", o("cache_runs", m)])

# ------------------------------------------------------------------------------------------------
# 2. continued pretraining cells (KL and vocabulary), and the teacher, side by side
# ------------------------------------------------------------------------------------------------
def ru_run(model, kl, seed):
    name = f"ru_{model}_kl{kl:g}_s{seed}"
    args = ["pretrain.py", "--model", o(model), "--data", RU_TRAIN, "--kl-weight", kl, "--lr", 1e-3,
            "--max-steps", RU_STEPS, "--seed", seed, *PT_COMMON, "--out", o("cells", name)]
    if kl:
        args += ["--kl-ref", o("base")]
    return name, args


MAIN = f"adapted_{MAIN_VOCAB}"
TEACHER_VOCAB = read_json(o(MAIN, "config.json"))["vocab_size"]
write_config(o("teacher_config.json"), TEACHER_HIDDEN, TEACHER_LAYERS, TEACHER_VOCAB)
jobs = [("teacher_base", ["pretrain.py", "--init-config", o("teacher_config.json"), "--tokenizer", o(MAIN),
                          "--data", RU_TRAIN + ":0.8", EN_TRAIN + ":0.2", "--kl-weight", 0, "--lr", 3e-3,
                          "--max-steps", TEACHER_STEPS, *PT_COMMON, "--out", o("teacher_base")])]
jobs += [ru_run(MAIN, kl, s) for s in SEEDS for kl in KL_WEIGHTS]
jobs += [ru_run(m, 0.0, s) for s in VOCAB_SEEDS for m in ["base"] + [f"adapted_{v}" for v in RU_VOCABS if v != MAIN_VOCAB]]
pool(jobs)

# ------------------------------------------------------------------------------------------------
# 3. evaluate every pretrained model; the teacher's SFT and its top-k stores
# ------------------------------------------------------------------------------------------------
EVAL_MODELS = {"base": o("base"), MAIN: o(MAIN), "teacher_base": o("teacher_base")}
EVAL_MODELS.update({name: o("cells", name) for name, _ in jobs if name.startswith("ru_")})
EVAL_ARGS = ["--text", RU_EVAL, EN_EVAL, "--mc", *MC, "--max-chars", EVAL_CHARS, "--max-questions", MAX_QUESTIONS,
             "--max-len", 256, "--stride", 128, "--batch-size", 16]
jobs = [("teacher_sft", ["sft.py", "--model", o("teacher_base"), "--data", *CHAT_TRAIN, "--val-data", *CHAT_EVAL,
                         "--chat-template", "chatml", "--overlong", "truncate", *CHAT_COMMON,
                         "--max-steps", TEACHER_SFT_STEPS, "--eval-every", 0, "--log-every", 10, "--samples", 0,
                         "--out", o("teacher")])]
jobs += [(f"eval_{n}", ["evaluate.py", "--models", p, *EVAL_ARGS, "--out", o("eval", n + ".json")])
         for n, p in EVAL_MODELS.items()]
os.makedirs(o("eval"), exist_ok=True)
pool(jobs)

STUDENT = o("cells", f"ru_{MAIN}_kl1_s{SEEDS[0]}")          # the KL-pretrained student, as in the pipeline
DUMP = ["distill.py", "dump", "--teacher", o("teacher"), "--chat-template", "chatml", "--max-len", CHAT_LEN,
        "--overlong", "truncate", "--pack-len", 2048, "--batch-size", 2]
pool([(f"store_top{k}", DUMP + ["--data", *CHAT_TRAIN, "--top-k", k, "--out", o(f"store_top{k}")]) for k in KD_KS]
     + [("store_eval", DUMP + ["--data", *CHAT_EVAL, "--top-k", max(KD_KS), "--out", o("store_eval")])])

# ------------------------------------------------------------------------------------------------
# 4. KD vs SFT cells
# ------------------------------------------------------------------------------------------------
def kd_run(k, lam, seed):
    name = f"kd_top{k}_lam{lam:g}_s{seed}" if lam else f"sft_s{seed}"
    return name, ["distill.py", "train", "--student", STUDENT, "--store", o(f"store_top{k}"),
                  "--eval-store", o("store_eval"), "--kd-weight", lam, *CHAT_COMMON, "--max-steps", KD_STEPS,
                  "--eval-every", 0, "--log-every", 10, "--seed", seed, "--out", o("cells", name)]


KD_CELLS = [("SFT (λ=0)", None, 0.0)] + [(f"KD top-{k}, λ={lam:g}", k, lam) for k in KD_KS for lam in KD_LAMBDAS]
pool([kd_run(k or max(KD_KS), lam, s) for s in SEEDS for _, k, lam in KD_CELLS])

# ------------------------------------------------------------------------------------------------
# 5. tables
# ------------------------------------------------------------------------------------------------
def find_report(rep):
    """evaluate.py's JSON: a list of per-model reports, or a dict holding one under 'models'."""
    if isinstance(rep, dict) and "models" in rep:
        rep = rep["models"]
    if isinstance(rep, dict) and len(rep) == 1 and isinstance(next(iter(rep.values())), dict) \
            and "texts" in next(iter(rep.values())):
        rep = next(iter(rep.values()))
    return rep[0] if isinstance(rep, list) else rep


def metric(name, *keys):
    rep = find_report(read_json(o("eval", name + ".json")))
    for k in keys:
        rep = rep[k]
    return rep


RU_T, EN_T = os.path.basename(RU_EVAL), os.path.basename(EN_EVAL)


def text_key(rep, fname):
    texts = rep["texts"]
    for k in texts:
        if os.path.basename(k) == fname or k == fname or k.endswith(fname):
            return texts[k]
    raise KeyError(fname)


def bpb(name, fname):
    return text_key(find_report(read_json(o("eval", name + ".json"))), fname)["bits_per_byte"]


def cpt(name, fname):
    return text_key(find_report(read_json(o("eval", name + ".json"))), fname)["chars_per_token"]


def mc_acc(name, bench, key="loglik_per_byte"):
    mc = find_report(read_json(o("eval", name + ".json")))["mc"]
    for k, v in mc.items():
        if os.path.basename(k) == bench or k.endswith(bench) or k == bench.removesuffix(".jsonl"):
            return v["accuracy"][key]
    raise KeyError(bench)


out = []
title = "# nanoadapt ablations in miniature" + (" (ABLATIONS_SMOKE: a few steps each, the numbers are noise)"
                                                if SMOKE else "")
out.append(f"{title}\n\ndata `{A.data}`, seeds {SEEDS} (vocabulary cells: {VOCAB_SEEDS}); "
           f"cells are mean ± sample sd over seeds. Held out of all training: `{RU_T}` (ru), `{EN_T}` (en), "
           f"every {CHAT_EVAL_EVERY}th chat conversation.\n")

# --- table 1: KL
bench_names = [b.removesuffix(".jsonl") for b in BENCHES]
hdr = ["model", "β (KL weight)", "ru bits/byte ↓", "en bits/byte ↓", *[f"{b} acc" for b in bench_names]]
rows = [["English base", "-", ms([bpb("base", RU_T)], ".4f"), ms([bpb("base", EN_T)], ".4f"),
         *[ms([mc_acc("base", b)], ".2f") for b in BENCHES]],
        [f"base + {MAIN_VOCAB} ru tokenizer (extend), untrained", "-", ms([bpb(MAIN, RU_T)], ".4f"),
         ms([bpb(MAIN, EN_T)], ".4f"), *[ms([mc_acc(MAIN, b)], ".2f") for b in BENCHES]]]
for kl in KL_WEIGHTS:
    names = [f"ru_{MAIN}_kl{kl:g}_s{s}" for s in SEEDS]
    rows.append([f"+ {RU_STEPS} steps ru pretraining", f"{kl:g}", ms([bpb(n, RU_T) for n in names], ".4f"),
                 ms([bpb(n, EN_T) for n in names], ".4f"), *[ms([mc_acc(n, b) for n in names], ".2f") for b in BENCHES]])
out.append(f"## 1. KL to the frozen base on/off (Vikhr Table 10)\n\nContinued pretraining on Russian only (no English "
           f"replay), {RU_STEPS} steps × {BATCH}×{SEQ} tokens, from the {HIDDEN}-wide {LAYERS}-layer English base "
           f"({BASE_STEPS} steps from scratch) extended with the {MAIN_VOCAB}-piece Russian tokenizer. "
           f"MC: accuracy by log-likelihood per byte of the choice (chance: parus 0.50, others 0.25).\n\n"
           + table(hdr, rows))

# --- table 2: vocabulary
hdr = ["tokenizer", "vocab (rows)", "seeds", "ru chars/token ↑", "en chars/token ↑", "ru bits/byte ↓", "en bits/byte ↓",
       "ru bits/byte before training"]
rows = []
for label, model in [(f"English base ({BASE_VOCAB}), no surgery", "base")] + \
        [(f"ru {v} + base (extend)", f"adapted_{v}") for v in RU_VOCABS]:
    names = [f"ru_{model}_kl0_s{s}" for s in (SEEDS if model == MAIN else VOCAB_SEEDS)]
    vocab = read_json(o(model, "config.json"))["vocab_size"]
    rows.append([label, vocab, len(names), f"{cpt(names[0], RU_T):.2f}", f"{cpt(names[0], EN_T):.2f}",
                 ms([bpb(n, RU_T) for n in names], ".4f"), ms([bpb(n, EN_T) for n in names], ".4f"),
                 f"{bpb(model, RU_T):.4f}" if model in ("base", MAIN) else "-"])
out.append(f"## 2. Vocabulary size (Vikhr Table 8, in bits/byte)\n\nEach Russian tokenizer trained on the same Russian "
           f"text, appended to the base vocabulary by resize_vocab.py --mode extend (new rows = mean of their old "
           f"pieces), then the same budget: {RU_STEPS} steps × {BATCH}×{SEQ} tokens, β=0. A "
           f"bigger vocabulary sees more characters in the same number of tokens. The main ({MAIN_VOCAB}) row is the β=0 cell of table 1 (all seeds).\n\n" + table(hdr, rows))

# --- table 3: KD vs SFT
sft0 = o("cells", f"sft_s{SEEDS[0]}")
teacher_ce = first_metric(sft0, "eval_teacher_ce")
student_ce0, student_kl0 = first_metric(sft0, "eval_ce"), first_metric(sft0, "eval_kl")
hdr = ["cell", "held-out CE ↓ (nats/token)", "KL(teacher‖student) ↓", "Δ CE vs SFT (paired by seed)"]
rows = [["teacher (reference)", f"{teacher_ce:.4f}", "0", "-"],
        ["student before training", f"{student_ce0:.4f}", f"{student_kl0:.4f}", "-"]]
sft_ce = {s: last_metric(o("cells", f"sft_s{s}"), "eval_ce") for s in SEEDS}
for label, k, lam in KD_CELLS:
    names = {s: kd_run(k or max(KD_KS), lam, s)[0] for s in SEEDS}
    ce = {s: last_metric(o("cells", n), "eval_ce") for s, n in names.items()}
    kl = [last_metric(o("cells", n), "eval_kl") for n in names.values()]
    rows.append([label, ms(list(ce.values()), ".4f"), ms(kl, ".4f"),
                 "-" if not lam else ms([ce[s] - sft_ce[s] for s in SEEDS], "+.4f")])
t_args = read_json(o("teacher", "args.json")) if os.path.isfile(o("teacher", "args.json")) else {}
out.append(f"## 3. KD vs SFT (seed 003 Tables 2–5)\n\nTeacher: {TEACHER_HIDDEN}-wide {TEACHER_LAYERS}-layer, "
           f"{TEACHER_STEPS} steps from scratch on ru 0.8 / en 0.2, then {TEACHER_SFT_STEPS} SFT steps; student: the "
           f"β=1 cell of table 1 (seed {SEEDS[0]}). Both share the {MAIN_VOCAB}-piece extended tokenizer. "
           f"{len(CHAT_TRAIN)} Russian chat files, every {CHAT_EVAL_EVERY}th conversation held out; distill.py train "
           f"{KD_STEPS} steps × {CHAT_BATCH}×{CHAT_LEN} tokens, lr 1e-3, seed-003 weighting, bucket tail; λ=0 is plain "
           f"SFT through the same code. CE and KL per supervised token on the held-out store (top-{max(KD_KS)} + "
           f"tail bucket, so the KL is a lower bound on the full one).\n\n" + table(hdr, rows))

hdr = ["k", "bytes per conversation token", "bytes per stored row", "store on disk (MB)", "stored rows"]
rows = []
for k in KD_KS:
    meta = read_json(o(f"store_top{k}", "meta.json"))
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(o(f"store_top{k}")) for f in fs)
    rows.append([k, meta.get("bytes_per_token"), meta.get("bytes_per_stored_row"), f"{size / 1e6:.2f}",
                 meta.get("counts", {}).get("rows")])
out.append("### Store size per k\n\n" + table(hdr, rows))
out.append(f"\nTotal run time: {(time.time() - T0) / 60:.1f} min ({A.jobs} jobs × {THREADS} threads).")

text = "\n\n".join(out) + "\n"
with open(o("tables.md"), "w") as f:
    f.write(text)
print(text)
