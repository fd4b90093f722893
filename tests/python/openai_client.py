"""Drives a Potluck server with the official `openai` package, unchanged.

Usage: openai_client.py BASE_URL API_KEY MODEL. Prints one JSON object with
what each call returned, for the Rust test (tests/tests/openai_client.rs)
to check.
"""
import json
import sys

import openai
from openai import OpenAI

base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=300)
out = {}

r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
out["completion"] = r.choices[0].text
out["completion_finish"] = r.choices[0].finish_reason
out["completion_usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]

stream = client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
)
out["completion_stream"] = "".join(c.choices[0].text for c in stream if c.choices)

messages = [{"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
out["chat"] = chat.choices[0].message.content
out["chat_role"] = chat.choices[0].message.role
out["chat_finish"] = chat.choices[0].finish_reason

parts, usage = [], None
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
for c in stream:
    if c.choices and c.choices[0].delta.content:
        parts.append(c.choices[0].delta.content)
    if c.usage is not None:
        usage = c.usage.completion_tokens
out["chat_stream"] = "".join(parts)
out["chat_stream_usage"] = usage

out["models"] = [m.id for m in client.models.list()]

try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    out["unknown_model"] = "no error"
except openai.NotFoundError as e:
    out["unknown_model"] = e.status_code

try:
    OpenAI(base_url=base, api_key="wrong-key", max_retries=0).models.list()
    out["wrong_key"] = "no error"
except openai.AuthenticationError as e:
    out["wrong_key"] = e.status_code

print(json.dumps(out))
