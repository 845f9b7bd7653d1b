"""Class names: the ImageNet-1k table (id, WordNet id, synonyms) or a checkpoint's own names, and `--class` lookup."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from ditcli.errors import UserError

IMAGENET_CLASSES = 1000
WNID = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class ClassInfo:
    """One class: its label id, WordNet id (ImageNet only) and names, the first being the display name."""

    id: int
    names: tuple[str, ...]
    wnid: str | None = None

    @property
    def name(self) -> str:
        return self.names[0] if self.names else f"class {self.id}"


def normalize(text: str) -> str:
    """Case-, space-, underscore- and hyphen-insensitive form of a class name."""
    return " ".join(re.sub(r"[\s_\-/]+", " ", text).casefold().split())


def slug(text: str) -> str:
    """A file-name-safe form of a class name: "T-shirt/top" -> "t-shirt-top"."""
    return re.sub(r"[^a-z0-9]+", "-", text.casefold()).strip("-") or "class"


class ClassTable:
    """The classes a model was trained on, with lookup by id, WordNet id or any name."""

    def __init__(self, classes: list[ClassInfo], source: str):
        self.classes = classes
        self.source = source
        self.by_name: dict[str, list[int]] = {}
        self.spelling: dict[str, str] = {}
        for info in classes:
            for name in info.names:
                self.spelling.setdefault(normalize(name), name)
                ids = self.by_name.setdefault(normalize(name), [])
                if info.id not in ids:
                    ids.append(info.id)
        self.by_wnid = {info.wnid: info.id for info in classes if info.wnid}

    def __len__(self) -> int:
        return len(self.classes)

    @classmethod
    def imagenet(cls) -> ClassTable:
        return _imagenet_table()

    @classmethod
    def from_names(cls, names: list[str], source: str = "checkpoint") -> ClassTable:
        return cls([ClassInfo(i, (name,)) for i, name in enumerate(names)], source)

    @classmethod
    def numbered(cls, num_classes: int) -> ClassTable:
        return cls([ClassInfo(i, ()) for i in range(num_classes)], "numbered")

    def name(self, class_id: int) -> str:
        return self.classes[class_id].name

    def label(self, class_id: int) -> str:
        """Display name plus WordNet id where known, to tell same-named classes apart."""
        info = self.classes[class_id]
        return f"{info.name}, {info.wnid}" if info.wnid else info.name

    def resolve(self, text: str) -> int:
        """The class id for an id, a WordNet id or a name (case-insensitive); one-line errors otherwise."""
        text = str(text).strip()
        if not text:
            raise UserError("--class is empty", "pass a class id or name; `dit classes` lists them")
        if re.fullmatch(r"[+-]?\d+", text):
            return self._check_range(int(text))
        if WNID.match(text.lower()) and self.by_wnid:
            if text.lower() not in self.by_wnid:
                raise UserError(f"unknown WordNet id {text!r}", "see `dit classes` for the ImageNet-1k ids")
            return self.by_wnid[text.lower()]
        ids = self.by_name.get(normalize(text), [])
        if len(ids) == 1:
            return ids[0]
        if len(ids) > 1:
            options = ", ".join(f"{i} ({self.label(i)})" for i in ids)
            raise UserError(f"class name {text!r} is ambiguous: it names {options}", "pass the id instead")
        raise UserError(f"unknown class {text!r}", self._suggest(text))

    def _check_range(self, class_id: int) -> int:
        if not 0 <= class_id < len(self.classes):
            if not self.classes:
                raise UserError(f"class {class_id} was asked for, but this model is unconditional",
                                "drop --class")
            raise UserError(f"class {class_id} is out of range",
                            f"this model has {len(self.classes)} classes, ids 0 to {len(self.classes) - 1}")
        return class_id

    def _suggest(self, text: str) -> str:
        names = list(self.by_name)
        close = difflib.get_close_matches(normalize(text), names, n=5, cutoff=0.6)
        if not close:
            close = [n for n in names if normalize(text) in n][:5]
        if close:
            hits = ", ".join(f"{self.spelling[name]} ({'/'.join(map(str, self.by_name[name]))})" for name in close)
            return f"close matches: {hits}"
        return "see `dit classes --search TEXT` for the class names"

    def search(self, text: str | None = None) -> list[ClassInfo]:
        """Classes whose id, WordNet id or any name contains `text` (all classes when text is empty)."""
        if not text:
            return list(self.classes)
        needle = normalize(text)
        return [info for info in self.classes
                if needle == str(info.id) or (info.wnid and needle in info.wnid)
                or any(needle in normalize(name) for name in info.names)]


@lru_cache(maxsize=1)
def _imagenet_table() -> ClassTable:
    text = resources.files("ditcli").joinpath("data/imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")][1:]
    classes = [ClassInfo(int(i), tuple(n.strip() for n in names.split(",")), wnid) for i, wnid, names in rows]
    assert len(classes) == IMAGENET_CLASSES and [c.id for c in classes] == list(range(IMAGENET_CLASSES))
    return ClassTable(classes, "ImageNet-1k")


def class_table(num_classes: int, class_names: list[str] | None = None) -> ClassTable:
    """The names a checkpoint carries, else ImageNet-1k for 1000-class models, else plain numbers."""
    if class_names:
        if len(class_names) != num_classes:
            raise UserError(f"the checkpoint lists {len(class_names)} class names for {num_classes} classes",
                            "re-export it with matching class names")
        return ClassTable.from_names(class_names)
    if num_classes == IMAGENET_CLASSES:
        return ClassTable.imagenet()
    return ClassTable.numbered(num_classes)
