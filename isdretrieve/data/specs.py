"""Data SPEC strings: ``KIND[:ARG][,key=value]...`` parsed into a :class:`DataSpec`.

Examples: ``digits``, ``digits,split=test``, ``cifar10:/data/cifar,split=train,longtail=100``,
``folder:/imgs/train,size=32``, ``list:/x/D1.txt@/imagenet``, ``cifar10:ROOT,download=1``,
``cifar10:ROOT,balanced=12406`` (a class-balanced subset of that many images),
``wds:/data/shards/{00000..00127}.tar`` (webdataset tar shards; the ARG is a brace/glob pattern).

Options are the trailing ``,key=value`` segments (split, longtail, balanced, size, download);
everything between ``KIND:`` and the first option is the ARG, so paths holding commas still work unless a
comma is followed by ``word=``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from isdretrieve.errors import DataError

KINDS = ("digits", "cifar10", "folder", "list", "wds")
IMAGE_EXTENSIONS = frozenset(  # the files a folder SPEC (and a folder of query images) takes as images
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
SPLITS = ("train", "test")
OPTIONS = ("split", "longtail", "balanced", "size", "download")
_FILE_KINDS = ("folder", "list", "wds")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_OPTION_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=(.*)$")
_KIND_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)(.*)$", re.DOTALL)


class _BadSpec(DataError):
    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


@dataclass(frozen=True)
class DataSpec:
    """A parsed data SPEC; ``str(spec)`` is the canonical form that :func:`parse_spec` round-trips."""

    kind: str
    root: Path | None = None
    list_file: Path | None = None
    split: str | None = None
    longtail: float | None = None
    balanced: int | None = None  # images in a class-balanced subset
    size: int | None = None
    download: bool = False

    def __post_init__(self) -> None:
        for name in ("root", "list_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.longtail is not None and not isinstance(self.longtail, float):
            object.__setattr__(self, "longtail", float(self.longtail))
        problem = _problem(self)
        if problem:
            raise _BadSpec(f"bad data SPEC '{self}': {problem}", problem)

    def with_split(self, split: str | None) -> DataSpec:
        """Return a copy with ``split`` replaced."""
        return dataclasses.replace(self, split=split)

    def __str__(self) -> str:
        text = self.kind
        if self.kind == "list":
            text += f":{self.list_file}@{self.root}"
        elif self.root is not None:
            text += f":{self.root}"
        if self.split is not None:
            text += f",split={self.split}"
        if self.longtail is not None:
            text += f",longtail={_format_float(self.longtail)}"
        if self.balanced is not None:
            text += f",balanced={self.balanced}"
        if self.size is not None:
            text += f",size={self.size}"
        if self.download:
            text += ",download=1"
        return text


def _format_float(x: float) -> str:
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def _problem(spec: DataSpec) -> str | None:
    """Describe what is wrong with ``spec`` in a few words, or return None."""
    if spec.kind not in KINDS:
        return f"unknown kind '{spec.kind}' (expected {', '.join(KINDS)})"
    if spec.kind == "digits" and spec.root is not None:
        return "digits takes no ARG"
    if spec.kind != "digits" and (spec.root is None or str(spec.root) == ""):
        example = {"list": "FILE@ROOT", "wds": "PATTERN"}.get(spec.kind, "ROOT")
        return f"{spec.kind} needs an ARG ({spec.kind}:{example})"
    if (spec.kind == "list") != (spec.list_file is not None):
        return "list needs FILE@ROOT" if spec.kind == "list" else "list_file is only for list"
    if spec.kind == "wds" and (spec.split is not None or spec.longtail is not None):
        return "split and longtail do not apply to wds (name the shards of a split in the PATTERN)"
    if spec.split is not None and spec.split not in SPLITS:
        return f"split must be one of {', '.join(SPLITS)}, got '{spec.split}'"
    if spec.longtail is not None and not (math.isfinite(spec.longtail) and spec.longtail >= 1):
        return f"longtail must be a ratio >= 1, got {spec.longtail}"
    if spec.balanced is not None:
        if isinstance(spec.balanced, bool) or not isinstance(spec.balanced, int) or spec.balanced <= 0:
            return f"balanced must be a positive integer, got {spec.balanced!r}"
        if spec.longtail is not None:
            return "longtail and balanced exclude each other"
    if spec.size is not None:
        if spec.kind not in _FILE_KINDS:
            return f"size applies only to {', '.join(_FILE_KINDS)}"
        if isinstance(spec.size, bool) or not isinstance(spec.size, int) or spec.size <= 0:
            return f"size must be a positive integer, got {spec.size!r}"
    if spec.download and spec.kind != "cifar10":
        return "download applies only to cifar10"
    return None


def _parse_option(key: str, value: str) -> object:
    value = value.strip()
    if key == "split":
        return value
    if key == "longtail":
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"longtail must be a number, got '{value}'") from None
    if key in ("size", "balanced"):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{key} must be an integer, got '{value}'") from None
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"download must be 0 or 1, got '{value}'")


def parse_spec(text: str | DataSpec) -> DataSpec:
    """Parse a data SPEC string (a :class:`DataSpec` is returned as is); raise DataError if malformed."""
    if isinstance(text, DataSpec):
        return text

    def bad(problem: str) -> DataError:
        return DataError(f"bad data SPEC '{text}': {problem}")

    match = _KIND_RE.match(text.strip())
    if not match:
        raise bad(f"expected KIND[:ARG][,key=value]... with KIND one of {', '.join(KINDS)}")
    kind, rest = match.group(1).lower(), match.group(2).lstrip()
    if kind not in KINDS:
        raise bad(f"unknown kind '{match.group(1)}' (expected {', '.join(KINDS)})")
    if rest and rest[0] not in ":,":
        raise bad("expected ':' or ',' after the kind")
    has_arg = rest.startswith(":")
    segments = rest[1:].split(",") if rest else []
    options: dict[str, object] = {}
    while segments:  # walk back from the end: every trailing `key=value` segment is an option
        m = _OPTION_RE.match(segments[-1])
        if not m:
            if has_arg:
                break
            raise bad(f"expected key=value, got '{segments[-1]}'")
        key = m.group(1).lower()
        if key not in OPTIONS:
            raise bad(f"unknown option '{m.group(1)}' (expected {', '.join(OPTIONS)})")
        if key in options:
            raise bad(f"option '{key}' given twice")
        try:
            options[key] = _parse_option(key, m.group(2))
        except ValueError as exc:
            raise bad(str(exc)) from None
        segments.pop()
    arg = ",".join(segments).strip()
    fields: dict[str, object] = {"kind": kind, **options}
    if arg and kind == "list":
        list_file, at, root = arg.rpartition("@")
        if not at or not list_file.strip() or not root.strip():
            raise bad("list needs FILE@ROOT (the list file, '@', the image root)")
        fields["list_file"] = Path(list_file.strip()).expanduser()
        fields["root"] = Path(root.strip()).expanduser()
    elif arg:
        fields["root"] = Path(arg).expanduser()
    try:
        return DataSpec(**fields)  # type: ignore[arg-type]
    except _BadSpec as exc:
        raise bad(exc.problem) from None
