"""The official `openai` Python client against `moe-run serve` (tiny-kjv) on 127.0.0.1.

Run by tests/openai_client.sh (which installs the pinned client into a venv and starts the
server); `python tests/openai_client.py http://127.0.0.1:PORT/v1`. Exits non-zero on the first
failed check.
"""
import sys
import threading

import openai
from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)


def check(cond, what):
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}")


models = client.models.list()
check([m.id for m in models.data] == ["tiny-kjv"], "models.list names tiny-kjv")

# Completions, whole and streamed: same greedy text.
r = client.completions.create(model="tiny-kjv", prompt="And God said", max_tokens=16, temperature=0)
text = r.choices[0].text
check(len(text) > 0 and r.choices[0].finish_reason == "length", "completion text, finish_reason length")
check(r.usage.completion_tokens == 16 and r.usage.total_tokens == r.usage.prompt_tokens + 16, "completion usage")
parts = []
usage = None
for chunk in client.completions.create(model="tiny-kjv", prompt="And God said", max_tokens=16,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True}):
    if chunk.choices:
        parts.append(chunk.choices[0].text)
    if chunk.usage:
        usage = chunk.usage
check("".join(parts) == text, "streamed completion equals the whole one")
check(usage is not None and usage.completion_tokens == 16, "streamed usage chunk")

# Chat completions, whole and streamed.
msgs = [{"role": "system", "content": "The book of Genesis."},
        {"role": "user", "content": "In the beginning"}]
c = client.chat.completions.create(model="tiny-kjv", messages=msgs, max_tokens=12, temperature=0)
reply = c.choices[0].message.content
check(c.choices[0].message.role == "assistant" and len(reply) > 0, "chat completion reply")
streamed = []
for chunk in client.chat.completions.create(model="tiny-kjv", messages=msgs, max_tokens=12,
                                            temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        streamed.append(chunk.choices[0].delta.content)
check("".join(streamed) == reply, "streamed chat equals the whole one")

# Sampling with a seed is reproducible.
a = client.completions.create(model="tiny-kjv", prompt="Blessed are", max_tokens=12,
                              temperature=0.9, top_p=0.9, seed=7).choices[0].text
b = client.completions.create(model="tiny-kjv", prompt="Blessed are", max_tokens=12,
                              temperature=0.9, top_p=0.9, seed=7).choices[0].text
check(a == b, "same seed, same sample")

# Stop strings.
s = client.completions.create(model="tiny-kjv", prompt="And God said", max_tokens=16,
                              temperature=0, stop=[text[4:6]])
check(s.choices[0].finish_reason == "stop" and s.choices[0].text == text[:text.find(text[4:6])],
      "stop string cuts the text")

# Errors surface as the client's typed exceptions.
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    check(False, "unknown model refused")
except openai.NotFoundError as e:
    check(e.status_code == 404 and "no-such-model" in str(e), "unknown model -> NotFoundError 404")
try:
    client.completions.create(model="tiny-kjv", prompt="And God said " * 300, max_tokens=2)
    check(False, "long prompt refused")
except openai.BadRequestError as e:
    check("512" in str(e), "prompt past the context -> BadRequestError naming 512")
try:
    client.completions.create(model="tiny-kjv", prompt="x", max_tokens=2, temperature=5)
    check(False, "temperature 5 refused")
except openai.BadRequestError as e:
    check("temperature" in str(e), "temperature out of range -> BadRequestError")

# Concurrent streams all complete.
results = {}


def one(i):
    out = client.completions.create(model="tiny-kjv", prompt="And God said", max_tokens=10,
                                    temperature=0)
    results[i] = out.choices[0].text


threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
check(len(results) == 8 and len(set(results.values())) == 1, "8 concurrent greedy requests agree")
print("openai client: all checks passed")
