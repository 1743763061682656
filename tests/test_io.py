import os

import torch

from fedguard.io import atomic_write_text, load_tensors, read_ndjson, save_tensors


def test_atomic_writes_leave_no_temp_files_and_take_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a" / "report.md", "one")
        atomic_write_text(tmp_path / "a" / "report.md", "two")  # replaced whole
        save_tensors(tmp_path / "a" / "t.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "report.md").read_text() == "two"
    assert torch.equal(load_tensors(tmp_path / "a" / "t.safetensors")["w"], torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["report.md", "t.safetensors"]
    for name in ("report.md", "t.safetensors"):
        assert (tmp_path / "a" / name).stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_a_torn_last_ndjson_line_is_dropped(tmp_path):
    path = tmp_path / "m.ndjson"
    path.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    assert read_ndjson(path) == [{"round": 1}, {"round": 2}]


def test_published_folders_take_the_usual_permissions(tmp_path):
    import tempfile
    from pathlib import Path

    from fedguard.io import publish_dir

    old = os.umask(0o022)
    try:
        staging = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700, as every staging folder starts
        (staging / "x").write_text("1")
        publish_dir(staging, tmp_path / "final")
    finally:
        os.umask(old)
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o755


def test_resumed_writer_appends_after_the_good_records(tmp_path):
    from fedguard.io import NdjsonWriter

    path = tmp_path / "m.ndjson"
    path.write_text('{"round": 1}\n{"rou')
    writer = NdjsonWriter.resume(path, read_ndjson(path))
    writer.append({"round": 2})
    assert read_ndjson(path) == [{"round": 1}, {"round": 2}]
