"""Drives a running `attn serve` with the official `openai` Python client.

Usage: python openai_client.py BASE_URL GEN_MODEL EMBED_MODEL [TOOL_MODEL]

Checks chat (non-streaming and streaming), completions with logprobs and
echo (what evaluation harnesses use to score text), embeddings (float and
the client's default base64), and errors the client surfaces; with
TOOL_MODEL (a model whose chat template renders tools), tool calls:
non-streaming, streamed deltas, and a tool result sent back. With
ATTN_API_KEY set (as the server has it), the client sends that key and a
wrong key must be refused. Exits non-zero with a message on the first
failure.
"""

import json
import math
import os
import sys

import openai

base, gen, emb = sys.argv[1], sys.argv[2], sys.argv[3]
tool_model = sys.argv[4] if len(sys.argv) > 4 else None
key = os.environ.get("ATTN_API_KEY", "unused")
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


models = {m.id for m in client.models.list().data}
check({gen, emb} <= models, f"/v1/models lists {gen} and {emb}: {models}")

# Chat, non-streaming.
r = client.chat.completions.create(
    model=gen,
    messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}],
    max_tokens=16,
    temperature=0,
)
text = r.choices[0].message.content
check(r.object == "chat.completion" and isinstance(text, str) and len(text) > 0, f"chat reply {text!r}")
check(r.choices[0].finish_reason in ("stop", "length"), "chat finish_reason")
check(r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0, f"chat usage {r.usage}")
check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "chat usage adds up")

# Chat, streaming: the same text as the non-streaming call (greedy).
stream = client.chat.completions.create(
    model=gen,
    messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the capital of France?"}],
    max_tokens=16,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, finish, usage, ids = [], None, None, set()
for chunk in stream:
    ids.add(chunk.id)
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
check("".join(pieces) == text, f"streamed chat equals the non-streamed reply ({''.join(pieces)!r})")
check(finish in ("stop", "length") and len(ids) == 1, "stream has one id and a finish_reason")
check(usage is not None and usage.completion_tokens == r.usage.completion_tokens, f"stream usage {usage}")

# Completions with logprobs and echo: score a text.
prompt = "The quick brown fox jumps over the lazy dog"
r = client.completions.create(model=gen, prompt=prompt, max_tokens=4, temperature=0, logprobs=3, echo=True)
c = r.choices[0]
check(c.text.startswith(prompt), "echo returns the prompt first")
lp = c.logprobs
n_prompt = r.usage.prompt_tokens
check(len(lp.tokens) == n_prompt + r.usage.completion_tokens, f"{len(lp.tokens)} logprob tokens")
check(lp.token_logprobs[0] is None, "the first prompt token has no logprob")
check(all(x is not None and x <= 0 and math.isfinite(x) for x in lp.token_logprobs[1:]), "logprobs are finite and <= 0")
check(all(len(t) <= 3 for t in lp.top_logprobs[1:]), "top_logprobs hold at most 3 entries")
# Greedy: each generated token is the most likely one.
for i in range(n_prompt, len(lp.tokens)):
    best = max(lp.top_logprobs[i].values())
    check(abs(lp.token_logprobs[i] - best) < 1e-4, f"generated token {i} is the argmax")

# Scoring only (max_tokens 0 with echo), as lm-eval-harness does.
r0 = client.completions.create(model=gen, prompt=prompt, max_tokens=0, logprobs=1, echo=True)
check(r0.choices[0].text == prompt and r0.usage.completion_tokens == 0, "max_tokens 0 scores the prompt only")
check(
    all(abs(a - b) < 1e-3 for a, b in zip(r0.choices[0].logprobs.token_logprobs[1:], lp.token_logprobs[1:n_prompt])),
    "prompt logprobs agree between the two calls",
)

# Streaming completions.
s = client.completions.create(model=gen, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)
streamed = "".join(ch.choices[0].text for ch in s if ch.choices)
full = client.completions.create(model=gen, prompt="Once upon a time", max_tokens=8, temperature=0).choices[0].text
check(streamed == full, f"streamed completion equals the non-streamed one ({full!r})")

# Embeddings: the client asks for base64 by default and decodes it.
e = client.embeddings.create(model=emb, input=["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue."])
vecs = [d.embedding for d in e.data]
check(len(vecs) == 3 and all(len(v) == 384 for v in vecs), "three 384-dim embeddings")
norm = [math.sqrt(sum(x * x for x in v)) for v in vecs]
check(all(abs(n - 1) < 1e-4 for n in norm), "embeddings are L2-normalised")
cos = lambda a, b: sum(x * y for x, y in zip(a, b))
check(cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]), "related sentences are closer")
f = client.embeddings.create(model=emb, input="The sky is blue.", encoding_format="float")
check(max(abs(a - b) for a, b in zip(f.data[0].embedding, vecs[2])) < 1e-5, "float and base64 encodings agree")
check(e.usage.prompt_tokens > 0, "embedding usage")

# Errors arrive as the client's exception types.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    check(False, "an unknown model is an error")
except openai.NotFoundError as err:
    check("no-such-model" in str(err), f"unknown model: {err}")
try:
    client.completions.create(model=gen, prompt="x", temperature=5)
    check(False, "temperature 5 is an error")
except openai.BadRequestError as err:
    check("temperature" in str(err), f"bad temperature: {err}")

# Tool calls.
if tool_model:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=tool_model, messages=ask, tools=[weather], temperature=0, max_tokens=64)
    m = r.choices[0].message
    check(r.choices[0].finish_reason == "tool_calls" and m.tool_calls, f"a tool call comes back: {m}")
    call = m.tool_calls[0]
    args = json.loads(call.function.arguments)
    check(call.type == "function" and call.function.name == "get_weather" and call.id, f"tool call {call}")
    check("paris" in str(args.get("city", "")).lower(), f"tool call arguments {args}")

    stream = client.chat.completions.create(
        model=tool_model, messages=ask, tools=[weather], tool_choice="auto", temperature=0, max_tokens=64, stream=True
    )
    calls, finish = {}, None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                e = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                e["id"] = d.id or e["id"]
                e["name"] += (d.function.name or "") if d.function else ""
                e["arguments"] += (d.function.arguments or "") if d.function else ""
            if c.finish_reason:
                finish = c.finish_reason
    check(finish == "tool_calls" and len(calls) == 1, f"streamed tool call, finish {finish}: {calls}")
    check(
        calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == args and calls[0]["id"],
        f"streamed call equals the non-streamed one: {calls[0]}",
    )

    follow = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 18, "sky": "sunny"})},
    ]
    r2 = client.chat.completions.create(model=tool_model, messages=follow, tools=[weather], temperature=0, max_tokens=48)
    check(r2.usage.prompt_tokens > r.usage.prompt_tokens, "the tool result goes back into the prompt")
    check(r2.choices[0].finish_reason in ("stop", "length", "tool_calls"), f"reply after the tool result: {r2.choices[0]}")

    # A forced call: decoding is held to a call of the named tool, arguments valid under its schema.
    clock = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
        },
    }
    joke = [{"role": "user", "content": "Tell me a joke."}]
    for choice, names in [({"type": "function", "function": {"name": "get_time"}}, {"get_time"}), ("required", {"get_weather", "get_time"})]:
        r3 = client.chat.completions.create(
            model=tool_model, messages=joke, tools=[weather, clock], tool_choice=choice, temperature=0, max_tokens=64
        )
        c3 = r3.choices[0]
        check(c3.finish_reason == "tool_calls" and c3.message.tool_calls, f"tool_choice {choice}: {c3}")
        f3 = c3.message.tool_calls[0].function
        a3 = json.loads(f3.arguments)
        want = "tz" if f3.name == "get_time" else "city"
        check(f3.name in names and isinstance(a3.get(want), str), f"forced call {f3}")

    try:
        client.chat.completions.create(model=gen, messages=ask, tools=[weather], max_tokens=4)
        check(False, "tools on a model whose template has none are an error")
    except openai.BadRequestError as err:
        check("tools" in str(err), f"tools refused: {err}")

if "ATTN_API_KEY" in os.environ:
    try:
        openai.OpenAI(base_url=base + "/v1", api_key="wrong-key", max_retries=0).models.list()
        check(False, "a wrong API key is refused")
    except openai.AuthenticationError as err:
        check(err.code == "invalid_api_key", f"wrong API key: {err}")

print("all openai client checks passed")
