"""The base of every config section: strict, frozen, and each field marked by what it does to a result.

A field is one of three kinds (its `version` in the field's JSON schema):

- science (the default): changing it can change a stage's result, so every stage that reads it hashes it;
- execution (`execution_field`): where or how fast the work runs (batch sizes, workers, chunking, device
  placement, reports); it never changes a result, so no stage version hashes it;
- content (`content_field`): it locates a file (a scorer checkpoint, a lexicon) whose content hash enters the
  version instead of the string.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FieldKind = Literal["science", "execution", "content"]


class ConfigError(ValueError):
    """A config value or key is invalid; the message is one line naming the key."""


def execution_field(*args: Any, **kwargs: Any) -> Any:
    """Return a pydantic Field marked as an execution setting: it never changes a result, no version hashes it."""
    return Field(*args, json_schema_extra={"version": "execution"}, **kwargs)


def content_field(*args: Any, **kwargs: Any) -> Any:
    """Return a pydantic Field that locates a file: the file's content hash, not this value, enters the version."""
    return Field(*args, json_schema_extra={"version": "content"}, **kwargs)


class Strict(BaseModel):
    """A config model: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Section(Strict):
    """A config section, whose fields are science settings unless marked execution or content."""

    @classmethod
    def field_kind(cls, name: str) -> FieldKind:
        """Return whether field `name` is a science, execution or content setting."""
        extra = cls.model_fields[name].json_schema_extra
        return extra.get("version", "science") if isinstance(extra, dict) else "science"  # type: ignore[return-value]

    @classmethod
    def science_fields(cls) -> tuple[str, ...]:
        """Return the names of the fields that can change a result (hashed by the stages that read them)."""
        return tuple(n for n in cls.model_fields if cls.field_kind(n) == "science")

    def science(self, *names: str) -> dict[str, Any]:
        """Return the science fields' values (only `names` when given; each must be a science field)."""
        fields = self.science_fields()
        wrong = [n for n in names if n not in fields]
        if wrong:
            raise ValueError(f"{type(self).__name__}: not science fields: {', '.join(wrong)}")
        return self.model_dump(include=set(names or fields))
