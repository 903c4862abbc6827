"""The OpenAI API's requests and responses for the local server: checked parameters in, JSON objects out.

Every parameter a request may carry is on an explicit allow-list per endpoint (:data:`CHAT_PARAMETERS`,
:data:`COMPLETION_PARAMETERS`); anything else, or a value this server cannot honour (tools, a ``response_format``
other than text, a non-zero penalty, a ``logit_bias``...), is a :class:`RequestError` that the server answers with
400 and the parameter's name in ``error.param``. A parameter sent as ``null`` counts as not sent. Nothing is
accepted and then ignored. ``top_k`` (vLLM's extension: 0 or -1 for no limit) and, on completions,
``add_special_tokens`` (vLLM's, default true) are honoured too.

Chat message content is a string or a list of ``{"type": "text", "text": ...}`` parts, joined with newlines as
vLLM does; other part types are refused by name. Roles are ``system``, ``developer`` (rendered as ``system``),
``user`` and ``assistant``.

Log-probs come in the chat format (``choices[i].logprobs.content``: token, logprob, bytes, top_logprobs) and in the
legacy completions format (``tokens``, ``token_logprobs``, ``top_logprobs`` dicts that also hold the chosen token,
``text_offset`` into the choice's ``text``). ``bytes`` is the UTF-8 of the token's text.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignment.inference.engine import Completion, SamplingKey, TokenLogprob

DEFAULT_MAX_TOKENS = 256
"""Chat completions' ``max_tokens`` when the request sets none."""
DEFAULT_COMPLETION_MAX_TOKENS = 16
"""``/v1/completions``' ``max_tokens`` when the request sets none (OpenAI's and vLLM's default)."""
MAX_TOP_LOGPROBS = 20
"""The most alternatives per token a request may ask for (OpenAI's limit for chat)."""

_SAMPLING = ("temperature", "top_p", "top_k", "seed", "n", "stop", "max_tokens", "stream", "stream_options", "user")
CHAT_PARAMETERS = frozenset(
    {"model", "messages", "max_completion_tokens", "logprobs", "top_logprobs", *_SAMPLING},
)
"""Parameters ``/v1/chat/completions`` honours with any valid value."""
COMPLETION_PARAMETERS = frozenset({"model", "prompt", "logprobs", "echo", "add_special_tokens", *_SAMPLING})
"""Parameters ``/v1/completions`` honours with any valid value."""

_NO_EFFECT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "presence_penalty": (lambda v: v == 0, "0"),
    "frequency_penalty": (lambda v: v == 0, "0"),
    "logit_bias": (lambda v: v == {}, "{}"),
    "response_format": (lambda v: v == {"type": "text"}, '{"type": "text"} (no guided decoding here)'),
    "tools": (lambda v: v == [], "[] (no tool calling here)"),
    "tool_choice": (lambda v: v == "none", '"none" (no tool calling here)'),
    "store": (lambda v: v is False, "false"),
}
"""Parameters accepted only with the value that changes nothing, and that value."""
_CHAT_ONLY_NEUTRAL = frozenset({"tools", "tool_choice", "store", "response_format"})
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class RequestError(ValueError):
    """A request the server cannot honour; answered with ``status`` and the OpenAI error object."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status

    def body(self) -> dict[str, Any]:
        """The OpenAI error object: ``{"error": {message, type, param, code}}``."""
        return error_body(self.message, param=self.param, code=self.status)


def error_body(
    message: str, *, kind: str = "invalid_request_error", param: str | None = None, code: int
) -> dict[str, Any]:
    """An error in the OpenAI API's shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class Generation:
    """What both endpoints ask of the engine, checked."""

    n: int
    """Completions per prompt."""
    max_tokens: int
    """Per-completion token cap."""
    key: SamplingKey
    """Sampling settings."""
    stop: list[str]
    """Stop strings."""
    stream: bool
    """Answer with server-sent events."""
    include_usage: bool
    """Streaming: a last chunk with the token usage (``stream_options.include_usage``)."""


@dataclass(frozen=True)
class ChatRequest:
    """A checked ``/v1/chat/completions`` request."""

    messages: list[dict[str, str]]
    """The conversation, each content a string."""
    generation: Generation
    """Sampling, caps and streaming."""
    top_logprobs: int | None
    """None without ``logprobs``; else the alternatives per token (``top_logprobs``, 0 by default)."""


@dataclass(frozen=True)
class CompletionRequest:
    """A checked ``/v1/completions`` request."""

    prompts: list[str | list[int]]
    """Text prompts, or token-id prompts used as they are."""
    generation: Generation
    """Sampling, caps and streaming."""
    logprobs: int | None
    """None: no log-probs; k: each token's log-prob and its k most likely alternatives."""
    echo: bool
    """Return the prompt before the completion (with its log-probs when ``logprobs`` is set)."""
    add_special_tokens: bool
    """Tokenise text prompts with the tokenizer's special tokens (a BOS for many models)."""


class _Body:
    """Typed reads of a request's parameters; a bad value raises :class:`RequestError` naming the parameter."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def given(self, key: str) -> bool:
        return self.body.get(key) is not None

    def integer(self, key: str, default: int, *, ge: int, le: int | None = None) -> int:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < ge or (le is not None and value > le):
            bounds = f">= {ge}" if le is None else f"between {ge} and {le}"
            raise RequestError(f"'{key}' must be an integer {bounds}, got {json.dumps(value)}", key)
        return value

    def number(self, key: str, *, ge: float = 0.0, gt: float | None = None, le: float | None = None) -> float | None:
        value = self.body.get(key)
        if value is None:
            return None
        bad = not isinstance(value, int | float) or isinstance(value, bool) or value < ge
        if bad or (gt is not None and value <= gt) or (le is not None and value > le):
            raise RequestError(f"'{key}' is out of range or not a number: {json.dumps(value)}", key)
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.body.get(key, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise RequestError(f"'{key}' must be true or false, got {json.dumps(value)}", key)
        return value

    def stops(self) -> list[str]:
        stop = self.body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop
        if stops is None:
            return []
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise RequestError(f"'stop' must be a string or a list of strings, got {json.dumps(stop)}", "stop")
        return [s for s in stops if s]


def _check_parameters(body: dict[str, Any], allowed: frozenset[str], neutral: set[str]) -> None:
    """Refuse every parameter outside ``allowed`` that is neither null nor a no-effect value in ``neutral``."""
    for key, value in body.items():
        if value is None or key in allowed:
            continue
        if key in neutral:
            holds, expected = _NO_EFFECT[key]
            if holds(value):
                continue
            raise RequestError(
                f"{key}={json.dumps(value)} is not supported by this server; it only accepts {expected}", key
            )
        raise RequestError(
            f"parameter '{key}' is not supported by this server (supported: {', '.join(sorted(allowed))})", key
        )


def _check_model(body: Any, served: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if body.get("model") != served:
        raise RequestError(
            f"model {body.get('model')!r} is not served here; this server serves {served!r}", "model", 404
        )
    return body


def _generation(body: _Body, *, max_tokens_key: str, default_max_tokens: int, min_max_tokens: int) -> Generation:
    stream = body.boolean("stream")
    include_usage = False
    options = body.body.get("stream_options")
    if options is not None:
        if not stream:
            raise RequestError("'stream_options' is only allowed with \"stream\": true", "stream_options")
        if not isinstance(options, dict):
            raise RequestError("'stream_options' must be an object", "stream_options")
        for key in options:
            if key != "include_usage":
                raise RequestError(f"'stream_options.{key}' is not supported by this server", f"stream_options.{key}")
        include_usage = _Body(options).boolean("include_usage")
    top_k = body.integer("top_k", -1, ge=-1)
    key = SamplingKey(
        temperature=1.0 if (t := body.number("temperature")) is None else t,
        top_p=body.number("top_p", gt=0.0, le=1.0),
        seed=body.integer("seed", 0, ge=-(2**63)) if body.given("seed") else None,
        top_k=top_k if top_k > 0 else None,
    )
    return Generation(
        n=body.integer("n", 1, ge=1),
        max_tokens=body.integer(max_tokens_key, default_max_tokens, ge=min_max_tokens),
        key=key,
        stop=body.stops(),
        stream=stream,
        include_usage=include_usage,
    )


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise RequestError(f"'{where}' must be a string or a non-empty list of content parts", where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RequestError(
                f"'{where}[{i}]': content part type {kind!r} is not supported by this server (only 'text' parts)",
                f"{where}[{i}].type",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, message in enumerate(raw):
        for key, value in message.items():
            if key not in ("role", "content") and value is not None:
                raise RequestError(f"'messages[{i}].{key}' is not supported by this server", f"messages[{i}].{key}")
        role = message.get("role")
        if role not in _ROLES:
            raise RequestError(
                f"'messages[{i}].role' {role!r} is not supported (one of {', '.join(_ROLES)})", f"messages[{i}].role"
            )
        messages.append(
            {"role": _ROLES[role], "content": _text_content(message.get("content"), f"messages[{i}].content")}
        )
    return messages


def parse_chat(raw: Any, served: str) -> ChatRequest:
    """Check a ``/v1/chat/completions`` body.

    Raises:
        RequestError: a parameter the server cannot honour, or a bad value (400); another model (404).
    """
    body = _check_model(raw, served)
    _check_parameters(body, CHAT_PARAMETERS, set(_NO_EFFECT))
    params = _Body(body)
    max_tokens_key = "max_completion_tokens" if params.given("max_completion_tokens") else "max_tokens"
    generation = _generation(
        params, max_tokens_key=max_tokens_key, default_max_tokens=DEFAULT_MAX_TOKENS, min_max_tokens=1
    )
    top = params.integer("top_logprobs", 0, ge=0, le=MAX_TOP_LOGPROBS)
    logprobs = params.boolean("logprobs")
    if params.given("top_logprobs") and not logprobs:
        raise RequestError("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
    return ChatRequest(_messages(body.get("messages")), generation, top if logprobs else None)


def _prompts(raw: Any) -> list[str | list[int]]:
    def is_ids(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(raw, str) or is_ids(raw):
        prompts = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(p, str) or is_ids(p) for p in raw):
        prompts = list(raw)
    else:
        raise RequestError(
            "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists", "prompt"
        )
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RequestError("'prompt' must not be empty", "prompt")
    return prompts


def parse_completion(raw: Any, served: str) -> CompletionRequest:
    """Check a ``/v1/completions`` body.

    Raises:
        RequestError: a parameter the server cannot honour, or a bad value (400); another model (404).
    """
    body = _check_model(raw, served)
    params = _Body(body)
    n = params.integer("n", 1, ge=1)
    if params.given("best_of") and body["best_of"] != n:  # best_of = n returns all n: nothing to rank
        raise RequestError(f"best_of={json.dumps(body['best_of'])} is not supported by this server (only n)", "best_of")
    if params.given("suffix") and body["suffix"] != "":
        raise RequestError("'suffix' is not supported by this server (no insertion)", "suffix")
    rest = {k: v for k, v in body.items() if k not in ("best_of", "suffix")}
    _check_parameters(rest, COMPLETION_PARAMETERS, set(_NO_EFFECT) - _CHAT_ONLY_NEUTRAL)
    generation = _generation(
        params, max_tokens_key="max_tokens", default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS, min_max_tokens=0
    )
    logprobs = params.integer("logprobs", 0, ge=0, le=MAX_TOP_LOGPROBS) if params.given("logprobs") else None
    add_special = body.get("add_special_tokens")
    return CompletionRequest(
        prompts=_prompts(body.get("prompt")),
        generation=generation,
        logprobs=logprobs,
        echo=params.boolean("echo"),
        add_special_tokens=True if add_special is None else params.boolean("add_special_tokens"),
    )


# --- responses ------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    """A response id: ``chatcmpl-…`` or ``cmpl-…``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completions: list[Completion]) -> dict[str, int]:
    """The ``usage`` object; ``prompt_tokens`` counts each prompt once however many completions it has."""
    generated = sum(c.tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated, "total_tokens": prompt_tokens + generated}


def _token_object(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob]) -> dict[str, Any]:
    """``choices[i].logprobs`` of the chat format: ``{"content": [{token, logprob, bytes, top_logprobs}], ...}``."""
    content = [
        {
            **_token_object(entry.token, entry.logprob if entry.logprob is not None else 0.0),
            "top_logprobs": [_token_object(token, logprob) for token, logprob in entry.top],
        }
        for entry in entries
    ]
    return {"content": content, "refusal": None}


def legacy_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The completions format: parallel lists; ``top_logprobs`` dicts hold the chosen token too (None for none).

    ``offset`` is added to each token's ``text_offset`` (the length of the echoed prompt before a completion).
    """
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [
            None if entry.logprob is None else {**dict(entry.top), entry.token: entry.logprob} for entry in entries
        ],
        "text_offset": [entry.offset + offset for entry in entries],
    }


def chat_response(served: str, prompt_tokens: int, completions: list[Completion]) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None if c.logprobs is None else chat_logprobs(c.logprobs),
            }
            for i, c in enumerate(completions)
        ],
        "usage": usage(prompt_tokens, completions),
    }


def completion_choice(
    index: int, text: str, entries: list[TokenLogprob] | None, finish_reason: str | None, offset: int = 0
) -> dict[str, Any]:
    """One ``choices`` entry of a ``text_completion`` (whole or streamed)."""
    return {
        "index": index,
        "text": text,
        "logprobs": None if entries is None else legacy_logprobs(entries, offset),
        "finish_reason": finish_reason,
    }


def echoed(completion: Completion, prompt_text: str, echo: bool) -> tuple[str, list[TokenLogprob] | None]:
    """The text and log-prob entries of a completion's choice: the prompt's first when echoed."""
    if not echo:
        return completion.text, completion.logprobs
    if completion.logprobs is None:
        return prompt_text + completion.text, None
    shift = len(prompt_text)
    generated = [TokenLogprob(e.token_id, e.token, e.logprob, e.top, e.offset + shift) for e in completion.logprobs]
    return prompt_text + completion.text, [*(completion.prompt_logprobs or []), *generated]


def completion_response(
    served: str, prompt_texts: list[str], results: list[list[Completion]], prompt_tokens: int, *, echo: bool
) -> dict[str, Any]:
    """A ``text_completion`` object: choice ``p * n + j`` is prompt ``p``'s completion ``j``."""
    choices: list[dict[str, Any]] = []
    for prompt_text, completions in zip(prompt_texts, results, strict=True):
        for completion in completions:
            text, entries = echoed(completion, prompt_text, echo)
            choices.append(completion_choice(len(choices), text, entries, completion.finish_reason))
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": served,
        "choices": choices,
        "usage": usage(prompt_tokens, [c for completions in results for c in completions]),
    }


def sse(payload: Any) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
"""The event that ends a stream."""
