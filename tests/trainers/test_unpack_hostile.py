"""A hostile or broken archive from a provider: `unpack` and `download` keep it in its
folder and off a full disk. The archives are built here with tarfile; the download
goes through Together's real SDK to the local Together fake."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from tests.fakes.together_api import FakeTogether
from tests.trainers.test_together import API_KEY, spec_for
from trainers.runner import RunnerError
from trainers.together_ft import TogetherRunner, unpack


def tar_of(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode="w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


HOSTILE = {
    "dot-dot": [file("../escaped.txt")],
    "symlink out, then through it": [link("out", ".."), file("out/escaped.txt")],
    "absolute symlink": [link("etc", "/etc")],
    "hard link out": [link("hard", "../outside.txt", tarfile.LNKTYPE)],
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_member_that_would_land_outside_its_folder_is_refused(tmp_path, name):
    outside = tmp_path / "home"
    outside.mkdir()
    (outside / "outside.txt").write_text("mine")
    archive = tar_of(tmp_path / "a.tar.gz", HOSTILE[name])
    into = outside / "adapter"
    with pytest.raises(RunnerError, match=r"could not unpack a\.tar\.gz"):
        unpack(archive, into)
    assert sorted(p.name for p in outside.iterdir()) == ["adapter", "outside.txt"]
    assert (outside / "outside.txt").read_text() == "mine"
    assert not any(p.is_symlink() for p in into.rglob("*"))


def test_an_absolute_name_lands_inside_the_folder(tmp_path):
    archive = tar_of(tmp_path / "a.tar.gz", [file("/tmp/tunebot-escaped.txt")])
    into = unpack(archive, tmp_path / "adapter")
    assert (into / "tmp" / "tunebot-escaped.txt").read_bytes() == b"x"
    assert not Path("/tmp/tunebot-escaped.txt").exists()


def test_an_archive_that_unpacks_past_the_limit_stops_there(tmp_path):
    """A decompression bomb: 40 MB of zeros in a gzip of ~40 KB; the limit is 1 MB."""
    zeros = b"\0" * 1_000_000
    archive = tar_of(tmp_path / "bomb.tar.gz", [file(f"w{i}.bin", zeros) for i in range(40)])
    assert archive.stat().st_size < 200_000
    into = tmp_path / "adapter"
    with pytest.raises(RunnerError, match=r"unpacks to more than 0\.0 GB"):
        unpack(archive, into, max_bytes=1_500_000)
    written = sum(p.stat().st_size for p in into.rglob("*") if p.is_file())
    assert written <= 1_500_000


def test_an_archive_of_too_many_entries_is_refused(tmp_path):
    archive = tar_of(tmp_path / "many.tar", [file(f"f{i}", b"") for i in range(50)], mode="w")
    with pytest.raises(RunnerError, match="more than 10 entries"):
        unpack(archive, tmp_path / "into", max_members=10)
    assert len(list((tmp_path / "into").iterdir())) <= 10


def test_an_archive_within_the_limits_unpacks(tmp_path):
    archive = tar_of(tmp_path / "ok.tar.gz", [file("a/b.json", b"{}"), file("c.bin", b"12")])
    into = unpack(archive, tmp_path / "into", max_bytes=4, max_members=2)
    assert (into / "a" / "b.json").read_bytes() == b"{}" and (into / "c.bin").read_bytes() == b"12"


def test_a_download_longer_than_the_limit_is_abandoned_and_leaves_nothing(tmp_path):
    train = tmp_path / "train"
    from tests.trainers.test_together import chat_jsonl

    train.write_bytes(chat_jsonl(12))
    with FakeTogether(API_KEY, polls_per_stage=1, running_polls=3) as fake:
        runner = TogetherRunner.from_settings(API_KEY, fake.base_url, max_retries=2, timeout=10)
        handle = runner.submit(spec_for(train), "inst:r7")
        fake.run_to_end(handle.id)
        size = len(fake.adapter_archive(handle.id))
        dest = tmp_path / "out"
        with pytest.raises(RunnerError, match=r"is over 0\.0 GB, more than there is room for"):
            runner.download(handle, dest, max_bytes=size - 1)
        assert list(dest.iterdir()) == []  # no archive, no temporary file
        archive = runner.download(handle, dest, max_bytes=size)
        assert archive.read_bytes() == fake.adapter_archive(handle.id)
        assert len(fake.calls_to("GET", "/v1/finetune/download")) == 2
