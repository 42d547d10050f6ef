"""Chat templates: render a checkpoint's jinja template as transformers does, plus built-in fallbacks."""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .models.config import read_json

# Meta's Llama 2 chat format: "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer}</s>" per turn.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Llama 2 chat needs user/assistant turns alternating, after an optional system message') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% set content = message['content'] %}"
    "{% if loop.first and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}"
    "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Meta's Llama 3 chat format: a header per message, each message closed by <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# ChatML: "<|im_start|>role\ncontent<|im_end|>\n" per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen1 chat: ChatML with the default system message its make_context() always writes.
QWEN1_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}" + CHATML_TEMPLATE
)


def read_checkpoint_template(folder: str) -> str | None:
    """The chat template shipped in `folder` (chat_template.jinja, else tokenizer_config.json), or None."""
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    config_file = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_file):
        return None
    template = read_json(config_file).get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = {entry["name"]: entry["template"] for entry in template}
    if isinstance(template, dict):
        if "default" not in template:
            raise ValueError(f"{config_file}: chat_template has no 'default' entry (has {sorted(template)})")
        template = template["default"]
    return template


def family_name(model_type: str | None) -> str:
    """The family part of a model type: 'llama-hf' -> 'llama', 'Gemma2' -> 'gemma2'."""
    return (model_type or "").lower().split("-")[0]


def builtin_template(known_tokens, kind: str, model_type: str | None) -> str | None:
    """A built-in template for a checkpoint without one, chosen by its special tokens, kind and model type."""
    if "<|start_header_id|>" in known_tokens:
        return LLAMA3_TEMPLATE
    if kind == "qwen_tiktoken":
        return QWEN1_TEMPLATE
    if "<|im_start|>" in known_tokens:
        return CHATML_TEMPLATE
    if kind == "sentencepiece" or family_name(model_type) in ("llama", "llama2"):
        return LLAMA2_TEMPLATE
    return None


class _GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` marker and render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandboxed environment transformers uses (same options, filters, globals)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_template(source: str, messages: list[dict], add_generation_prompt: bool, token_names: dict) -> str:
    """Render messages with a template; `token_names` are the special-token variables (bos_token, eos_token, ...)."""
    return compile_template(source).render(
        **token_names, messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt
    )


def merge_system_into_user(messages: list[dict]) -> list[dict]:
    """Fold a leading system message into the first user message (for templates without a system role)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if rest and rest[0]["role"] == "user":
        return [{**rest[0], "content": system + "\n\n" + rest[0]["content"]}] + rest[1:]
    return [{"role": "user", "content": system}] + rest
