"""Shards and resumed exports: a finished tar is pinned by its content (SHA-256 over its index and image
bytes, computed as the export reads them), so a tar rewritten before a resume with the same member names,
byte size and sample count is refused instead of being mixed into the bank; shard labels out of range and
member or file names that are not UTF-8 are one-line errors."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from isdretrieve.bank.export import export_bank
from isdretrieve.cli.index import main as index_cli
from isdretrieve.data.open import open_dataset
from isdretrieve.data.shards import ShardStream, shard_sha256, write_shards
from isdretrieve.encoder import FrozenEncoder
from isdretrieve.errors import BankError
from isdretrieve.files.bank import BankAttrs
from isdretrieve.files.h5 import open_h5


class _Stop(Exception):
    pass


@pytest.fixture
def shards(tmp_path) -> tuple[Path, str]:
    """digits/test (450 images) as 6 tars of PNG + cls under tmp_path/shards; returns (folder, SPEC)."""
    root = tmp_path / "shards"
    write_shards(open_dataset("digits,split=test"), root, shards=6)
    return root, f"wds:{root}/{{00000..00005}}.tar"


@pytest.fixture(scope="module")
def enc16(tmp_path_factory, make_encoder) -> Path:
    return make_encoder(tmp_path_factory.mktemp("enc") / "enc16.pt")


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar if info.isfile()]


def _rewrite(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _swap_images(members):
    """Samples 0 and 1 swap their image bytes, padded to equal length: names and tar size stay."""
    (a, da), (b, db) = members[0], members[2]
    width = max(len(da), len(db))
    members[0], members[2] = (a, db.ljust(width, b"\0")), (b, da.ljust(width, b"\0"))
    return members


def _other_label(members):
    """The first .cls member says another class, with as many digits."""
    k = next(i for i, (info, data) in enumerate(members) if info.name.endswith(".cls"))
    info, data = members[k]
    members[k] = (info, str((int(data) + 1) % 10).encode())
    return members


def _flip_a_byte(members):
    """One byte in the middle of an image changes (a bit rotted, or an edit of the same length)."""
    info, data = members[4]
    middle = len(data) // 2
    members[4] = (info, data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1 :])
    return members


def _renamed_keys(members):
    """Two samples' keys trade places (same names in the tar, other order of rows)."""
    (a, da), (b, db), (c, dc), (d, dd) = members[:4]
    members[:4] = [(c, dc), (d, dd), (a, da), (b, db)]
    return members


CHANGED = r"finished shard 1 \('00001.tar'\) changed since it was exported"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_swap_images, CHANGED),
        (_other_label, CHANGED),
        (_flip_a_byte, CHANGED),
        (_renamed_keys, "holds a partial bank of another export .file list sha256"),  # the names' order
    ],
)
def test_a_finished_shard_rewritten_alike_is_refused_on_resume(
    tmp_path, shards, enc16, monkeypatch, change, message
):
    root, spec = shards
    real, batches = FrozenEncoder.embed, []

    def embed(model, images, *args):
        if len(batches) == 6:  # shards 0-1 finished (3 batches each), shard 2 not
            raise _Stop
        batches.append(len(images))
        return real(model, images, *args)

    out = tmp_path / "bank.h5"
    with monkeypatch.context() as patched:
        patched.setattr(FrozenEncoder, "embed", embed)
        with pytest.raises(_Stop):
            export_bank(enc16, spec, out, batch_size=25, workers=0)
    with open_h5(out) as f:
        info = BankAttrs.read(f, out)
    assert info.shards_done == (0, 1) and info.shard_sha256[0] and not info.shard_sha256[2]
    dataset = open_dataset(spec)
    assert info.shard_sha256[1] == shard_sha256(dataset, 1)  # what the stream hashed = a fresh read

    tar = root / "00001.tar"
    size = tar.stat().st_size
    _rewrite(tar, change(_members(tar)))
    assert tar.stat().st_size == size  # same name, bytes and samples: the shard list still matches
    assert len(open_dataset(spec).shards[1]) == len(dataset.shards[1])
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    with pytest.raises(BankError, match=message):
        export_bank(enc16, spec, out, batch_size=25, workers=0)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before  # refused before anything was written


def test_the_stream_digest_equals_a_fresh_read_with_any_worker_count(tmp_path, shards, enc16):
    root, spec = shards
    dataset = open_dataset(spec)
    for workers in (0, 2):
        got = {
            b.shard: b.sha256 for b in ShardStream(dataset, range(6), batch_size=40).loader(workers) if b.last
        }
        assert got == {s: shard_sha256(dataset, s) for s in range(6)}


def _cls_tar(path: Path, label: str | bytes, ext: str = "cls") -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buffer, format="PNG")
    payload = label if isinstance(label, bytes) else label.encode()
    _rewrite(path, [(tarfile.TarInfo("a.png"), buffer.getvalue()), (tarfile.TarInfo(f"a.{ext}"), payload)])


@pytest.mark.parametrize(
    ("label", "ext", "message"),
    [
        ("1000000000000", "cls", "label 1000000000000 in 'a.cls' is outside [-1, 1048576]"),
        ("1" + "0" * 30, "cls", "is outside [-1, 1048576]"),
        ("-5", "cls", "label -5 in 'a.cls' is outside"),
        ('{"label": 99999999999999999999999}', "json", "is outside [-1, 1048576]"),
    ],
)
def test_shard_labels_out_of_range_are_one_line(tmp_path, enc16, label, ext, message):
    _cls_tar(tmp_path / "s.tar", label, ext)
    args = ["export", "--checkpoint", enc16, "--data", f"wds:{tmp_path}/s.tar", "--out", tmp_path / "b.h5"]
    result = CliRunner().invoke(index_cli, [str(a) for a in [*args, "--quiet", "--workers", "0"]])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


def test_member_and_file_names_that_are_not_utf8_are_one_line(tmp_path, enc16):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(buffer, format="PNG")
    png = buffer.getvalue()
    bad = os.fsdecode(b"caf\xe9.png")  # a name whose bytes are Latin-1, not UTF-8
    _rewrite(tmp_path / "s.tar", [(tarfile.TarInfo(bad), png)])
    folder = tmp_path / "folder" / "c"
    folder.mkdir(parents=True)
    (folder / "ok.png").write_bytes(png)
    (folder / bad).write_bytes(png)
    for data, message in (
        (f"wds:{tmp_path}/s.tar", "member name b'caf\\xe9.png' is not valid UTF-8"),
        (f"folder:{tmp_path / 'folder'}", "file name b'c/caf\\xe9.png' is not valid UTF-8"),
    ):
        args = ["export", "--checkpoint", enc16, "--data", data, "--out", tmp_path / "b.h5", "--workers", "0"]
        result = CliRunner().invoke(index_cli, [str(a) for a in [*args, "--quiet"]])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.output
        assert not (tmp_path / "b.h5").exists()
    assert np.asarray(Image.open(folder / "ok.png")).shape == (8, 8, 3)
