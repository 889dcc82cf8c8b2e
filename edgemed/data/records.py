"""Records and their validation: the line models of edgemed's own formats (VQA, text, probes) and of the public
VQA sets, and the one reader that checks every line of a file and reports every bad one at once.

Schemas (one JSON object per line, UTF-8):

* VQA JSONL: ``{"image": "images/x.png" | null, "question": str, "answer": str, "answer_type": "closed" | "open",
  "system": str, "role": str, "task": str, "id": str | number}``. ``image`` is relative to the JSONL's folder (or
  to ``image_root``); ``answer_type`` may be left out (yes/no answers are then closed, all others open);
  ``system``, ``role``, ``task`` and ``id`` are optional (system prompt, persona tag, task name for per-task
  scores, the record's own id).
* Text JSONL (for text-decoder recipes): ``{"text": str, "title": str}``, one document per line, title optional.
* Probe JSONL (``edgemed parity --probes``): ``{"question": str, "image": path, "system": str}``; the VQA keys
  answer, answer_type, task and role are allowed too, so a VQA file serves as probes.

These are edgemed's own formats, so an unknown key is an error naming it (a misspelt ``"anwser"`` is not
silently dropped). The public sets (VQA-RAD, SLAKE) carry keys of their own, which are kept.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
)
from pydantic_core import PydanticCustomError

from edgemed.errors import DataError

ANSWER_TYPES = ("closed", "open")
MAX_LISTED = 10  # bad lines spelt out in one error; the rest are counted

AnswerType = Literal["closed", "open"]


# ---------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class VQARecord:
    """One visual (or text-only) question with its reference answer.

    Attributes:
        question: The question text.
        answer: The reference answer.
        image: Absolute image path, or None for a text-only question.
        answer_type: "closed" (yes/no and other fixed-choice answers) or "open".
        system: Optional system prompt.
        role: Optional free-form persona tag, passed through to recipes.
        task: Optional task name, used to break scores down by task.
        source: Where the record came from, "file:N" (N: line of a JSONL, record number of a JSON list).
        id: The record's own id in its data file (qid, study id), where the reader knows it (edgemed.datasets).
    """

    question: str
    answer: str
    image: Path | None
    answer_type: AnswerType
    system: str | None = None
    role: str | None = None
    task: str | None = None
    source: str = ""
    id: str | None = None


@dataclass(frozen=True)
class TextRecord:
    """One document of a text corpus.

    Attributes:
        text: The document body.
        source: Where the record came from, "file:line".
        title: Optional title.
    """

    text: str
    source: str
    title: str | None = None


@dataclass(frozen=True)
class ProbeRecord:
    """One parity probe: a prompt (with an optional image and system prompt) every runtime answers."""

    question: str
    image: Path | None
    system: str | None
    source: str


def infer_answer_type(answer: str) -> AnswerType:
    """``closed`` for yes/no answers, ``open`` for everything else."""
    return "closed" if answer.strip().lower().rstrip(".") in ("yes", "no") else "open"


# ---------------------------------------------------------------------------------------------- line models
def _non_empty(v: str) -> str:
    if not v.strip():
        raise PydanticCustomError("empty", "is empty")
    return v


def _answer_type(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, str) and v.strip().lower() in ANSWER_TYPES:
        return v.strip().lower()
    raise PydanticCustomError("answer_type", "must be closed or open")


def _an_id(v: Any) -> Any:
    if v is None or (isinstance(v, str | int) and not isinstance(v, bool)):
        return v
    raise PydanticCustomError("id_type", "must be a string or a number")


def _number_as_text(v: Any) -> Any:
    """Public sets store numeric answers such as 2 as JSON numbers."""
    return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def _loose_answer_type(v: Any) -> Any:
    """Public sets: an unknown answer type is inferred from the answer rather than refused."""
    return v.strip().lower() if isinstance(v, str) and v.strip().lower() in ANSWER_TYPES else None


Text = Annotated[StrictStr, AfterValidator(_non_empty)]
OptText = StrictStr | None


class _Own(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VQALine(_Own):
    """One line of edgemed VQA JSONL."""

    question: Text
    answer: Text
    image: OptText = None
    system: OptText = None
    role: OptText = None
    task: OptText = None
    answer_type: Annotated[AnswerType | None, BeforeValidator(_answer_type)] = None
    id: Annotated[Any, AfterValidator(_an_id)] = None

    def record(self, image: Path | None, source: str) -> VQARecord:
        return VQARecord(self.question, self.answer, image, self.answer_type or infer_answer_type(self.answer),
                         self.system, self.role, self.task, source)


class TextLine(_Own):
    """One line of edgemed text JSONL."""

    text: Text
    title: OptText = None

    def record(self, source: str) -> TextRecord:
        return TextRecord(self.text, source, self.title)


class ProbeLine(_Own):
    """One line of a probe file; the VQA keys a probe does not use are allowed and ignored."""

    question: Text
    image: OptText = None
    system: OptText = None
    answer: Any = None
    answer_type: Any = None
    task: Any = None
    role: Any = None


class _PublicItem(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    question: Text
    answer: Annotated[Text, BeforeValidator(_number_as_text)]
    answer_type: Annotated[AnswerType | None, BeforeValidator(_loose_answer_type)] = None
    task: Any = None  # each set names its own key for it

    def record(self, image: Path, source: str) -> VQARecord:
        task = self.task
        return VQARecord(self.question.strip(), self.answer.strip(), image,
                         self.answer_type or infer_answer_type(self.answer),
                         task=task.strip().lower() if isinstance(task, str) else None, source=source)


class VQARadItem(_PublicItem):
    """One record of VQA-RAD's ``VQA_RAD Dataset Public.json``."""

    image: Text = Field(validation_alias="image_name")
    task: Any = Field(None, validation_alias="question_type")


class SlakeItem(_PublicItem):
    """One record of a SLAKE split file."""

    image: Text = Field(validation_alias="img_name")
    task: Any = Field(None, validation_alias="content_type")


# ---------------------------------------------------------------------------------------------- problems
class Problems:
    """Collects every bad record of one file, then raises them together."""

    def __init__(self, path: Path, unit: str = "lines") -> None:
        self.path = path
        self.unit = unit  # what the file is made of, for the count: lines (JSONL), records (a JSON list)
        self.items: list[str] = []

    def __len__(self) -> int:
        return len(self.items)

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")

    def raise_if_any(self, total: int) -> None:
        """One problem: one line naming file and line; more: a count, then up to MAX_LISTED of them."""
        if not self.items:
            return
        n = len(self.items)
        if n == 1:
            raise DataError(self.items[0])
        head = f"{self.path}: {n} problems in {total} {self.unit}; fix them and run again"
        lines = [head, *(f"  {p}" for p in self.items[:MAX_LISTED])]
        if n > MAX_LISTED:
            lines.append(f"  ... and {n - MAX_LISTED} more")
        raise DataError("\n".join(lines))

    def raise_on_one_line(self, head: str, hint: str, listed: int = 3) -> None:
        """Every problem in one line (for messages a table or a log line carries): the first ``listed`` of them."""
        if self.items:
            more = f" (and {len(self.items) - listed} more)" if len(self.items) > listed else ""
            raise DataError(f"{head}: {'; '.join(self.items[:listed])}{more}; {hint}")


def type_name(v: Any) -> str:
    """The JSON name of a value's type, as a user who wrote the file calls it."""
    return "null" if v is None else {dict: "object", list: "array", bool: "boolean", str: "string"}.get(
        type(v), "number")


def _reason(err: dict[str, Any], obj: dict[str, Any], model: type[BaseModel]) -> tuple[str, str]:
    """(key, what is wrong with it and what to do) for one pydantic error, in the words of edgemed's readers."""
    key = str(err["loc"][0]) if err["loc"] else "(record)"
    v = obj.get(key)
    shown = json.dumps(v, default=str)[:40]
    kind = err["type"]
    if kind == "missing" or (v is None and kind.endswith("_type")):
        return key, f"missing key {key!r} (a non-empty string); add it to the record"
    if kind == "extra_forbidden":
        allowed = ", ".join(f.validation_alias or name for name, f in model.model_fields.items())
        return key, f"unknown key {key!r}; allowed: {allowed}"
    if kind == "empty":
        return key, f"key {key!r} is empty; give a non-empty string"
    if kind == "answer_type":
        return key, (f"key {key!r} must be \"closed\" or \"open\", got {shown}; fix it or leave the key out to infer "
                     "it from the answer")
    if kind == "string_type":
        return key, f"key {key!r} must be a string, got {type_name(v)} ({shown}); write it as a JSON string"
    return key, f"key {key!r} {err['msg']}, got {type_name(v)} ({shown})"


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], obj: dict[str, Any], where: str, problems: Problems) -> M | None:
    """``obj`` as ``model``, or None with every wrong key of it added to ``problems`` (one entry per key)."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        seen: set[str] = set()
        for err in e.errors():
            key, what = _reason(err, obj, model)
            if key not in seen:  # a union reports each of its members: one line per key is enough
                seen.add(key)
                problems.add(where, what)
        return None


# ---------------------------------------------------------------------------------------------- JSONL
def parse_failure(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return getattr(e, "msg", None) or str(e).split("\n")[0][:120] or type(e).__name__


def read_lines(path: Path, empty: str | None = None) -> list[tuple[int, str | None]]:
    """(line number, text or None if not UTF-8) for every non-blank line; ``empty`` replaces the message for a
    file without any."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file; check the path")
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out: list[tuple[int, str | None]] = []
    for i, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((i, line.decode("utf-8")))
        except UnicodeDecodeError:
            out.append((i, None))
    if not out:
        raise DataError(empty or f"{path}: the file is empty; it must hold one JSON record per line")
    return out


def parse_line(text: str | None, where: str, problems: Problems) -> dict[str, Any] | None:
    """One JSONL line as an object, or None with its problem added."""
    if text is None:
        problems.add(where, "not UTF-8 text; save the file as UTF-8")
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        problems.add(where, f"not valid JSON ({e.msg} at column {e.colno}); each line must hold one JSON "
                            "object, e.g. {\"question\": \"...\", \"answer\": \"...\"}")
        return None
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits, or nesting deeper than json's
        problems.add(where, f"not a usable JSON record ({parse_failure(e)}); each line must hold one JSON "
                            "object of strings")
        return None
    if not isinstance(obj, dict):
        problems.add(where, f"is a JSON {type_name(obj)}, not an object; each line must hold one JSON object")
        return None
    return obj


R = TypeVar("R")


def read_jsonl(path: Path, model: type[M], problems: Problems,
               build: Callable[[str, dict[str, Any], M | None], R | None], empty: str | None = None
               ) -> tuple[list[R], int]:
    """Every line of a JSONL file checked against ``model``, in file order: ``build(where, object, record or None)``
    makes each line's result (and adds its own problems, such as an image that must exist; None drops the line).
    Returns the results and the number of lines.

    Nothing is raised for a bad line: the caller calls ``problems.raise_if_any`` at the end, so one error lists
    every bad line of the file.
    """
    lines = read_lines(path, empty)
    out: list[R] = []
    for lineno, text in lines:
        where = f"{path}:{lineno}"
        obj = parse_line(text, where, problems)
        if obj is not None and (made := build(where, obj, validate(model, obj, where, problems))) is not None:
            out.append(made)
    return out, len(lines)
