"""Talks to `hybrid serve` with the official `openai` Python package, as a customer's application
would, and prints what it got as one JSON object (checked by crates/cli/tests/serve.rs).

usage: client.py BASE_URL MODEL QUESTION
"""

import json
import sys

import openai


def main() -> None:
    base_url, model, question = sys.argv[1:4]
    client = openai.OpenAI(base_url=base_url, api_key="customer-key", max_retries=0)
    out = {"openai_version": openai.__version__}

    out["models"] = [m.id for m in client.models.list().data]

    messages = [{"role": "user", "content": question}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, seed=7
    )
    out["chat"] = {
        "content": chat.choices[0].message.content,
        "role": chat.choices[0].message.role,
        "finish_reason": chat.choices[0].finish_reason,
        "usage": chat.usage.model_dump(),
    }

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    out["chat_stream"] = {"content": "".join(pieces), "chunks": len(pieces), "finish_reason": finish, "usage": usage}

    text = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["."]
    )
    out["completion"] = {
        "text": text.choices[0].text,
        "finish_reason": text.choices[0].finish_reason,
        "usage": text.usage.model_dump(),
    }
    pieces = []
    for chunk in client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stop=["."], stream=True
    ):
        pieces.extend(c.text for c in chunk.choices)
    out["completion_stream"] = "".join(pieces)

    # Sampling with a seed is repeatable.
    sampled = [
        client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=8, temperature=0.9, top_p=0.95, seed=42
        ).choices[0].text
        for _ in range(2)
    ]
    out["sampled_equal"] = sampled[0] == sampled[1]

    try:
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
        out["wrong_model"] = None
    except openai.NotFoundError as e:
        out["wrong_model"] = {"status": e.status_code, "code": e.code}

    print(json.dumps(out))


if __name__ == "__main__":
    main()
