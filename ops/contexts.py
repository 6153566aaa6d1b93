"""What a model is shown before the rollout: the student sees the question; a teacher may see more.

A context is `none` (the question alone, as the student sees it), `reference` (the question and the record's
reference solution: the privileged-information teacher) or `template:FILE` (a text file whose `{field}`
placeholders are filled from the record). The text becomes the user turn of the tokenizer's chat template
when it has one, so that a teacher scores the student's own tokens after an assistant header.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rechannel.ops.errors import UserError, unknown_choice

REFERENCE = "{question}\n\nA reference solution, to read before you answer:\n{answer}\n\nNow solve the problem."


@dataclass(frozen=True)
class Context:
    name: str  # none, reference, or template:FILE
    template: str  # str.format text over the record's fields

    def fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f]

    def render(self, record: dict[str, Any]) -> str:
        return self.template.format_map({k: str(v) for k, v in record.items()})


def get_context(spec: str, question_field: str) -> Context:
    if spec == "none":
        return Context(spec, "{" + question_field + "}")
    if spec == "reference":
        return Context(spec, REFERENCE.replace("{question}", "{" + question_field + "}"))
    if spec.startswith("template:"):
        path = Path(spec[len("template:"):])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"--context {spec}: cannot read {path} ({e.strerror})") from None
        try:
            Context(spec, text).fields()
        except ValueError as e:
            raise UserError(f"--context {spec}: not a template ({e})") from None
        return Context(spec, text)
    raise unknown_choice("context", spec, ["none", "reference", "template:FILE"])


def prompt_ids(tokenizer: Any) -> Callable[[str], list[int]]:
    """user text -> token ids of the prompt that precedes the model's answer."""
    if getattr(tokenizer, "chat_template", None):
        def chat(text: str) -> list[int]:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                add_generation_prompt=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return chat
    return lambda text: tokenizer(text + "\n")["input_ids"]
