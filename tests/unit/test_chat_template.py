"""Chat templates: rendered exactly as transformers' apply_chat_template, tokenized to the same
ids, BOS added once, ChatML fallback, and template failures as ModelFormatError."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fastserve_edge.errors import ModelFormatError
from fastserve_edge.models.gguf import open_reader, read_metadata
from fastserve_edge.models.tokenizer import CHATML_TEMPLATE, Tokenizer
from tests.unit.tokenizer_fixtures import (  # noqa: F401  (fixtures)
    MESSAGES,
    load_oracle,
    sentencepiece_vocab,
    small_byte_level_vocab,
    smollm2_gguf,
    smollm2_meta,
    smollm2_oracle,
    write_gguf,
)


def oracle_chat_ids(oracle: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    out = oracle.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def smollm2(smollm2_meta: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_meta)


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_matches_transformers(
    smollm2: Tokenizer, smollm2_oracle: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    expected = smollm2_oracle.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert smollm2.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected
    assert smollm2.encode_chat(messages, add_generation_prompt=add_generation_prompt) == oracle_chat_ids(
        smollm2_oracle, messages, add_generation_prompt
    )
    assert not smollm2.chat_template_is_fallback


# Exercises what HF templates lean on: special-token variables, tojson without HTML escaping,
# strftime_now, namespace, loop controls, `tools is none`, raise_exception guard, {% generation %}.
RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- continue -%}{%- endif -%}
  {%- if m['role'] not in ['user', 'assistant'] -%}{{ raise_exception('bad role ' + m['role']) }}{%- endif -%}
  {%- if m['role'] == 'assistant' -%}
<|im_start|>assistant
{% generation %}{{ m['content'] | trim }}{% endgeneration %}<|im_end|>
  {%- else -%}
<|im_start|>{{ m['role'] }} {{ m | tojson }}
{{ m.content }}<|im_end|>
  {%- endif %}
{% endfor -%}
{%- if tools is none %}[no tools; year {{ strftime_now('%Y') }}; sys={{ ns.system }}; eos={{ eos_token }}]{% endif %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def rich_file(smollm2_meta: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    vocab = small_byte_level_vocab(smollm2_meta, 6000, "smollm")
    vocab.chat_template = RICH_TEMPLATE
    return write_gguf(tmp_path_factory.mktemp("rich") / "rich.gguf", vocab)


def test_template_features_render_like_transformers(rich_file: Path) -> None:
    oracle = load_oracle(rich_file)
    tok = Tokenizer.from_gguf_metadata(read_metadata(open_reader(rich_file)))
    for messages in MESSAGES:
        expected = oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.render_chat(messages) == expected
        assert '\\u' not in expected  # tojson keeps non-ASCII text as is
        assert tok.encode_chat(messages) == oracle_chat_ids(oracle, messages, True)


def test_raise_exception_becomes_model_format_error(rich_file: Path) -> None:
    tok = Tokenizer.from_gguf_metadata(read_metadata(open_reader(rich_file)))
    with pytest.raises(ModelFormatError, match="refused this conversation: bad role tool"):
        tok.render_chat([{"role": "tool", "content": "x"}])


def _with_template(meta: dict[str, Any], template: str | None) -> Tokenizer:
    meta = {**meta, "tokenizer.chat_template": template}
    return Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if v is not None})


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{% for m in messages %}{{ m.content }}", "not valid Jinja"),  # unclosed block
        ("{{ messages[0].content.upper( }}", "not valid Jinja"),
    ],
)
def test_template_syntax_error_is_model_format_error(
    smollm2_meta: dict[str, Any], template: str, message: str
) -> None:
    with pytest.raises(ModelFormatError, match=message):
        _with_template(smollm2_meta, template)


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages[0]['content'] + 1 }}",  # TypeError inside the template
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the sandbox refuses
        "{{ messages.append(1) }}",  # immutable sandbox
    ],
)
def test_template_runtime_error_is_model_format_error(smollm2_meta: dict[str, Any], template: str) -> None:
    tok = _with_template(smollm2_meta, template)
    with pytest.raises(ModelFormatError, match="chat template"):
        tok.render_chat([{"role": "user", "content": "hi"}])


def test_chatml_fallback_without_template(smollm2_meta: dict[str, Any]) -> None:
    tok = _with_template(smollm2_meta, None)
    assert tok.chat_template_is_fallback and tok.chat_template == CHATML_TEMPLATE
    rendered = tok.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])
    assert rendered == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    assert tok.encode_chat([{"role": "user", "content": "Q"}])[0] == tok.encode("<|im_start|>")[0]


def test_bos_added_once_when_the_model_wants_it(tmp_path: Path) -> None:
    body = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"

    def spm_with(template: str, name: str) -> Tokenizer:
        path = write_gguf(tmp_path / name, sentencepiece_vocab(chat_template=template))
        return Tokenizer.from_gguf_metadata(read_metadata(open_reader(path)))

    with_bos, without = spm_with("{{ bos_token }}" + body, "a.gguf"), spm_with(body, "b.gguf")
    chat = [{"role": "user", "content": "hello"}]
    assert with_bos.add_bos_token and with_bos.bos_id == 1
    assert with_bos.encode_chat(chat)[:2] != [1, 1] and with_bos.encode_chat(chat)[0] == 1
    assert without.encode_chat(chat) == [1, *without.encode(without.render_chat(chat))]


def test_hf_folder_template_sources(smollm2_oracle: Any, tmp_path: Path) -> None:
    smollm2_oracle.save_pretrained(tmp_path)  # writes chat_template.jinja
    assert Tokenizer.from_hf_folder(tmp_path).chat_template == smollm2_oracle.chat_template

    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config_path.write_text(json.dumps(config))
    assert Tokenizer.from_hf_folder(tmp_path).chat_template == "D"

    (tmp_path / "chat_template.jinja").unlink()
    config["chat_template"] = None
    config_path.write_text(json.dumps(config))
    assert Tokenizer.from_hf_folder(tmp_path).chat_template_is_fallback
