"""webdataset shards (``wds:PATTERN``): patterns, the header index, streaming, bad shards, and bank export
with shard-granular resume (SIGKILL at a random batch, then byte-identical to an uninterrupted export)."""

from __future__ import annotations

import io
import json
import random
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KILLED_EXPORT, bank_contents
from PIL import Image

from isdretrieve.bank.export import export_bank, shard_path
from isdretrieve.bank.join import join_shards
from isdretrieve.data.open import open_dataset
from isdretrieve.data.shards import ShardStream, expand_braces, rank_shards, shard_files, write_shards
from isdretrieve.encoder import FrozenEncoder
from isdretrieve.errors import BankError, DataError
from isdretrieve.files.bank import FeatureBank

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """digits/test (450 images) as 8 webdataset shards of PNG + cls; returns the ``wds:`` SPEC."""
    root = tmp_path_factory.mktemp("shards")
    write_shards(open_dataset("digits,split=test"), root, shards=8)
    return f"wds:{root}/{{00000..00007}}.tar"


@pytest.fixture(scope="module")
def enc16(tmp_path_factory: pytest.TempPathFactory, make_encoder) -> Path:
    return make_encoder(tmp_path_factory.mktemp("enc") / "enc16.pt")


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


# -------------------------------------------------------------------------------------- patterns
def test_brace_expansion() -> None:
    assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == [
        "a-8.tar",
        "a-9.tar",
        "a-10.tar",
        "b-8.tar",
        "b-9.tar",
        "b-10.tar",
    ]
    assert expand_braces("{3..1}") == ["3", "2", "1"] and expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DataError, match="neither"):
        expand_braces("x{abc}.tar")


def test_shard_files_globs_and_errors(tmp_path: Path) -> None:
    for k in (2, 0, 1):
        _tar(tmp_path / f"p-{k}.tar", [("a.png", _png((k, 0, 0)))])
    assert [p.name for p in shard_files(f"{tmp_path}/p-*.tar")] == ["p-0.tar", "p-1.tar", "p-2.tar"]
    assert [p.name for p in shard_files(f"{tmp_path}/p-{{2,0}}.tar")] == ["p-2.tar", "p-0.tar"]
    with pytest.raises(DataError, match=r"shard '.*p-3.tar' not found"):
        shard_files(f"{tmp_path}/p-{{0..3}}.tar")
    with pytest.raises(DataError, match="matches no file"):
        shard_files(f"{tmp_path}/q-*.tar")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"shard '.*empty.tar' is empty \(0 bytes\)"):
        shard_files(f"{tmp_path}/empty.tar")


# ------------------------------------------------------------------------------------ the dataset
def test_shards_read_back_the_digits(digits_shards: str) -> None:
    digits, ds = open_dataset("digits,split=test"), open_dataset(digits_shards)
    assert len(ds) == 450 and len(ds.shards) == 8 and ds.image_size == (16, 16)
    assert ds.classes == [str(d) for d in range(10)] and torch.equal(ds.labels, digits.labels)
    assert ds.path(0) == "00000.tar/00000000" and ds.path(449) == "00007.tar/00000449"
    assert str(ds.spec) == f"{digits_shards},size=16" and not ds.crops_in_workers
    assert torch.equal(ds.load_all(), digits.load_all())
    assert torch.equal(ds.load_all(num_workers=2), digits.load_all())
    assert ds[300][1:] == (int(digits.labels[300]), 300) and torch.equal(ds[300][0], digits[300][0])


def test_stream_splits_shards_across_workers_and_keeps_member_order(digits_shards: str) -> None:
    ds = open_dataset(digits_shards)
    for workers in (0, 3):
        batches = list(ShardStream(ds, [6, 1, 4], batch_size=20).loader(workers))
        by_shard: dict[int, list[int]] = {}
        for b in batches:
            by_shard.setdefault(b.shard, []).extend(b.indices.tolist())
            assert len(set(b.indices.tolist())) == len(b.indices) and b.images.shape[1:] == (3, 16, 16)
        assert sorted(by_shard) == [1, 4, 6]
        for s, got in by_shard.items():  # each shard front to back, nothing else
            assert got == list(range(int(ds.shard_starts[s]), int(ds.shard_starts[s + 1])))
        assert [b.last for b in batches if b.shard == 4][-1] and sum(b.last for b in batches) == 3
    assert rank_shards(8, 1, 3) == [1, 4, 7] and rank_shards(8, 1, 3, contiguous=True) == [2, 3, 4]


def test_labels_from_json_and_unlabelled_samples(tmp_path: Path) -> None:
    _tar(
        tmp_path / "a.tar",
        [
            ("x/k1.png", _png((255, 0, 0), (12, 6))),
            ("x/k1.json", json.dumps({"label": 3, "caption": "red"}).encode()),
            ("x/k2.seg.txt", b"ignored"),
            ("x/k2.webp", _png((0, 255, 0))),  # PNG bytes under .webp: PIL reads by content
            ("x/k3.jpg", _png((0, 0, 255))),
            ("x/k3.cls", b" 1\n"),
        ],
    )
    ds = open_dataset(f"wds:{tmp_path}/a.tar,size=4")
    assert [ds.path(i) for i in range(3)] == ["a.tar/x/k1", "a.tar/x/k2", "a.tar/x/k3"]
    assert ds.labels.tolist() == [3, -1, 1] and ds.classes == ["0", "1", "2", "3"]
    assert ds.crops_in_workers and ds.open_image(0).size == (12, 6)  # the original, not squashed
    assert ds[0][0][:, 0, 0].tolist() == [255, 0, 0]


def test_bad_shards_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(DataError, match=r"cannot read shard '.*junk.tar': not a tar file, or corrupt"):
        open_dataset(f"wds:{tmp_path}/junk.tar")
    _tar(tmp_path / "noimage.tar", [("a.png", _png((1, 2, 3))), ("b.cls", b"0")])
    with pytest.raises(DataError, match=r"shard '.*noimage.tar': sample 'b' has no image"):
        open_dataset(f"wds:{tmp_path}/noimage.tar")
    _tar(tmp_path / "nothing.tar", [("readme.txt", b"hi")])
    with pytest.raises(DataError, match="has no image"):
        open_dataset(f"wds:{tmp_path}/nothing.tar")
    noise = np.random.default_rng(1).bytes(5000)  # member data: the cut falls inside a member
    full = _tar(
        tmp_path / "full.tar",
        [m for k in range(4) for m in ((f"{k}.png", _png((k, k, k))), (f"{k}.txt", noise))],
    )
    (tmp_path / "cut.tar").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError, match=r"shard '.*cut.tar' .*(truncated|corrupt)"):
        open_dataset(f"wds:{tmp_path}/cut.tar")
    _tar(tmp_path / "badcls.tar", [("a.png", _png((1, 2, 3))), ("a.cls", b"cat")])
    with pytest.raises(DataError, match="cannot read a label from 'a.cls'"):
        open_dataset(f"wds:{tmp_path}/badcls.tar")
    with pytest.raises(DataError, match="split and longtail do not apply to wds"):
        open_dataset(f"wds:{tmp_path}/full.tar,split=test")


# ------------------------------------------------------------------------------------------ export
def test_export_matches_the_in_memory_export_whatever_the_workers(
    tmp_path: Path, digits_shards: str, enc16: Path
) -> None:
    a = export_bank(enc16, digits_shards, tmp_path / "a.h5", batch_size=32, workers=0)
    b = export_bank(enc16, digits_shards, tmp_path / "b.h5", batch_size=32, workers=3)
    ref = export_bank(enc16, "digits,split=test", tmp_path / "ref.h5", batch_size=32, workers=0)
    assert a.rows == b.rows == 450 and bank_contents(a.path) == bank_contents(b.path)
    with FeatureBank.open(a.path) as bank, FeatureBank.open(ref.path) as plain:
        np.testing.assert_allclose(bank.features(), plain.features(), atol=1e-6)
        np.testing.assert_array_equal(bank.labels(), plain.labels())
        np.testing.assert_array_equal(bank.indices(), np.arange(450))
        assert bank.paths()[112] == "00002.tar/00000112" and bank.data_spec == f"{digits_shards},size=16"
        assert bank.info.shards_done == tuple(range(8))


def test_torchrun_ranks_take_contiguous_shard_blocks_and_join(
    tmp_path: Path, digits_shards: str, enc16: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    single = export_bank(enc16, digits_shards, tmp_path / "one.h5", batch_size=32, workers=0).path
    parts = []
    for rank in range(3):  # what torchrun's three processes see
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", str(rank))
        parts.append(export_bank(enc16, digits_shards, tmp_path / "bank.h5", batch_size=32, workers=0).path)
    monkeypatch.delenv("WORLD_SIZE")
    assert parts == [shard_path(tmp_path / "bank.h5", r, 3) for r in range(3)]
    with FeatureBank.open(parts[1]) as bank:  # shards 2, 3, 4
        assert bank.paths()[0] == "00002.tar/00000112" and len(bank) == 281 - 112
    assert bank_contents(join_shards(parts, tmp_path / "joined.h5")) == bank_contents(single)
    with pytest.raises(DataError, match="8 shards cannot be split across 9 processes"):
        export_bank(enc16, digits_shards, tmp_path / "x.h5", shard=(0, 9), workers=0)


class _Stop(Exception):
    pass


def test_resume_skips_finished_shards_and_refuses_a_changed_list(
    tmp_path: Path, digits_shards: str, enc16: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = export_bank(enc16, digits_shards, tmp_path / "ref.h5", batch_size=20, workers=0).path
    real, encoded = FrozenEncoder.embed, []

    def embed(model, images, *args):
        if stop_at and len(encoded) == stop_at:
            raise _Stop
        encoded.append(len(images))
        return real(model, images, *args)

    stop_at = 14  # shards 0-3 (3 batches each) done, shard 4 started

    monkeypatch.setattr(FrozenEncoder, "embed", embed)
    out = tmp_path / "bank.h5"
    with pytest.raises(_Stop):
        export_bank(enc16, digits_shards, out, batch_size=20, workers=0)
    with pytest.raises(BankError, match=r"is incomplete \(225 of 450 rows\)"):
        FeatureBank.open(out)
    encoded.clear()
    stop_at = 0
    result = export_bank(enc16, digits_shards, out, batch_size=20, workers=2)
    assert sum(encoded) == 450 - 225 and result.resumed_from == 225  # shards 0, 1 never encoded again
    assert bank_contents(out) == bank_contents(reference)

    partial = tmp_path / "partial.h5"
    with monkeypatch.context() as patch:
        patch.setattr(FrozenEncoder, "embed", lambda *a: (_ for _ in ()).throw(_Stop))
        with pytest.raises(_Stop):
            export_bank(enc16, digits_shards, partial, batch_size=20, workers=0)
    shard3 = Path(digits_shards[4:].replace("{00000..00007}", "00003"))
    shard3.write_bytes(shard3.read_bytes() + b"\0" * 1024)  # same pattern, one shard changed
    try:
        with pytest.raises(BankError, match=r"another shard list .*shard 3 was '00003.tar' \(\d+ bytes"):
            export_bank(enc16, digits_shards, partial, batch_size=20, workers=0)
    finally:
        shard3.write_bytes(shard3.read_bytes()[:-1024])


def test_bad_members_follow_on_bad_image(tmp_path: Path, enc16: Path) -> None:
    good = [(f"{k}.png", _png((10 * k, 0, 0), (16, 16))) for k in range(5)]
    _tar(tmp_path / "0.tar", good[:3])
    _tar(tmp_path / "1.tar", [good[3], ("bad.jpg", b"not a jpeg"), good[4]])
    spec = f"wds:{tmp_path}/{{0,1}}.tar"
    with pytest.raises(DataError, match=r"cannot decode image '1.tar/bad' in shard '.*1.tar'"):
        export_bank(enc16, spec, tmp_path / "err.h5", batch_size=2, workers=0)
    result = export_bank(enc16, spec, tmp_path / "skip.h5", batch_size=2, workers=0, on_bad_image="skip")
    assert (result.rows, result.skipped) == (5, 1)
    with FeatureBank.open(result.path) as bank:
        assert bank.paths() == ["0.tar/0", "0.tar/1", "0.tar/2", "1.tar/3", "1.tar/4"]
        np.testing.assert_array_equal(bank.indices(), [0, 1, 2, 3, 5])
        assert bank.skipped_paths == ["1.tar/bad"] and np.isfinite(bank.features()).all()
    again = export_bank(enc16, spec, tmp_path / "skip.h5", batch_size=2, workers=0, on_bad_image="skip")
    assert again.rows == 5 and again.images_per_s == 0.0  # complete: nothing redone


# ------------------------------------------------------------------------------- the must-show


@pytest.mark.cifar
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_cifar_shards_export_killed_at_random_then_resumed_is_byte_identical(
    seed: int, tmp_path: Path, cifar_root: Path, make_encoder
) -> None:
    """1,600 JPEGs of the CIFAR-10 copy's test split (every class, original bytes) as 8 shards; SIGKILL
    the export at a random batch (with 2 loader workers), rerun: finished shards are not encoded again,
    and the bank equals an uninterrupted in-process export (0 workers) byte for byte."""
    folder = open_dataset(f"folder:{cifar_root},split=test")
    chunk = np.linspace(0, len(folder) - 1, 1600).astype(int)  # every class, in folder order
    write_shards(folder, tmp_path / "shards", shards=8, indices=chunk)
    spec = f"wds:{tmp_path}/shards/{{00000..00007}}.tar"
    encoder = make_encoder(tmp_path / "enc32.pt", image_size=32)
    straight = export_bank(encoder, spec, tmp_path / "straight.h5", batch_size=50, workers=0)
    assert straight.rows == 1600

    batches = random.Random(seed).randrange(1, 32)  # of 32: after it started writing, before the end
    out = tmp_path / "killed.h5"
    args = [sys.executable, "-c", KILLED_EXPORT, str(encoder), spec, str(out), str(batches), "2"]
    child = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    with pytest.raises(BankError, match="incomplete"):
        FeatureBank.open(out)
    with __import__("h5py").File(out, "r") as h5:
        done = json.loads(h5.attrs["shards_done"])
    counted: list[int] = []
    real = FrozenEncoder.embed

    def spy(model, images, *rest):
        counted.append(len(images))
        return real(model, images, *rest)

    FrozenEncoder.embed = spy  # type: ignore[method-assign]
    try:
        result = export_bank(encoder, spec, out, batch_size=50, workers=2)
    finally:
        FrozenEncoder.embed = real
    assert sum(counted) == 1600 - 200 * len(done) and result.resumed_from == 200 * len(done)
    assert bank_contents(out) == bank_contents(straight.path)


# ------------------------------------------------------------------------------- the command line
def _cli_export(encoder: Path, data: str, out: Path):
    from click.testing import CliRunner

    from isdretrieve.cli.index import main

    args = ["export", "--checkpoint", str(encoder), "--data", data, "--out", str(out)]
    return CliRunner().invoke(main, [*args, "--workers", "0", "--batch-size", "4", "--quiet"])


def _one_line(result, start: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), result.output
    return lines[0]


def test_bad_shards_at_the_command_line(tmp_path: Path, enc16: Path) -> None:
    out = tmp_path / "bank.h5"
    _tar(tmp_path / "00000.tar", [("a.png", _png((1, 2, 3)))])
    _one_line(_cli_export(enc16, f"wds:{tmp_path}/{{00000..00001}}.tar", out), "shard '")  # missing
    _one_line(_cli_export(enc16, f"wds:{tmp_path}/none-*.tar", out), "shard pattern '")
    _one_line(_cli_export(enc16, "wds:", out), "bad data SPEC 'wds:': wds needs an ARG (wds:PATTERN)")
    (tmp_path / "junk.tar").write_bytes(b"\x01" * 2048)
    _one_line(_cli_export(enc16, f"wds:{tmp_path}/junk.tar", out), "cannot read shard '")
    _tar(tmp_path / "noimage.tar", [("a.png", _png((1, 2, 3))), ("b.json", b"{}")])
    assert "sample 'b' has no image" in _one_line(_cli_export(enc16, f"wds:{tmp_path}/noimage.tar", out), "")
    _tar(tmp_path / "badmember.tar", [("a.png", _png((1, 2, 3))), ("b.jpg", b"\xff\xd8 garbage")])
    line = _one_line(_cli_export(enc16, f"wds:{tmp_path}/badmember.tar", out), "cannot decode image ")
    assert "'badmember.tar/b' in shard" in line
    with pytest.raises(BankError, match="incomplete"):  # nothing that looks complete is left
        FeatureBank.open(out)
