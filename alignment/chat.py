"""Chat with a model in the terminal: ``python -m alignment.chat <run dir or model>``.

The model is a run directory (the trained ``model/`` that ``launch.py`` left there), a model or LoRA-adapter folder
(the adapter loads over its base model), a hub id or an ``embedded:`` name, loaded as the local server loads it
(:meth:`alignment.inference.engine.Engine.load`). Each line typed is a user turn; the answer streams to stdout
token by token and joins the history, so the next turn sees the whole conversation, rendered with the tokenizer's
chat template. Commands: ``/reset`` clears the history, ``/system <text>`` sets the system prompt (``/system``
alone removes it) and clears the history, ``/history`` prints the conversation, ``/exit`` (or end of input) quits.
Ctrl-C during an answer stops it and drops that turn.

Sampling: ``--temperature`` (0 is greedy), ``--top-p``, ``--max-new-tokens`` per answer, and ``--seed``, which
seeds the session once (so the same inputs give the same answers). Loading messages go to stderr; stdout carries
the conversation only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from alignment.inference.engine import Completion, Delta, Engine, Event, Job, SamplingKey

PROMPT = ">>> "
"""Shown before each user turn."""
COMMANDS = "/reset, /system <text>, /history, /exit"


class Chat:
    """A conversation with a model: its history, system prompt and sampling settings."""

    def __init__(self, engine: Engine, *, system: str | None, key: SamplingKey, max_new_tokens: int) -> None:
        self.engine = engine
        self.system = system
        self.key = key
        self.max_new_tokens = max_new_tokens
        self.history: list[dict[str, str]] = []
        """User and assistant turns so far (the system prompt is not part of it)."""

    def messages(self) -> list[dict[str, str]]:
        """The conversation sent to the model: the system prompt (if any), then the history."""
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        return [*system, *self.history]

    def reply(self, text: str, write: Callable[[str], Any]) -> Completion:
        """Answer a user turn, streaming the answer's text to ``write`` as it is generated; both join the history.

        A KeyboardInterrupt stops the answer and leaves the history as it was.
        """
        user = {"role": "user", "content": text}
        prompt_ids = self.engine.render([*self.messages(), user])

        def emit(event: Event) -> None:
            if isinstance(event, Delta) and event.text:
                write(event.text)

        job = Job(prompt_ids, 1, self.max_new_tokens, self.key, [], done=lambda _: None, emit=emit)
        (completion,) = self.engine.run([job])[0]
        self.history = [*self.history, user, {"role": "assistant", "content": completion.text}]
        return completion


def _command(chat: Chat, line: str, out: TextIO) -> bool:
    """Run a ``/`` command; False for ``/exit``."""
    name, _, argument = line.partition(" ")
    if name == "/exit":
        return False
    if name == "/reset":
        chat.history = []
        print("(history cleared)", file=out)
    elif name == "/system":
        chat.system = argument.strip() or None
        chat.history = []
        print(
            "(system prompt set, history cleared)" if chat.system else "(no system prompt, history cleared)", file=out
        )
    elif name == "/history":
        for message in chat.messages():
            print(f"{message['role']}: {message['content']}", file=out)
        print(f"({len(chat.history)} messages)", file=out)
    else:
        print(f"unknown command {name} (commands: {COMMANDS})", file=out)
    return True


def repl(chat: Chat, read: Callable[[str], str], out: TextIO) -> None:
    """Read lines with ``read(prompt)`` until ``/exit`` or end of input; answer each, streaming it to ``out``."""

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    while True:
        try:
            line = read(PROMPT).strip()
        except EOFError:
            out.write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            if not _command(chat, line, out):
                return
            continue
        try:
            chat.reply(line, write)
        except KeyboardInterrupt:
            write("\n(interrupted: this turn is dropped)")
        write("\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alignment.chat", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="run directory, model or LoRA-adapter folder, hub id or embedded: name")
    parser.add_argument("--system", default=None, help="system prompt (default: none, the template's own)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus mass (default 1: off)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="per answer")
    parser.add_argument("--seed", type=int, default=None, help="seed the session once, for repeatable answers")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Load the model, then chat on stdin/stdout until ``/exit`` or end of input."""
    args = _parser().parse_args(argv)
    if args.temperature < 0 or args.max_new_tokens < 1 or (args.top_p is not None and not 0 < args.top_p <= 1):
        raise SystemExit("--temperature must be >= 0, --max-new-tokens >= 1 and --top-p in (0, 1]")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # loading prints (the parameter table) stay off the conversation
            engine = Engine.load(args.model, args.dtype)
    except (OSError, ValueError) as err:  # a wrong path or name: say so, without a traceback
        raise SystemExit(f"cannot load {args.model}: {err}") from None
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # line editing and arrow-key recall where the platform has it
            importlib.import_module("readline")
    chat = Chat(
        engine,
        system=args.system,
        key=SamplingKey(args.temperature, args.top_p, None),
        max_new_tokens=args.max_new_tokens,
    )
    print(f"chatting with {args.model} (commands: {COMMANDS}; Ctrl-D quits)")
    repl(chat, input, sys.stdout)


if __name__ == "__main__":
    main()
