"""Data SPEC strings: parsing, canonical form, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from isdretrieve.data.specs import DataSpec, parse_spec
from isdretrieve.errors import DataError, IsdError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("digits", DataSpec("digits")),
        ("digits,split=test", DataSpec("digits", split="test")),
        (
            "cifar10:/data/cifar,split=train,longtail=100",
            DataSpec("cifar10", root=Path("/data/cifar"), split="train", longtail=100.0),
        ),
        ("folder:/imgs/train,size=32", DataSpec("folder", root=Path("/imgs/train"), size=32)),
        ("list:/x/D1.txt@/imagenet", DataSpec("list", root=Path("/imagenet"), list_file=Path("/x/D1.txt"))),
        ("cifar10:ROOT,download=1", DataSpec("cifar10", root=Path("ROOT"), download=True)),
        ("cifar10:ROOT,download=0", DataSpec("cifar10", root=Path("ROOT"))),
        ("folder:/a,b/c,split=test", DataSpec("folder", root=Path("/a,b/c"), split="test")),
        (" Digits , split = test ", DataSpec("digits", split="test")),
        ("folder:x,longtail=2.5,size=8", DataSpec("folder", root=Path("x"), longtail=2.5, size=8)),
        ("wds:/d/{00000..00127}.tar", DataSpec("wds", root=Path("/d/{00000..00127}.tar"))),
        ("wds:/d/{a,b}-*.tar,size=64", DataSpec("wds", root=Path("/d/{a,b}-*.tar"), size=64)),
    ],
)
def test_parse(text: str, expected: DataSpec) -> None:
    spec = parse_spec(text)
    assert spec == expected
    assert parse_spec(str(spec)) == spec


def test_canonical_strings() -> None:
    assert str(parse_spec("cifar10:/d,longtail=100,split=train")) == "cifar10:/d,split=train,longtail=100"
    assert str(parse_spec("list:/x/D1.txt@/imagenet,size=224")) == "list:/x/D1.txt@/imagenet,size=224"
    assert str(parse_spec("folder:x,longtail=1.5")) == "folder:x,longtail=1.5"
    assert str(parse_spec("cifar10:r,download=yes")) == "cifar10:r,download=1"


def test_passthrough_and_with_split() -> None:
    spec = parse_spec("digits")
    assert parse_spec(spec) is spec
    assert spec.with_split("test") == DataSpec("digits", split="test")
    assert spec.with_split("test").with_split(None) == spec
    with pytest.raises(DataError, match="split must be one of train, test"):
        spec.with_split("val")


def test_list_root_is_last_at() -> None:
    spec = parse_spec("list:/x/a@b.txt@/imagenet")
    assert spec.list_file == Path("/x/a@b.txt") and spec.root == Path("/imagenet")


def test_direct_construction_is_validated() -> None:
    assert DataSpec("folder", root="x").root == Path("x")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="longtail"):
        DataSpec("cifar10", root=Path("x"), longtail=0.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("foo:x", "unknown kind 'foo' (expected digits, cifar10, folder, list, wds)"),
        ("digits,foo=1", "unknown option 'foo'"),
        ("cifar10:/r,foo=1", "unknown option 'foo'"),
        ("cifar10", "cifar10 needs an ARG"),
        ("folder:", "folder needs an ARG"),
        ("wds:", "wds needs an ARG (wds:PATTERN)"),
        ("wds:/x/{0..3}.tar,split=test", "split and longtail do not apply to wds"),
        ("wds:/x/a.tar,longtail=10", "split and longtail do not apply to wds"),
        ("list:", "list needs an ARG"),
        ("list:/x/D1.txt", "list needs FILE@ROOT"),
        ("list:@/imagenet", "list needs FILE@ROOT"),
        ("digits,split=val", "split must be one of train, test"),
        ("cifar10:x,longtail=0.5", "longtail must be a ratio >= 1"),
        ("cifar10:x,longtail=abc", "longtail must be a number"),
        ("cifar10:x,longtail=nan", "longtail must be a ratio >= 1"),
        ("folder:x,size=0", "size must be a positive integer"),
        ("folder:x,size=-3", "size must be a positive integer"),
        ("folder:x,size=1.5", "size must be an integer"),
        ("digits,size=16", "size applies only to folder, list, wds"),
        ("folder:x,download=1", "download applies only to cifar10"),
        ("cifar10:x,download=maybe", "download must be 0 or 1"),
        ("digits:x", "digits takes no ARG"),
        ("folder:x,split=test,split=train", "option 'split' given twice"),
        ("digits,", "expected key=value"),
        ("", "expected KIND"),
        ("digits;split=test", "expected ':' or ','"),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(DataError) as info:
        parse_spec(text)
    assert str(info.value).startswith(f"bad data SPEC '{text}': ")
    assert message in str(info.value)
    assert isinstance(info.value, IsdError)
    assert "\n" not in str(info.value)
