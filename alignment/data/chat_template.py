"""Render conversations with the tokenizer's chat template and mark the tokens that carry loss.

The loss span of a message is found by rendering, not by searching for header tokens: with ``P_i`` the
rendering of messages ``[0, i)`` and ``Q_i`` that of ``[0, i]``, message ``i`` occupies ``Q_i[len(P_i):]``. Its
header (role markers, and any default system prompt the template adds) ends where a probe string stands when the
message is rendered with the probe as its content; the content starts where the (stripped) content text first
appears after that header, so a short content such as ``"a"`` is never matched inside ``assistant`` or inside a
default system prompt. The span ends after the last non-whitespace character, which for chat templates is the
end-of-turn token (``<|im_end|>``, ``<|eot_id|>``…).
So the role header is never trained, the end-of-turn token always is, and any template works that renders a
conversation's prefix as a prefix of the whole (templates that rewrite earlier turns fail with a clear error).
Token ``t`` carries loss when its character span overlaps a trained span (fast tokenizers' offset mapping).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
IGNORE_INDEX = -100
_PROBE = "\x00content-probe\x00"


class ChatTemplateError(ValueError):
    """The chat template cannot be used to locate message spans."""


@dataclass(frozen=True)
class EvalPrompt:
    """A rendered prompt from the eval split, its reference answer and where the row came from."""

    origin: str
    prompt: str
    reference: str


@dataclass
class TokenizedConversation:
    """Token ids with their labels (``-100`` where no loss) and whether the sequence was cut."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *, generation_prompt: bool = False) -> str:
    """Render messages to text with the tokenizer's chat template."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    assert isinstance(text, str)
    return text


def system_prompt_text(text: str | None, file: str | None, *, names: tuple[str, str]) -> str | None:
    """The system prompt given inline (``names[0]``) or as a file (``names[1]``); None when neither is set.

    The file (e.g. a prompt_opt run's ``best_prompt.txt``) is read as UTF-8, verbatim.

    Raises:
        ValueError: both are set, or the file does not exist.
    """
    if text is not None and file is not None:
        raise ValueError(f"{names[0]} and {names[1]} are both set; give one of them")
    if file is None:
        return text
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"{names[1]}={file}: no such file")
    return path.read_text(encoding="utf-8")


def prepare_messages(
    messages: Sequence[Message], *, system_prompt: str | None, model_support_system_role: bool
) -> list[Message]:
    r"""Inject ``system_prompt`` when the dialogue has no system turn, then fold the system turn if unsupported.

    Folding puts the system text before the first user turn (``system + "\\n\\n" + user``); a system turn not
    followed by a user turn becomes a user turn.
    """
    out = [dict(m) for m in messages]
    if system_prompt is not None and all(m["role"] != "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    if not model_support_system_role and out[0]["role"] == "system":
        if len(out) > 1 and out[1]["role"] == "user":
            out[1]["content"] = out[0]["content"] + "\n\n" + out[1]["content"]
            out.pop(0)
        else:
            out[0]["role"] = "user"
    return out


def _header_end(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], i: int, before: str, upto: str) -> int:
    """Index in ``upto`` where message ``i``'s content may start: after its header, found by rendering a probe.

    Falls back to ``len(before)`` when the template drops the probe or renders a content-dependent header.
    """
    probed = render(tokenizer, [*messages[:i], {**messages[i], "content": _PROBE}])
    at = probed.find(_PROBE, len(before))
    if at < 0 or upto[:at] != probed[:at]:
        return len(before)
    return at


def message_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], roles: Sequence[str], *, first_trained: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation; return the text and the character spans ``[start, end)`` that carry loss.

    Only messages at index ``first_trained`` or later can carry loss (a preference pair trains its completion,
    not the assistant turns of its prompt).

    Raises:
        ChatTemplateError: the template rewrites earlier turns, or drops a trained message's content.
    """
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if i < first_trained or message["role"] not in roles:
            continue
        before = render(tokenizer, messages[:i]) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ChatTemplateError(
                f"the chat template renders message {i} ({message['role']}) differently depending on later turns; "
                "set model.chat_template to a template that keeps earlier turns unchanged"
            )
        content = message["content"].strip()
        header_end = _header_end(tokenizer, messages, i, before, upto)
        start = upto.find(content, header_end) if content else len(upto.rstrip())
        if start < 0:
            raise ChatTemplateError(
                f"the chat template does not render the content of message {i} ({message['role']}) verbatim"
            )
        end = len(upto.rstrip())
        spans.append((start, end))
    return full, spans


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    roles: Sequence[str],
    max_length: int,
    *,
    first_trained: int = 0,
) -> TokenizedConversation:
    """Token ids and labels for one conversation: loss on ``roles`` from message ``first_trained`` on, cut to length."""
    text, spans = message_spans(tokenizer, messages, roles, first_trained=first_trained)
    encoded: Any = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoded["input_ids"]
    labels = [
        token if any(s < span_end and e > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (s, e) in zip(input_ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = len(input_ids) > max_length
    return TokenizedConversation(input_ids[:max_length], labels[:max_length], truncated)
