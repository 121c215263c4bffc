from thinkgate.chat.messages import VERBOSITY_HINTS, to_template_messages
from thinkgate.protocol import Message


def test_developer_becomes_system_and_parts_flatten():
    msgs = [Message(role="developer", content="Be brief."),
            Message(role="user", content=[{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]),
            Message(role="assistant", content=None, reasoning="thought",
                    tool_calls=[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
            Message(role="tool", content="42", tool_call_id="c1")]
    out = to_template_messages(msgs)
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[1] == {"role": "user", "content": "Hello world"}
    assert out[2]["reasoning_content"] == "thought" and out[2]["content"] == ""
    assert out[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert out[3] == {"role": "tool", "content": "42", "tool_call_id": "c1"}


def test_verbosity_adds_one_instruction_and_medium_changes_nothing():
    user = [Message(role="user", content="hi")]
    assert to_template_messages(user, "medium") == to_template_messages(user) == [{"role": "user", "content": "hi"}]
    low = to_template_messages(user, "low")
    assert low[0] == {"role": "system", "content": VERBOSITY_HINTS["low"]}
    high = to_template_messages([Message(role="system", content="S")] + user, "high")
    assert high[0]["content"] == "S\n\n" + VERBOSITY_HINTS["high"] and len(high) == 2
