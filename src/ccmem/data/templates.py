"""Fact templates for the ``dialogs`` generator, read from a small line-oriented text file.

The wordings live in a data file (``templates/facts.txt``), not in code, so that they can be reviewed,
extended and held out like data. Syntax (blank lines and ``#`` comments ignored)::

    ack: Got it, thanks!                 # assistant replies to a turn that stated a fact (global)
    lead: Long day at work today.        # a sentence a user may say before a fact (global)
    tail: Anyway, how are you?           # ... or after it (global)
    kind: city                           # a fact kind; "kind: city @test" holds the kind out for test only
    values: Lisbon | Oslo | Nairobi      # its values (several lines append)
    say: I live in {value}.              # ways to state it; say@validation / say@test: reserved for that split
    fix: Actually, I moved to {value}; I left {old} in May.   # a correction ({old}: the earlier value)
    ask: In which city do I live?        # the question at the end (no placeholder)
    answer: You live in {value}.         # an answer sentence (optional; else the bare value)
    include: facts.txt                   # every line of another file first (relative to this one)

``include:`` builds a wider bank on top of another (``templates/facts-wide.txt`` adds exact-string and
other-people kinds to the packaged ``facts.txt``); a kind may still be defined only once in all of them.

A template belongs to exactly one split; :meth:`TemplateBank.check_disjoint` refuses a bank whose test (or
validation) split shares a wording with training, and every error names the file, the line and what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "validation", "test")
SLOTS = ("say", "fix", "ask", "answer")
GLOBALS = ("ack", "lead", "tail")
#: Placeholders each template slot may use, and those it must use exactly once.
ALLOWED = {"say": {"value"}, "fix": {"value", "old"}, "ask": set(), "answer": {"value"}}
REQUIRED = {"say": {"value"}, "fix": {"value"}, "ask": set(), "answer": {"value"}}
DEFAULT_FILE = Path(__file__).parent / "templates" / "facts.txt"
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_KEY = re.compile(r"^(?P<slot>[a-z]+)(?:@(?P<split>[a-z]+))?$")
_IDENT = re.compile(r"^[a-z][a-z0-9_]*$")


class TemplateError(ValueError):
    """A template file that cannot be used; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class Template:
    text: str
    split: str
    where: str  # "<file>:<line>"

    def render(self, **values: str) -> str:
        out = self.text
        for name, value in values.items():
            out = out.replace("{" + name + "}", value)
        return out


@dataclass
class FactKind:
    name: str
    held_out: bool  # only in test dialogs
    where: str
    values: list[str] = field(default_factory=list)
    templates: dict[str, list[Template]] = field(default_factory=lambda: {slot: [] for slot in SLOTS})

    def for_split(self, slot: str, split: str) -> list[Template]:
        """The ``slot`` templates a dialog of ``split`` may use (a held-out kind's are all test templates)."""
        if self.held_out:
            return self.templates[slot] if split == "test" else []
        return [t for t in self.templates[slot] if t.split == split]

    def in_split(self, split: str) -> bool:
        return split == "test" or not self.held_out


@dataclass
class TemplateBank:
    path: Path
    acks: list[str]
    leads: list[str]
    tails: list[str]
    kinds: dict[str, FactKind]

    def kinds_for(self, split: str) -> list[FactKind]:
        return [k for k in self.kinds.values() if k.in_split(split)]

    def check_disjoint(self) -> None:
        """Refuse a bank whose splits share a wording (the test would not measure new wordings)."""
        seen: dict[str, Template] = {}
        for kind in self.kinds.values():
            for slot in SLOTS:
                for t in kind.templates[slot]:
                    split = "test" if kind.held_out else t.split
                    key = " ".join(t.text.lower().split())
                    other = seen.get(key)
                    if other is not None and other.split != split:
                        raise TemplateError(
                            f"{t.where}: this {slot} template is also used by the {other.split} split "
                            f"({other.where}); a {split} template must not appear in another split: "
                            f"reword one of them or give both the same @split tag"
                        )
                    seen.setdefault(key, Template(t.text, split, t.where))

    def check_complete(self, minimum: dict[str, int] | None = None) -> None:
        """Every kind has values and, for each split it appears in, a way to state and to ask it."""
        for kind in self.kinds.values():
            if len(kind.values) < 2:
                raise TemplateError(f"{kind.where}: kind {kind.name!r} needs at least 2 values")
            for split in SPLITS:
                if not kind.in_split(split):
                    continue
                for slot in ("say", "ask"):
                    if not kind.for_split(slot, split):
                        tag = "" if kind.held_out or split == "train" else f"@{split}"
                        raise TemplateError(
                            f"{kind.where}: kind {kind.name!r} has no {slot}{tag} template for the {split} split"
                        )


def _placeholders(text: str, slot: str, where: str) -> None:
    names = _PLACEHOLDER.findall(text)
    for name in names:
        if name not in ALLOWED[slot]:
            allowed = ", ".join("{" + n + "}" for n in sorted(ALLOWED[slot])) or "none"
            raise TemplateError(
                f"{where}: unknown placeholder {{{name}}} in a {slot} template (allowed there: {allowed})"
            )
    stray = _PLACEHOLDER.sub("", text)
    if "{" in stray or "}" in stray:
        raise TemplateError(f"{where}: unbalanced brace in {text!r}")
    for name in REQUIRED[slot]:
        if names.count(name) != 1:
            raise TemplateError(f"{where}: a {slot} template must contain {{{name}}} exactly once: {text!r}")
    if slot == "fix" and names.count("old") > 1:
        raise TemplateError(f"{where}: {{old}} may appear at most once: {text!r}")


def parse_templates(path: str | Path = DEFAULT_FILE) -> TemplateBank:
    """Read a template file (syntax in the module docstring); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no template file at {path}")
    globals_: dict[str, list[str]] = {g: [] for g in GLOBALS}
    kinds: dict[str, FactKind] = {}
    _read_into(path, globals_, kinds, (), set())
    if not kinds:
        raise TemplateError(f"{path}: no 'kind:' line, so no fact to generate")
    for g in ("ack",):
        if not globals_[g]:
            raise TemplateError(f"{path}: needs at least one '{g}:' line")
    bank = TemplateBank(path, globals_["ack"], globals_["lead"], globals_["tail"], kinds)
    bank.check_complete()
    bank.check_disjoint()
    return bank


def _read_into(
    path: Path,
    globals_: dict[str, list[str]],
    kinds: dict[str, FactKind],
    including: tuple[Path, ...],
    included: set[Path],
) -> None:
    """Add the lines of one template file (and of the files it includes, first) to ``globals_`` and ``kinds``."""
    kind: FactKind | None = None
    for line_no, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{line_no}"
        key, sep, text = line.partition(":")
        text = text.strip()
        if not sep or not text:
            raise TemplateError(f"{where}: expected 'key: text', got {line!r}")
        if key == "include":
            if kind is not None:
                raise TemplateError(f"{where}: 'include:' must come before the first 'kind:' line")
            target = (path.parent / text).resolve()
            if target == path.resolve() or target in including:
                raise TemplateError(f"{where}: {text} includes itself (directly or through another file)")
            if target in included:
                raise TemplateError(f"{where}: {text} is already included (each file once)")
            included.add(target)
            if not target.is_file():
                raise TemplateError(f"{where}: no template file {text} to include (looked for {target})")
            _read_into(target, globals_, kinds, (*including, path.resolve()), included)
            continue
        if key == "kind":
            name, _, tag = text.partition("@")
            name = name.strip()
            if not _IDENT.match(name):
                raise TemplateError(f"{where}: a kind name must be lowercase letters, digits and _, got {name!r}")
            if tag.strip() not in ("", "test"):
                raise TemplateError(f"{where}: a kind can only be held out with '@test', got '@{tag.strip()}'")
            if name in kinds:
                raise TemplateError(f"{where}: kind {name!r} is defined twice (first at {kinds[name].where})")
            kind = kinds[name] = FactKind(name, bool(tag.strip()), where)
            continue
        if key in GLOBALS:
            if _PLACEHOLDER.search(text) or "{" in text or "}" in text:
                raise TemplateError(f"{where}: {key} lines take no placeholder: {text!r}")
            globals_[key].append(text)
            continue
        if key == "values":
            if kind is None:
                raise TemplateError(f"{where}: 'values:' before any 'kind:' line")
            values = [v.strip() for v in text.split("|")]
            for v in values:
                if not v or "{" in v or "}" in v:
                    raise TemplateError(f"{where}: empty value or a value with a brace in {text!r}")
                if v in kind.values:
                    raise TemplateError(f"{where}: value {v!r} listed twice in kind {kind.name!r}")
                kind.values.append(v)
            continue
        match = _KEY.match(key)
        if match is None or match["slot"] not in SLOTS:
            known = ", ".join([*GLOBALS, "include", "kind", "values", *SLOTS])
            raise TemplateError(f"{where}: unknown key {key!r} (known: {known}, with @validation/@test on slots)")
        slot, split = match["slot"], match["split"] or "train"
        if split not in SPLITS:
            raise TemplateError(f"{where}: unknown split '@{split}' (use @validation or @test)")
        if kind is None:
            raise TemplateError(f"{where}: '{key}:' before any 'kind:' line")
        if kind.held_out and split != "train":
            raise TemplateError(f"{where}: kind {kind.name!r} is held out (@test): its templates take no @split tag")
        _placeholders(text, slot, where)
        kind.templates[slot].append(Template(text, split, where))
