"""Tokenizer backends and chat templates against their reference libraries (tokenizers, sentencepiece,
tiktoken, transformers), on tiny tokenizers built here and on SmolLM2-135M-Instruct's real one (the
`smollm2_dir` fixture of conftest.py, from tools/fetch_smollm2.py)."""
import base64
import collections
import io
import json
import os

import pytest
import regex
import sentencepiece as spm
import tiktoken
from tokenizers import Regex, Tokenizer as HFBackend, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

from llama_rlhf.tokenizer import KINDS, load_tokenizer

TEXT = (
    "Hello, world! The quick brown fox jumps over 13 lazy dogs. I'LL say it's fine, don't worry.\n"
    "Grüße aus München: Äpfel, Öl und Übermut kosten 3,50 € (straße, ÄÖÜäöüß).\n"
    "机器学习是人工智能的一个分支。我们今天学习分词。\n"
    "Emoji: 🙂🚀👩‍💻 done.\n"
    "def add(a, b):\n    return a + b  # sum\n\n\n"
    "Numbers: 3.14159, 1,000,000 and 2024-06-01 or 1234567890.\n"
    "Whitespace:   three spaces,\ttab,\t\ttwo tabs, trailing   \n  \n"
)
CORPUS = [line for line in TEXT.splitlines() if line.strip()] + [
    "The model reads text and writes text; tokens are pieces of words.",
    "Über allen Gipfeln ist Ruh, in allen Wipfeln spürest du kaum einen Hauch.",
    "自然语言处理让计算机理解人类的语言。",
    "for i in range(10):\n    print(i * i)",
]

# Meta's Llama 3 split pattern and Qwen1's (single digits), written out independently of the package.
META_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN1_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The official-style templates, written into the test checkpoints' tokenizer_config.json.
LLAMA3_HF_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Exercises the environment: tojson, namespace, loop controls, {% generation %}, whitespace control.
FEATURE_TEMPLATE = (
    "{% set ns = namespace(n=0) %}\n"
    "{% for message in messages %}\n"
    "  {% if message['role'] == 'system' %}{% continue %}{% endif %}\n"
    "  {% set ns.n = ns.n + 1 %}\n"
    "[{{ ns.n }}] {{ message | tojson }}\n"
    "  {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}"
    "{% endgeneration %}{% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<|start_header_id|>{{ 'assistant' | upper }}{% endif %}"
)

USER_ONLY = [{"role": "user", "content": "Wie spät ist es in München? 🙂"}]
WITH_SYSTEM = [{"role": "system", "content": "You answer briefly."}] + USER_ONLY
MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": " 4 \n"},
    {"role": "user", "content": "机器学习是什么？ Answer in one line."},
]
CONVERSATIONS = [USER_ONLY, WITH_SYSTEM, MULTI_TURN, MULTI_TURN[1:]]


# ---------------------------------------------------------------------------------------------- builders


def write_json(folder, name, obj):
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)


def train_hf_bpe(special_tokens, llama3_split=False):
    """A byte-level BPE `tokenizers` model trained on CORPUS, with special tokens at ids 0..k-1."""
    backend = HFBackend(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not llama3_split)
    if llama3_split:  # as the real Llama 3 tokenizer.json: regex split, then bytes
        split = pre_tokenizers.Split(Regex(META_LLAMA3_PATTERN), behavior="isolated", invert=False)
        backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 3, trainer)
    return backend


def train_byte_ranks(pattern, n_merges=300):
    """tiktoken mergeable ranks: the 256 bytes plus byte-pair merges learned on CORPUS (a tiny BPE trainer)."""
    ranks = {bytes([b]): b for b in range(256)}
    words = collections.Counter(regex.findall(pattern, "\n".join(CORPUS)))
    seqs = collections.Counter({tuple(bytes([b]) for b in w.encode()): n for w, n in words.items()})
    for _ in range(n_merges):
        pairs = collections.Counter()
        for seq, n in seqs.items():
            for pair in zip(seq, seq[1:]):
                pairs[pair] += n
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks.setdefault(a + b, len(ranks))
        merged = collections.Counter()
        for seq, n in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            merged[tuple(out)] += n
        seqs = merged
    return ranks


def write_ranks(path, ranks):
    with open(path, "w") as f:
        for token, rank in ranks.items():
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")


@pytest.fixture(scope="module")
def llama3_hf_dir(tmp_path_factory):
    """A Llama-3-HF-style checkpoint: BOS post-processor, eot eos, end ids in config lists, official template."""
    folder = str(tmp_path_factory.mktemp("llama3_hf"))
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eom_id|>", "<|eot_id|>"]
    backend = train_hf_bpe(specials, llama3_split=True)
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 0)])
    backend.save(os.path.join(folder, "tokenizer.json"))
    write_json(folder, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},
        "chat_template": LLAMA3_HF_TEMPLATE})
    write_json(folder, "config.json", {"model_type": "llama", "bos_token_id": 0, "eos_token_id": [1, 5]})
    write_json(folder, "generation_config.json", {"bos_token_id": 0, "eos_token_id": [1, 4, 5]})
    return folder


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A Gemma-style checkpoint: add_bos_token, <bos> in the template, which rejects the system role."""
    folder = str(tmp_path_factory.mktemp("gemma"))
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    backend = train_hf_bpe(specials)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", 2)])
    backend.save(os.path.join(folder, "tokenizer.json"))
    write_json(folder, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": GEMMA_TEMPLATE})
    write_json(folder, "generation_config.json", {"eos_token_id": [1, 5]})
    return folder


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A Qwen2-style checkpoint without a template: null bos_token (though config.json names one), truncation."""
    folder = str(tmp_path_factory.mktemp("chatml"))
    backend = train_hf_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend.enable_truncation(max_length=16)  # saved in tokenizer.json; encode() must ignore it, as transformers does
    backend.save(os.path.join(folder, "tokenizer.json"))
    write_json(folder, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>"})
    write_json(folder, "config.json", {"bos_token_id": 0, "eos_token_id": 2})
    return folder


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A Llama-2-style sentencepiece BPE model (byte fallback, identity normalisation, split digits)."""
    folder = str(tmp_path_factory.mktemp("sp"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=0.98, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    return folder


@pytest.fixture(scope="module")
def llama3_ranks():
    return train_byte_ranks(META_LLAMA3_PATTERN)


def meta_llama3_specials(n_base, llama31=False):
    """Meta's Llama 3 special tokens and ids, as its tokenizer.py numbers them."""
    if llama31:
        named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        names = named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]
    else:
        names = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
        names += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        names += [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    return {name: n_base + i for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def llama3_tiktoken_dir(tmp_path_factory, llama3_ranks):
    folder = str(tmp_path_factory.mktemp("llama3_meta"))
    write_ranks(os.path.join(folder, "tokenizer.model"), llama3_ranks)
    return folder


@pytest.fixture(scope="module")
def qwen1_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("qwen1"))
    ranks = train_byte_ranks(QWEN1_PATTERN)
    write_ranks(os.path.join(folder, "qwen.tiktoken"), ranks)
    return folder, ranks


def hf_chat(hf, messages, add_generation_prompt=True, tokenize=False):
    out = hf.apply_chat_template(messages, tokenize=tokenize, add_generation_prompt=add_generation_prompt,
                                 return_dict=False)
    return list(out) if tokenize else out


# ------------------------------------------------------------------------------------- tokenizer.json


@pytest.mark.parametrize("fixture", ["llama3_hf_dir", "gemma_dir", "chatml_dir", "smollm2_dir"])
def test_tokenizers_encode_decode_match_references(fixture, request):
    folder = request.getfixturevalue(fixture)
    tok = load_tokenizer(folder)
    backend = HFBackend.from_file(os.path.join(folder, "tokenizer.json"))
    backend.no_truncation()
    hf = AutoTokenizer.from_pretrained(folder)
    assert tok.kind == "tokenizers"
    ids = tok.encode(TEXT)
    assert ids == backend.encode(TEXT, add_special_tokens=False).ids
    assert ids == hf.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == TEXT
    # special-token strings inside text map to their ids; decode keeps or skips them
    special = sorted(hf.all_special_tokens)[-1]
    text = f"{special}Grüße{special} 机器 "
    with_special = tok.encode(text)
    assert with_special == hf.encode(text, add_special_tokens=False)
    assert with_special.count(hf.convert_tokens_to_ids(special)) == 2
    assert tok.decode(with_special, skip_special_tokens=False) == hf.decode(with_special) == text
    assert tok.decode(with_special) == hf.decode(with_special, skip_special_tokens=True)
    assert tok.vocab_size == len(hf)
    # add_bos follows the checkpoint (post-processor or add_bos_token), never doubled
    if tok.adds_bos:
        assert tok.encode(TEXT, add_bos=True) == hf.encode(TEXT)
        assert tok.encode(hf.bos_token + "x", add_bos=True) == hf.encode("x")
    else:
        assert hf.encode(TEXT) == ids


def test_special_ids_and_end_ids_from_configs(llama3_hf_dir, gemma_dir, chatml_dir):
    llama3 = load_tokenizer(llama3_hf_dir)
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (0, 5, 5)  # eos from the dict entry; pad falls back
    assert llama3.end_ids == frozenset({1, 4, 5})  # config.json [1, 5] + generation_config.json [1, 4, 5]
    assert llama3.adds_bos and llama3.model_type == "llama"
    gemma = load_tokenizer(gemma_dir)
    assert (gemma.bos_id, gemma.eos_id, gemma.pad_id) == (2, 1, 0)
    assert gemma.end_ids == frozenset({1, 5}) and gemma.adds_bos
    chatml = load_tokenizer(chatml_dir)
    assert chatml.bos_id is None and not chatml.adds_bos  # an explicit null beats config.json's bos_token_id
    assert (chatml.eos_id, chatml.pad_id, chatml.end_ids) == (2, 0, frozenset({2}))
    assert chatml.encode("hi", add_bos=True) == chatml.encode("hi")


def test_smollm2_special_ids(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    assert tok.end_ids == frozenset({2}) and tok.vocab_size == 49152


# ------------------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("fixture", ["smollm2_dir", "llama3_hf_dir"])
def test_chat_template_matches_transformers(fixture, request):
    folder = request.getfixturevalue(fixture)
    tok, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            assert tok.render_chat(messages, add_generation_prompt) == hf_chat(hf, messages, add_generation_prompt)
        ids = tok.encode_chat(messages)
        assert ids == hf_chat(hf, messages, tokenize=True)
        if tok.bos_id is not None and fixture == "llama3_hf_dir":
            assert ids[:2] == [tok.bos_id, 2] and ids.count(tok.bos_id) == 1  # no double BOS
    # system_prompt is used only when the messages carry none
    assert tok.render_chat(USER_ONLY, system_prompt="You answer briefly.") == hf_chat(hf, WITH_SYSTEM)
    assert tok.render_chat(MULTI_TURN, system_prompt="ignored") == hf_chat(hf, MULTI_TURN)


def test_gemma_template_system_prompt_is_merged(gemma_dir):
    hf = AutoTokenizer.from_pretrained(gemma_dir)
    merged = [{"role": "user", "content": "You answer briefly.\n\n" + USER_ONLY[0]["content"]}]
    for model_type in (None, "gemma2"):  # detected by the template raising, or known from the model type
        tok = load_tokenizer(gemma_dir, model_type=model_type)
        assert tok.render_chat(USER_ONLY) == hf_chat(hf, USER_ONLY)
        assert tok.render_chat(MULTI_TURN[1:]) == hf_chat(hf, MULTI_TURN[1:])
        assert tok.render_chat(USER_ONLY, system_prompt="You answer briefly.") == hf_chat(hf, merged)
        assert tok.render_chat(WITH_SYSTEM) == hf_chat(hf, merged)
        ids = tok.encode_chat(USER_ONLY, system_prompt="You answer briefly.")
        assert ids == hf_chat(hf, merged, tokenize=True)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # template writes <bos>; not added again
    with pytest.raises(Exception, match="alternate"):  # other template errors still surface
        load_tokenizer(gemma_dir).render_chat(USER_ONLY + USER_ONLY)
    with pytest.raises(Exception, match="System role"):  # transformers itself refuses the system role
        hf_chat(hf, WITH_SYSTEM)


def test_template_environment_and_template_sources(gemma_dir, tmp_path):
    folder = str(tmp_path)
    for name in ("tokenizer.json",):
        with open(os.path.join(gemma_dir, name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "chat_template": [{"name": "default", "template": FEATURE_TEMPLATE},
                                {"name": "tool_use", "template": "unused"}]}
    write_json(folder, "tokenizer_config.json", config)
    tok, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for messages in CONVERSATIONS:
        assert tok.render_chat(messages) == hf_chat(hf, messages)
    # chat_template.jinja wins over tokenizer_config.json, as in transformers
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{{ strftime_now('%Y') }}{{ bos_token }}")
    tok, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert tok.render_chat(MULTI_TURN) == hf_chat(hf, MULTI_TURN)
    assert tok.render_chat(MULTI_TURN).startswith("system: You are terse.\nuser: What is 2+2?")


def test_builtin_chatml_when_checkpoint_has_no_template(chatml_dir):
    tok = load_tokenizer(chatml_dir)
    assert tok.render_chat(MULTI_TURN[1:3], add_generation_prompt=False) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n 4 \n<|im_end|>\n")
    assert tok.render_chat(USER_ONLY, system_prompt="Sys") == (
        "<|im_start|>system\nSys<|im_end|>\n<|im_start|>user\n" + USER_ONLY[0]["content"]
        + "<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode_chat(USER_ONLY)
    assert ids == tok.encode(tok.render_chat(USER_ONLY)) and ids[0] == 1  # no BOS: <|im_start|> comes first
    assert ids[-len(tok.encode("<|im_start|>assistant\n")):] == tok.encode("<|im_start|>assistant\n")


# ------------------------------------------------------------------------------------- sentencepiece


def test_sentencepiece_matches_sentencepiece_and_transformers(sp_dir):
    tok = load_tokenizer(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
    assert tok.kind == "sentencepiece" and tok.vocab_size == 400
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.end_ids) == (1, 2, 2, frozenset({2}))  # pad -1 -> eos
    ids = tok.encode(TEXT)
    assert ids == sp.encode(TEXT)
    assert tok.encode(TEXT, add_bos=True) == [1] + ids
    assert tok.decode(ids) == sp.decode(ids) == TEXT
    # control-token strings in text become their ids; each text piece is encoded as sentencepiece does alone
    assert tok.encode("<s>Grüße 12</s> x") == [1] + sp.encode("Grüße 12") + [2] + sp.encode(" x")
    assert tok.decode([1] + ids + [2], skip_special_tokens=False) == "<s> " + TEXT + "</s>"
    assert tok.decode([1] + ids + [2]) == TEXT
    # transformers' converted Llama tokenizer (needs protobuf to read the model) agrees on plain text
    hf_dir = os.path.join(sp_dir, "hf")
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(sp_dir, "tokenizer.model"), "rb") as src, \
            open(os.path.join(hf_dir, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())
    write_json(hf_dir, "tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                  "eos_token": "</s>", "unk_token": "<unk>"})
    hf = AutoTokenizer.from_pretrained(hf_dir)
    assert hf.encode(TEXT, add_special_tokens=False) == ids
    assert hf.decode(ids) == TEXT


def test_sentencepiece_llama2_chat_matches_meta_format(sp_dir):
    tok = load_tokenizer(sp_dir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(sp_dir, "tokenizer.model"))
    system, (_, q1, a1, q2) = MULTI_TURN[0]["content"], MULTI_TURN
    # Meta's llama/generation.py chat_completion: bos + "[INST] {user} [/INST] {answer}" + eos per finished turn
    first = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q1['content']} [/INST] {a1['content'].strip()}"
    expected = [1] + sp.encode(first) + [2] + [1] + sp.encode(f"[INST] {q2['content'].strip()} [/INST]")
    assert tok.encode_chat(MULTI_TURN) == expected
    assert tok.render_chat(MULTI_TURN) == (
        f"<s>{first}</s><s>[INST] {q2['content']} [/INST]")
    with pytest.raises(Exception, match="alternating"):
        tok.render_chat(USER_ONLY + USER_ONLY)


# ------------------------------------------------------------------------------------- tiktoken


def test_llama3_tiktoken_matches_meta_encoding(llama3_tiktoken_dir, llama3_ranks):
    n_base = len(llama3_ranks)
    specials = meta_llama3_specials(n_base)
    ref = tiktoken.Encoding("ref", pat_str=META_LLAMA3_PATTERN, mergeable_ranks=llama3_ranks, special_tokens=specials)
    tok = load_tokenizer(llama3_tiktoken_dir)  # auto-detected: tokenizer.model holding base64 ranks
    assert tok.kind == "tiktoken" and tok.vocab_size == n_base + 256
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n_base, n_base + 1, n_base + 1)
    assert tok.end_ids == frozenset({n_base + 1, n_base + 9})  # <|end_of_text|>, <|eot_id|>
    ids = tok.encode(TEXT)
    assert ids == ref.encode(TEXT) and len(ids) < len(TEXT.encode())  # the merges are used
    assert tok.decode(ids) == TEXT
    text = "<|start_header_id|>user<|end_header_id|>\n\nGrüße<|eot_id|><|reserved_special_token_250|>"
    with_special = tok.encode(text, add_bos=True)
    assert with_special == [n_base] + ref.encode(text, allowed_special="all")
    assert with_special[-1] == n_base + 255 and with_special[1] == specials["<|start_header_id|>"] == n_base + 6
    assert tok.decode(with_special, skip_special_tokens=False) == "<|begin_of_text|>" + text
    assert tok.decode(with_special) == "user\n\nGrüße"
    assert tok.encode("a" * 30_000 + " b") == ref.encode("a" * 25_000) + ref.encode("a" * 5_000 + " b")


def test_llama3_tiktoken_chat_matches_meta_chat_format(llama3_tiktoken_dir, llama3_ranks, llama3_hf_dir):
    tok = load_tokenizer(llama3_tiktoken_dir, model_type="llama3")
    n = len(llama3_ranks)
    ref = tiktoken.Encoding("ref", pat_str=META_LLAMA3_PATTERN, mergeable_ranks=llama3_ranks, special_tokens={})

    def header(role):  # Meta's llama3 ChatFormat.encode_header
        return [n + 6] + ref.encode(role) + [n + 7] + ref.encode("\n\n")
    expected = [n]
    for message in MULTI_TURN:
        expected += header(message["role"]) + ref.encode(message["content"].strip()) + [n + 9]
    expected += header("assistant")
    assert tok.encode_chat(MULTI_TURN) == expected
    # the built-in template renders exactly what the official HF Llama 3 template renders
    hf = AutoTokenizer.from_pretrained(llama3_hf_dir)
    for messages in CONVERSATIONS:
        assert tok.render_chat(messages) == hf_chat(hf, messages)


def test_llama31_special_names_when_params_use_scaled_rope(tmp_path, llama3_ranks):
    write_ranks(tmp_path / "tokenizer.model", llama3_ranks)
    write_json(str(tmp_path), "params.json", {"dim": 64, "use_scaled_rope": True})
    n = len(llama3_ranks)
    tok = load_tokenizer(str(tmp_path))
    assert tok.end_ids == frozenset({n + 1, n + 8, n + 9}) and tok.pad_id == n + 4
    specials = meta_llama3_specials(n, llama31=True)
    assert tok.encode("<|eom_id|><|python_tag|><|reserved_special_token_246|>") == [n + 8, n + 10, n + 255]
    assert specials["<|reserved_special_token_246|>"] == n + 255


def test_qwen1_tiktoken_matches_qwen_encoding(qwen1_dir):
    folder, ranks = qwen1_dir
    n = len(ranks)
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
    ref = tiktoken.Encoding("ref", pat_str=QWEN1_PATTERN, mergeable_ranks=ranks,
                            special_tokens={name: n + i for i, name in enumerate(names)})
    tok = load_tokenizer(folder)
    assert tok.kind == "qwen_tiktoken" and tok.vocab_size == n + 208
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.end_ids) == (None, n, n, frozenset({n, n + 2}))
    ids = tok.encode(TEXT)
    assert ids == ref.encode(TEXT) and tok.decode(ids) == TEXT
    assert tok.encode("Cafe\u0301 12") == ref.encode("Café 12")  # NFC first, as Qwen1 does
    text = "<|im_start|>user\n机器<|im_end|><|extra_204|>"
    assert tok.encode(text) == ref.encode(text, allowed_special="all") and tok.encode(text)[-1] == n + 207
    assert tok.decode(tok.encode(text)) == "user\n机器"
    rendered = tok.render_chat(USER_ONLY)  # built-in: ChatML with Qwen1's default system message
    assert rendered == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                        + USER_ONLY[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.render_chat(USER_ONLY, system_prompt="Sys").startswith("<|im_start|>system\nSys<|im_end|>\n")
    assert tok.encode_chat(USER_ONLY) == ref.encode(rendered, allowed_special="all")


# ------------------------------------------------------------------------------------- bad input


def test_bad_input_errors(tmp_path, sp_dir):
    missing = str(tmp_path / "no_such_checkpoint")
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as error:
        load_tokenizer(str(empty))
    assert str(empty) in str(error.value)
    assert all(name in str(error.value) for name in ("tokenizer.json", "tokenizer.model", "qwen.tiktoken"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(sp_dir, kind="tokenizers")
    with pytest.raises(ValueError) as error:
        load_tokenizer(sp_dir, kind="bpe")
    assert all(kind in str(error.value) for kind in KINDS)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.model").write_bytes(b"\x00\x01 not a model")
    with pytest.raises(ValueError, match="neither a sentencepiece model nor a tiktoken"):
        load_tokenizer(str(tmp_path / "junk"))


def test_missing_chat_template_error(gemma_dir, tmp_path):
    with open(os.path.join(gemma_dir, "tokenizer.json"), "rb") as src:
        (tmp_path / "tokenizer.json").write_bytes(src.read())
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))  # a tokenizer file works as the path too
    assert tok.chat_template is None and tok.kind == "tokenizers"
    with pytest.raises(ValueError, match="no chat template"):
        tok.render_chat(USER_ONLY)
