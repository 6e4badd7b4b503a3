"""Drive a running femtochat server with the official `openai` package.

Usage: python3 openai_client.py BASE_URL MODEL   (BASE_URL like http://127.0.0.1:8000/v1)
Exits non-zero (with the failing check) when anything is off.
"""
import sys

import openai


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)

    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [model], ids

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello!"},
    ]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion", r
    assert r.id.startswith("chatcmpl-"), r.id
    assert r.model == model, r.model
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant", r
    assert r.choices[0].finish_reason in ("stop", "length"), r
    assert isinstance(r.choices[0].message.content, str)
    u = r.usage
    assert u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens, u

    # Streaming gives the same greedy text, then a usage chunk.
    pieces, finish, usage = [], None, None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(pieces) == r.choices[0].message.content, (pieces, r)
    assert finish == r.choices[0].finish_reason, finish
    assert usage is not None and usage.completion_tokens == u.completion_tokens, usage

    # n, seed, stop and the penalties go through the client's own parameter names.
    r2 = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, n=2, seed=11, temperature=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, stop=["\n\n"],
    )
    assert [c.index for c in r2.choices] == [0, 1], r2

    t = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert t.object == "text_completion" and len(t.choices) == 1, t

    # Errors surface as the client's exception classes.
    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=4)
        raise AssertionError("empty messages were accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
    try:
        client.chat.completions.create(model=model, messages=messages, temperature=5)
        raise AssertionError("temperature 5 was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "temperature", e.body
    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
