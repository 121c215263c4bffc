"""Our Jinja rendering is byte-identical to transformers' apply_chat_template."""

import pytest

from thinkgate.chat.template import render_chat, thinking_mode

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "description": "Add numbers: 中文 ok",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"},
                                                                                           "b": {"type": "number"}}}}}]

CONVERSATIONS = [
    ("system + user", [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}], None),
    ("multi-turn with earlier reasoning", [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Simple arithmetic."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n6"},
        {"role": "user", "content": "Thanks 😀"}], None),
    ("tools and tool results", [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and 1+2?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need two calls.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "3"}], TOOLS),
    ("tools without system", [{"role": "user", "content": "Weather in Oslo?"}], TOOLS),
    ("assistant content before tool call", [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "content": "Rain"},
        {"role": "assistant", "content": "It rains in Rome."},
        {"role": "user", "content": "ok"}], TOOLS),
    ("content parts flattened", [{"role": "user", "content": "part one part two"}], None),
]


def _hf_render(path, messages, tools):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name,messages,tools", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_fixture_template_matches_transformers(checkpoints, name, messages, tools):
    from thinkgate.models.tokenizer import ModelTokenizer

    tok = ModelTokenizer.from_dir(checkpoints["qwen3"])
    ours = render_chat(tok.chat_template, messages, tools)
    assert ours == _hf_render(checkpoints["qwen3"], messages, tools)
    assert ours.endswith("<|im_start|>assistant\n<think>\n")
    assert thinking_mode(ours, tok.chat_template) == "open"


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.parametrize("name,messages,tools", CONVERSATIONS, ids=[c[0] for c in CONVERSATIONS])
def test_qwen25_gguf_template_matches_transformers(default_gguf, tmp_path_factory, name, messages, tools):
    from transformers import PreTrainedTokenizerFast

    from thinkgate.models.gguf_file import GGUFModel

    cache = test_qwen25_gguf_template_matches_transformers.__dict__
    if "tok" not in cache:
        cache["tok"] = GGUFModel(default_gguf).tokenizer()
    tok = cache["tok"]
    hf = PreTrainedTokenizerFast(tokenizer_object=tok.tok)
    hf.chat_template = tok.chat_template
    ours = render_chat(tok.chat_template, messages, tools)
    theirs = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert thinking_mode(ours, tok.chat_template) == "none"


def test_raise_exception_becomes_a_400():
    from thinkgate.errors import InvalidRequestError

    tmpl = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok"
    with pytest.raises(InvalidRequestError, match="first message must be user"):
        render_chat(tmpl, [{"role": "system", "content": "x"}])
    assert render_chat("{{ strftime_now('%Y') | length }}", []) == "4"


def test_tojson_keeps_order_and_unicode():
    out = render_chat("{{ x | tojson }}", [], x={"b": 1, "a": "中<>&"})
    assert out == '{"b": 1, "a": "中<>&"}'
