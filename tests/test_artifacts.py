"""Atomic writes never leave half files; manifests detect altered or missing outputs."""

import errno
import json
import os

import pytest

from monolm.core import artifacts


def test_atomic_write_failure_keeps_previous(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.json"
    artifacts.atomic_write_json(target, {"step": 1})
    real_replace = os.replace

    def disk_full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        artifacts.atomic_write_json(target, {"step": 2})
    monkeypatch.setattr(artifacts.os, "replace", real_replace)
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.json"]  # no temp file left behind


def test_manifest_roundtrip_and_tamper_detection(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    _, digest = artifacts.write_manifest(
        tmp_path,
        stage="setup",
        config={"x": 1},
        inputs={},
        outputs=["a.txt", "sub/b.bin"],
        metrics={"m": 1.5},
        wall_time_s=0.1,
    )
    manifest, again = artifacts.load_manifest(tmp_path)
    assert again == digest and manifest.metrics == {"m": 1.5} and manifest.provenance["versions"]["torch"]
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 9)  # truncated
    with pytest.raises(artifacts.CorruptArtifact, match="b.bin"):
        artifacts.load_manifest(tmp_path)
    (tmp_path / "sub" / "b.bin").unlink()
    with pytest.raises(artifacts.CorruptArtifact, match="missing"):
        artifacts.load_manifest(tmp_path)
    assert not artifacts.manifest_is_valid(tmp_path)


def test_read_json_checks_digest(tmp_path):
    digest = artifacts.atomic_write_json(tmp_path / "r.json", {"v": 1})
    assert artifacts.read_json(tmp_path / "r.json", digest) == {"v": 1}
    raw = bytearray((tmp_path / "r.json").read_bytes())
    raw[3] ^= 0x01  # one flipped bit
    (tmp_path / "r.json").write_bytes(bytes(raw))
    with pytest.raises(artifacts.CorruptArtifact, match="sha256"):
        artifacts.read_json(tmp_path / "r.json", digest)
