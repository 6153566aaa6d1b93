"""Training sources for curated prompt banks: one domain of text per source, one prompt (or K) per source.

A source is a name and its texts. `train-prompts --data NAME=FILE` (repeated) reads one source per file;
`--source-field F` splits one file by a record field (`rechannel sources` writes the built-in ones so,
ops/evaluation/sources.py). Each source's texts are packed into documents long enough to draw training
windows from, apart from the other sources', so that no window crosses two sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError
from ..core.records import read_jsonl

PACK_CHARS_PER_TOKEN = 8  # a packed training document holds at least this many characters per window token


@dataclass(frozen=True)
class Source:
    name: str
    texts: list[str]  # training texts (documents, or rendered question + answer)
    inputs: list[str]  # what routing reads of each row (the question alone); the texts when not given apart


def parse_source_spec(spec: str) -> tuple[str, str]:
    """`NAME=FILE` or `FILE` (named by the file's stem) -> (name, file)."""
    name, sep, path = spec.partition("=")
    if not sep:
        return Path(spec).stem, spec
    if not name or not path:
        raise UserError(f"--data {spec!r}: expected FILE or NAME=FILE")
    return name, path


def pack_texts(texts: list[str], seqlen: int) -> list[str]:
    """Consecutive texts joined by blank lines into documents of at least PACK_CHARS_PER_TOKEN * seqlen
    characters, so that windows of `seqlen` tokens can be drawn from sources of short rows (a question and
    its answer); a long document stays alone. Windows never cross sources: each source is packed apart."""
    out, part, size = [], [], 0
    for t in texts:
        part.append(t)
        size += len(t) + 2
        if size >= PACK_CHARS_PER_TOKEN * seqlen:
            out.append("\n\n".join(part))
            part, size = [], 0
    if part:
        out.append("\n\n".join(part))
    return out


def load_sources(data: str | list[str] | tuple[str, ...], field: str, docs: str, source_field: str | None = None,
                 input_field: str | None = None) -> list[Source]:
    """The training sources: one per `NAME=FILE` (or `FILE`), or one file split by `source_field` (sources in
    order of first appearance); `docs` selects each file's records (START:END) before the split;
    `input_field` names what routing reads of a row (default: `field`). Every record is checked before any
    work starts."""
    from ..core.records import parse_range

    specs = [data] if isinstance(data, str) else list(data)
    if not specs:
        raise UserError("--data: give at least one file")
    need = (field, *((input_field,) if input_field else ()))
    if source_field:
        if len(specs) != 1:
            raise UserError("--source-field splits one --data file into sources; give one file")
        by: dict[str, list] = {}
        for r in read_jsonl(specs[0], require=(*need, source_field))[parse_range(docs)]:
            by.setdefault(str(r.field(source_field)), []).append(r)
        if not by:
            raise UserError(f"{specs[0]}: no records in range --docs {docs}")
        return [_source(name, recs, field, input_field) for name, recs in by.items()]
    named = [parse_source_spec(s) for s in specs]
    names = [n for n, _ in named]
    if len(set(names)) < len(names):
        raise UserError(f"--data: two sources share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                        "name them with NAME=FILE")
    out = []
    for name, path in named:
        recs = read_jsonl(path, require=need)[parse_range(docs)]
        if not recs:
            raise UserError(f"{path}: no documents in range --docs {docs}")
        out.append(_source(name, recs, field, input_field))
    return out


def _source(name: str, records: list, field: str, input_field: str | None) -> Source:
    texts = [r.field(field, str) for r in records]
    return Source(name, texts, [r.field(input_field, str) for r in records] if input_field else texts)
