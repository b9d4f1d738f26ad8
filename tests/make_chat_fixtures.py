#!/usr/bin/env python3
"""Render chat conversations with Hugging Face transformers: the golden strings of tests/chat_template.rs.

For every template tests/fixtures/chat/<name>.jinja (with its bos/eos tokens in <name>.json; where
each one came from is in tests/fixtures/chat/SOURCES.md) this renders a handful of conversations
exactly as `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`
does, and writes the strings (or, where transformers raises, the error message) to
tests/fixtures/chat/expected.json.

How to run (from the repository root, CPU only, a few seconds; torch is not needed):

    python3 -m venv ~/.cache/moe-run-chat-venv
    ~/.cache/moe-run-chat-venv/bin/pip install transformers jinja2 tokenizers
    ~/.cache/moe-run-chat-venv/bin/python tests/make_chat_fixtures.py

`strftime_now` (gpt-oss writes the current date, Llama 4 reads it) is pinned to FIXED_TIME, which
the Rust test passes to `ChatTemplate::with_fixed_time`.
"""

import datetime as _dt
import json
import os
import sys

import jinja2
import tokenizers
import transformers
from transformers import PreTrainedTokenizerFast
from transformers.utils import chat_template_utils

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "chat")

# 2025-06-15 12:34:56 UTC. transformers' strftime_now is `datetime.now().strftime(fmt)` (local time);
# the Rust side formats its fixed instant in UTC, so the pinned clock is given as naive UTC here.
FIXED_TIME = _dt.datetime(2025, 6, 15, 12, 34, 56)
FIXED_TIME_UNIX = int(FIXED_TIME.replace(tzinfo=_dt.timezone.utc).timestamp())


class _FixedDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return FIXED_TIME


chat_template_utils.datetime = _FixedDatetime

TEMPLATES = ["mixtral", "qwen3", "deepseek-v3", "llama4", "gpt-oss"]

SYSTEM = {"role": "system", "content": "You are a concise assistant."}
U1 = {"role": "user", "content": "What is a mixture of experts?"}
A1 = {"role": "assistant", "content": "A layer that routes each token to a few expert MLPs."}
U2 = {"role": "user", "content": "How many experts does Mixtral use per token?"}
NON_ASCII = {"role": "user", "content": "Grüße aus Köln! 你好，世界。Ça va? «ñ» — 🙂\ttab\nnew line \"quotes\" \\ back"}
THINKING = {
    "role": "assistant",
    "content": "<think>\nTwo of eight.\n</think>\n\nTwo experts per token.",
}
PADDED = {"role": "user", "content": "  leading and trailing spaces  \n"}
TOOL_RESULT = {"role": "tool", "content": "{\"temperature\": 21, \"sky\": \"ensoleillé\"}"}
# A tool schema with every object's keys in sorted order: the Rust side reads it through
# serde_json::Value, whose maps are sorted, while Python keeps insertion order (see SOURCES.md).
TOOLS = [
    {
        "function": {
            "description": "Current weather in a city — «météo».",
            "name": "get_weather",
            "parameters": {
                "properties": {
                    "city": {"description": "City name, e.g. Köln", "type": "string"},
                    "unit": {"default": "c", "enum": ["c", "f"], "type": "string"},
                },
                "required": ["city"],
                "type": "object",
            },
        },
        "type": "function",
    }
]

# (name, messages, add_generation_prompt, extra template variables)
CONVERSATIONS = [
    ("single_user_gen", [U1], True, {}),
    ("single_user_nogen", [U1], False, {}),
    ("system_user_gen", [SYSTEM, U1], True, {}),
    ("multi_turn_gen", [U1, A1, U2], True, {}),
    ("multi_turn_nogen", [U1, A1, U2], False, {}),
    ("system_multi_turn_gen", [SYSTEM, U1, A1, U2], True, {}),
    ("ends_with_assistant_nogen", [U1, A1], False, {}),
    ("non_ascii_gen", [NON_ASCII], True, {}),
    ("padded_whitespace_gen", [PADDED], True, {}),
    ("non_alternating_gen", [U1, U2], True, {}),
    ("thinking_history_gen", [U1, THINKING, U2], True, {}),
    ("tool_role_gen", [U1, TOOL_RESULT], True, {}),
]
EXTRA = {
    "qwen3": [
        ("enable_thinking_false_gen", [U1], True, {"enable_thinking": False}),
        ("enable_thinking_true_gen", [U1], True, {"enable_thinking": True}),
        ("enable_thinking_false_multi_gen", [SYSTEM, U1, A1, U2], True, {"enable_thinking": False}),
        ("tools_gen", [SYSTEM, U1], True, {"tools": TOOLS}),
    ],
    "gpt-oss": [
        ("reasoning_effort_high_gen", [SYSTEM, U1], True, {"reasoning_effort": "high"}),
        ("model_identity_gen", [U1], True, {"model_identity": "You are Tiny, a test model."}),
        ("tools_gen", [SYSTEM, U1], True, {"tools": TOOLS}),
    ],
    "llama4": [
        ("date_string_gen", [SYSTEM, U1], True, {"date_string": "01 Jan 2030"}),
        ("tools_in_user_message_gen", [SYSTEM, U1], True, {"tools": TOOLS}),
        ("tools_in_system_gen", [SYSTEM, U1], True, {"tools": TOOLS, "tools_in_user_message": False}),
    ],
}


def tokenizer_for(template, bos, eos):
    # Any tokenizer will do for rendering: a one-word WordLevel model carrying the special tokens.
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    kwargs = {}
    if bos is not None:
        kwargs["bos_token"] = bos
    if eos is not None:
        kwargs["eos_token"] = eos
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **kwargs)
    tok.chat_template = template
    return tok


def main():
    cases = []
    for name in TEMPLATES:
        with open(os.path.join(FIXTURES, f"{name}.jinja"), encoding="utf-8") as f:
            template = f.read()
        with open(os.path.join(FIXTURES, f"{name}.json"), encoding="utf-8") as f:
            special = json.load(f)
        tok = tokenizer_for(template, special.get("bos_token"), special.get("eos_token"))
        for case, messages, agp, extra in CONVERSATIONS + EXTRA.get(name, []):
            entry = {
                "template": name,
                "case": case,
                "messages": messages,
                "add_generation_prompt": agp,
                "vars": extra,
            }
            kwargs = dict(extra)
            # transformers takes `tools` as its own argument; the Rust side takes it as a variable.
            tools = kwargs.pop("tools", None)
            try:
                entry["expected"] = tok.apply_chat_template(
                    messages, tools=tools, tokenize=False, add_generation_prompt=agp, **kwargs
                )
            except jinja2.exceptions.TemplateError as e:
                entry["error"] = str(e)
            cases.append(entry)
    out = {
        "generated_by": f"tests/make_chat_fixtures.py with transformers {transformers.__version__}, "
        f"jinja2 {jinja2.__version__}",
        "fixed_time_unix": FIXED_TIME_UNIX,
        "cases": cases,
    }
    path = os.path.join(FIXTURES, "expected.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    errors = sum("error" in c for c in cases)
    print(f"wrote {path}: {len(cases)} cases ({errors} expected errors)", file=sys.stderr)


if __name__ == "__main__":
    main()
