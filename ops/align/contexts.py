"""What a model is shown before the rollout: the student sees the question; a teacher may see more.

The student sees the record's question field, or a `template:FILE` over the record's fields (`--prompt`). A
teacher's context is `none` (what the student sees), `reference` (that, then the record's reference solution:
the privileged-information teacher) or `template:FILE` (a text file whose `{field}` placeholders are filled
from the record). The text becomes the user turn of the tokenizer's chat template
when it has one, so that a teacher scores the student's own tokens after an assistant header.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import UserError, unknown_choice

REFERENCE = "{question}\n\nA reference solution, to read before you answer:\n{answer}\n\nNow solve the problem."


@dataclass(frozen=True)
class Context:
    name: str  # none, reference, or template:FILE
    template: str  # str.format text over the record's fields

    def fields(self) -> list[str]:
        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f]

    def render(self, record: dict[str, Any]) -> str:
        return self.template.format_map({k: str(v) for k, v in record.items()})


def read_template(spec: str) -> str:
    """The text of `template:FILE`, checked to be a str.format template."""
    path = Path(spec[len("template:"):])
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{spec}: cannot read {path} ({e.strerror})") from None
    try:
        Context(spec, text).fields()
    except ValueError as e:
        raise UserError(f"{spec}: not a template ({e})") from None
    return text


def student_view(spec: str, question_field: str) -> str:
    """The template of what the student sees: `none` (the question field alone) or `template:FILE`."""
    if spec == "none":
        return "{" + question_field + "}"
    if spec.startswith("template:"):
        return read_template(spec)
    raise unknown_choice("prompt", spec, ["none", "template:FILE"])


def get_context(spec: str, view: str) -> Context:
    """A teacher's context around the student's view (a template): none is the view itself, reference adds the
    record's reference solution after it, template:FILE replaces it."""
    if spec == "none":
        return Context(spec, view)
    if spec == "reference":
        return Context(spec, REFERENCE.replace("{question}", view))
    if spec.startswith("template:"):
        return Context(spec, read_template(spec))
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
