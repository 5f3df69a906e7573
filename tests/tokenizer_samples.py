"""Small texts and tiny tokenizers for the tokenizer and resize_vocab tests (written for nanoadapt)."""
import io
import json
import shutil
from pathlib import Path

import sentencepiece as spm

RU = """\
Машинное обучение изменяет мир. Ещё недавно компьютер умел только то, чему его научил программист, а теперь
модели учатся сами: читают книги, статьи и письма, переводят тексты и отвечают на вопросы людей.
Языковая модель предсказывает следующее слово. Чтобы предсказывать хорошо, она должна понимать грамматику,
знать факты о мире и помнить, о чём шла речь в начале разговора.
Большинство больших моделей обучали на английских текстах. Русское слово такая модель режет на много мелких
кусочков, поэтому русский текст для неё длиннее, генерация медленнее, а контекст короче.
Чтобы исправить это, мы обучаем новый токенизатор на русских текстах, заменяем словарь модели и продолжаем
обучение. Новые строки матрицы эмбеддингов начинаются со среднего значения старых строк, из которых
складывается слово, поэтому модель ничего не забывает.
Осенью в деревне рано темнеет. Дети возвращаются из школы, бабушка ставит самовар, а дедушка читает газету
у окна. Вечером вся семья собирается за большим столом, и начинается разговор о прошедшем дне.
В городе жизнь идёт быстрее: люди спешат на работу, машины стоят в пробках, в метро читают новости с телефонов.
Но и здесь по выходным можно найти тихий парк, где старики играют в шахматы, а молодые гуляют с собаками.
Наука начинается с вопроса. Почему небо голубое? Отчего зимой холодно, а летом тепло? Как устроена клетка?
Учёные ставят опыты, записывают результаты, спорят друг с другом и снова проверяют свои гипотезы.
Хороший учитель объясняет сложное простыми словами. Он не торопится, задаёт вопросы и радуется, когда ученик
сам находит ответ. Такие уроки запоминаются на всю жизнь.
В 2024 году исследователи показали, что адаптированная модель отвечает на русском языке не хуже исходной,
а работает почти в полтора раза быстрее. Это важный результат для тех, кто строит сервисы на русском языке.
Программисты любят порядок: каждая функция делает одно дело, у каждой переменной понятное имя, а тесты
проверяют, что ничего не сломалось после очередного изменения.
"""

EN = """\
Machine learning changes the world. Not long ago a computer could only do what a programmer told it to do;
now models learn by themselves: they read books, articles and letters, translate texts and answer questions.
A language model predicts the next word. To predict it well, the model must understand grammar, know facts
about the world and remember what the conversation was about at the beginning.
Most large models were trained on English text. Such a model cuts a Russian word into many small pieces, so a
Russian text is longer for it, generation is slower and the context is shorter.
To fix this we train a new tokenizer on Russian text, replace the vocabulary of the model and continue
training. New rows of the embedding matrix start as the mean of the old rows of the pieces of the word.
In autumn it gets dark early in the village. The children come home from school, grandmother puts the kettle
on, and grandfather reads the newspaper by the window. In the evening the whole family sits at a big table.
Life in the city is faster: people hurry to work, cars wait in traffic, and everyone reads news on a phone.
Science starts with a question. Why is the sky blue? Why is it cold in winter and warm in summer?
A good teacher explains hard things in simple words, asks questions and is glad when a student finds the answer.
def tokenize(text):
    for word in text.split():
        yield word.lower()  # 42 words, 3.14 seconds
"""

PARAGRAPH = ("Машинное обучение изменяет мир: модель прочитала 1234 страницы за 5,6 секунды!\n"
             "Machine learning changes the world —   even for code:\n    def f(x):\n\treturn x ** 2  # ёжик 日本\n\n"
             "«Привет», — сказал он. OK?")


def write_corpus(dir_):
    """ru.txt and en.txt in dir_; returns their paths."""
    dir_ = Path(dir_)
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "ru.txt").write_text(RU, encoding="utf-8")
    (dir_ / "en.txt").write_text(EN, encoding="utf-8")
    return dir_ / "ru.txt", dir_ / "en.txt"


def train_sp(path, text, vocab_size, model_type="bpe", byte_fallback=True, user_defined=(), coverage=1.0):
    """A SentencePiece model trained directly with sentencepiece (a 'base' tokenizer in Llama's layout)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.split("\n") if line.strip()]), model_writer=model,
        model_type=model_type, vocab_size=vocab_size, byte_fallback=byte_fallback, character_coverage=coverage,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, user_defined_symbols=list(user_defined), hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    Path(path).write_bytes(model.getvalue())
    return Path(path)


def sp_without_dummy_prefix(model_path):
    """A sentencepiece processor for model_path with add_dummy_prefix off, built independently of tokenizer.py."""
    from sentencepiece import sentencepiece_model_pb2 as pb2
    proto = pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def byte_level_tokenizer(dir_, text, vocab_size=400, add_prefix_space=False):
    """A Qwen-style tokenizer.json (byte-level BPE, specials <|endoftext|> <|im_start|> <|im_end|>, no bos),
    trained with `tokenizers`, plus its tokenizer_config.json. add_prefix_space: GPT-2 style, a space
    in front of the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split("\n"), trainer)
    dir_ = Path(dir_)
    dir_.mkdir(parents=True, exist_ok=True)
    tok.save(str(dir_ / "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None,
              "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"}
    (dir_ / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dir_


def make_model_dir(path, family, tokenizer_files, vocab_size, seed=0, **overrides):
    """A tiny random transformers checkpoint in path with the given tokenizer files copied in."""
    from tiny_models import make_hf_model
    make_hf_model(family, path, seed=seed, vocab_size=vocab_size, **overrides)
    for f in tokenizer_files:
        shutil.copy(f, Path(path) / Path(f).name)
    return Path(path)
