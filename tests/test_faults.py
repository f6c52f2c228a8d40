"""Fault injection: what a hostile but fair user can do to every command, and what mixq promises back.

Each case runs the real command (`mixq.cli.main` in-process, or a subprocess where a signal is sent)
on tiny models and crafted files, and checks the promises of README.md's "What mixq promises":
a non-zero exit, exactly one line on stderr that names the file/tensor/option and says what to do,
no traceback, no partial output left looking valid, nothing that existed before lost or changed.
Progress bars (tqdm, on stderr) are not error lines and are left out of the count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixq.cli import main
from mixq.io import files
from mixq.io.files import PROVENANCE_FILE, output_lock, record_verified
from mixq.quant.artifact import is_mlx_folder, read_artifact

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parent.parent
TRACEBACK = "Traceback (most recent call last)"
_BAR = re.compile(r"\d+%\||\[\d+:\d\d[<,]")  # tqdm: "convert:  40%|####  | 2/5 [00:01<00:02, ...]"
# what a line that says "what to do" says
_TODO = re.compile(r"\b(use|give|pass|choose|fix|re-download|re-export|re-run|delete|free|check|remove|shorten|"
                   r"raise|wait|see|change|download|copy|write elsewhere|must be|start over|continue|report|"
                   r"convert from|apply)\b", re.I)


@pytest.fixture(autouse=True)
def _env(tmp_cache, monkeypatch):
    """An empty cache per case; torch on one thread (the machine is shared)."""
    monkeypatch.setenv("MIXQ_WIKITEXT", str(ROOT / "README.md"))  # a text file that exists, if a case needs one
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------- helpers

def shown(stderr: str) -> list[str]:
    """The stderr lines a terminal shows (the last carriage-return segment of each), progress bars left out."""
    lines = []
    for raw in stderr.splitlines():
        line = raw.split("\r")[-1].strip()
        if line and not _BAR.search(line):
            lines.append(line)
    return lines


def tree(root: Path, skip=("mixq-cache",)) -> dict[str, str]:
    """Every file, folder and link under `root` with its content hash: what must not change."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if not (d == root and n in skip)]
        for n in dirnames + filenames:
            p = d / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(capsys, argv) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, root: Path, argv, *names, code=2) -> str:
    """Run `mixq ARGV`: it must fail with exit `code`, one line naming each of `names` and saying what to do,
    no traceback, and leave everything under `root` (but the cache) as it was. Returns the line."""
    before = tree(root)
    rc, _, err = run_cli(capsys, argv)
    lines = shown(err)
    assert TRACEBACK not in err, err
    assert rc == code, (rc, err)
    assert len(lines) == 1, lines
    line = lines[0]
    for n in names:
        assert str(n) in line, (n, line)
    assert _TODO.search(line.split(": error: ", 1)[-1]), line
    assert tree(root) == before, "the command changed or left files"
    if os.environ.get("MIXQ_SHOW_FAULTS"):  # print each case's line (for reviewing the wording)
        print(line, file=sys.__stderr__)
    return line


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(folder: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def raw_safetensors(f: Path) -> tuple[dict, bytes]:
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_raw(f: Path, header, body: bytes) -> None:
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def src(tiny_model, tmp_path) -> Path:
    """A private copy of the tiny llama (4 layers, hidden 64, tied head) to damage."""
    return copy_model(tiny_model("llama"), tmp_path / "src")


def convert_args(src, out, *extra):
    return ["convert", src, out, "--recipe", "q4", *extra]


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """`ulimit -f`: files this process writes may not grow past `nbytes` (writes fail with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextlib.contextmanager
def _tmpfs(d: Path, size: str):
    d.mkdir()
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                                              capture_output=True).returncode == 0
    if not ok:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs mounted at tmp_path/fs for this case: full at once (needs root; skipped elsewhere)."""
    with _tmpfs(tmp_path / "fs", "256k") as d:
        yield d


@pytest.fixture
def roomy_fs(tmp_path):
    """A 16 MiB tmpfs at tmp_path/fs (to be made read-only; needs root, else chmod is used)."""
    if os.geteuid() != 0:
        (tmp_path / "fs").mkdir()
        yield tmp_path / "fs"
        return
    with _tmpfs(tmp_path / "fs", "16m") as d:
        yield d


@contextlib.contextmanager
def read_only(folder: Path, small_fs_root: Path | None = None):
    """`folder` read-only for this process: chmod where that binds (not root), else a read-only remount."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    assert small_fs_root is not None
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs_root)], check=True)
    try:
        yield
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs_root)], check=True)


# ================================================================== convert: broken or lying sources

def test_source_without_config(src, tmp_path, capsys):
    (src / "config.json").unlink()
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "config.json")


def test_config_not_json(src, tmp_path, capsys):
    (src / "config.json").write_text('{"model_type": "llama", ')
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "config.json", "JSON")


def test_config_is_a_json_list(src, tmp_path, capsys):
    (src / "config.json").write_text("[1, 2, 3]")
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "config.json", "list")


def test_unsupported_model_type(src, tmp_path, capsys):
    edit_config(src, model_type="falcon")
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "falcon")


def test_safetensors_shorter_than_its_header(src, tmp_path, capsys):
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00")
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model.safetensors")


def test_safetensors_header_not_json(src, tmp_path, capsys):
    f = src / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 16) + b"{not json at all" + f.read_bytes()[8:])
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model.safetensors")


def test_safetensors_header_is_a_list(src, tmp_path, capsys):
    _, body = raw_safetensors(src / "model.safetensors")
    write_raw(src / "model.safetensors", [1, 2], body)
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model.safetensors")


def test_safetensors_truncated_data(src, tmp_path, capsys):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model.safetensors", "truncated")


def test_safetensors_unknown_dtype_code(src, tmp_path, capsys):
    header, body = raw_safetensors(src / "model.safetensors")
    name = next(n for n in header if n != "__metadata__")
    header[name]["dtype"] = "F99"
    write_raw(src / "model.safetensors", header, body)
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model.safetensors", name)


def test_safetensors_shape_lies_about_size(src, tmp_path, capsys):
    header, body = raw_safetensors(src / "model.safetensors")
    name = "model.layers.0.mlp.gate_proj.weight"
    header[name]["shape"] = [256, 64]  # twice the bytes its offsets hold
    write_raw(src / "model.safetensors", header, body)
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), name)


def test_missing_weight(src, tmp_path, capsys):
    name = "model.layers.1.mlp.down_proj.weight"
    edit_weights(src, lambda sd: sd.pop(name))
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), name, "missing")


def test_extra_weight(src, tmp_path, capsys):
    name = "model.layers.0.mlp.extra_proj.weight"
    edit_weights(src, lambda sd: sd.__setitem__(name, torch.zeros(64, 64, dtype=torch.bfloat16)))
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), name, "extra")


def test_config_says_more_layers_than_the_weights(src, tmp_path, capsys):
    edit_config(src, num_hidden_layers=30)
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "30 layers", "hold 4")


def test_config_says_fewer_layers_than_the_weights(src, tmp_path, capsys):
    edit_config(src, num_hidden_layers=2)
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "2 layers", "model.layers.2.")


def test_transposed_weight(src, tmp_path, capsys):
    name = "model.layers.0.mlp.gate_proj.weight"
    edit_weights(src, lambda sd: sd.__setitem__(name, sd[name].t().contiguous()))
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), name, "mis-shaped")


def test_config_hidden_size_disagrees(src, tmp_path, capsys):
    edit_config(src, hidden_size=128)
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model.embed_tokens.weight", "mis-shaped")


def test_zero_size_weight(src, tmp_path, capsys):
    name = "model.layers.2.self_attn.o_proj.weight"
    edit_weights(src, lambda sd: sd.__setitem__(name, torch.zeros(0, 64, dtype=torch.bfloat16)))
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), name)


def test_integer_weight(src, tmp_path, capsys):
    name = "model.layers.0.self_attn.q_proj.weight"
    edit_weights(src, lambda sd: sd.__setitem__(name, torch.ones(64, 64, dtype=torch.int32)))
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), name, "not floating point")


def test_nan_in_a_weight(src, tmp_path, capsys):
    name = "model.layers.3.mlp.up_proj.weight"

    def poison(sd):
        sd[name][5, 7] = float("nan")

    edit_weights(src, poison)
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), name, "NaN")


def test_no_tokenizer(src, tmp_path, capsys):
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (src / f).unlink()
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "tokenizer", str(src))


def test_broken_tokenizer(src, tmp_path, capsys):
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "tokenizer", str(src))


def test_index_names_a_missing_shard(src, tmp_path, capsys):
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model-00002-of-00002.safetensors")


def test_index_not_json(src, tmp_path, capsys):
    (src / "model.safetensors.index.json").write_text("{")
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model.safetensors.index.json")


def test_tensor_in_two_shards(src, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src / "model.safetensors"))
    save_file({"model.norm.weight": sd["model.norm.weight"]}, str(src / "model-extra.safetensors"))
    (src / "model.safetensors").rename(src / "model-main.safetensors")
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model.norm.weight")


def test_only_pytorch_bin_weights(src, tmp_path, capsys):
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), str(src))


def test_weights_are_a_symlink_loop(src, tmp_path, capsys):
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to("model.safetensors")
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model.safetensors", "link")


def test_source_does_not_exist(tmp_path, capsys):
    refused(capsys, tmp_path, convert_args(tmp_path / "nowhere", tmp_path / "out"), "nowhere")


def test_source_is_a_converted_folder(tiny_model, tmp_path, capsys):
    from mixq.quant.convert import convert

    mlx = convert(tiny_model("llama"), tmp_path / "mlx", recipe="q8", progress=False)
    refused(capsys, tmp_path, convert_args(mlx, tmp_path / "out"), "MLX", "Hugging Face source")


# ================================================================== convert: options and the output folder

def test_shard_size_zero(src, tmp_path, capsys):
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out", "--shard-size", "0"), "--shard-size")


def test_shard_size_nan(src, tmp_path, capsys):
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out", "--shard-size", "nan"), "--shard-size")


def test_unknown_recipe(src, tmp_path, capsys):
    refused(capsys, tmp_path, ["convert", src, tmp_path / "out", "--recipe", "q5-ultra"], "q5-ultra")


def test_recipe_not_toml(src, tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[recipe\nbits = 4")
    refused(capsys, tmp_path, ["convert", src, tmp_path / "out", "--recipe", recipe], "r.toml")


def test_recipe_expression_divides_by_zero(src, tmp_path, capsys):
    recipe = tmp_path / "div.toml"
    recipe.write_text('[recipe]\nname = "div"\ndescription = "x"\nbits = 4\ngroup_size = 64\n\n'
                      '[[rule]]\npattern = "*.mlp.*"\nevery = "n // (n - 4)"\nbits = 8\n')
    refused(capsys, tmp_path, ["convert", src, tmp_path / "out", "--recipe", recipe], "div.toml", "n // (n - 4)")


def test_bad_dtype_choice(src, tmp_path, capsys):
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out", "--dtype", "float64"), "--dtype")


def test_output_exists(src, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "out", "--force")


def test_force_onto_a_folder_mixq_did_not_write(src, tmp_path, capsys):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("my notes")
    refused(capsys, tmp_path, convert_args(src, tmp_path / "work", "--force"), "work", "not written by mixq")


def test_force_onto_the_source(tiny_model, tmp_path, capsys):
    src = copy_model(tiny_model("llama"), tmp_path / "src")
    (src / PROVENANCE_FILE).write_text(json.dumps({"kind": "gguf-import"}))  # a folder mixq wrote: still protected
    refused(capsys, tmp_path, convert_args(src, src, "--force"), "source")


def test_force_onto_a_folder_holding_the_source(tiny_model, tmp_path, capsys):
    parent = tmp_path / "parent"
    src = copy_model(tiny_model("llama"), parent / "src")
    (parent / PROVENANCE_FILE).write_text("{}")
    refused(capsys, tmp_path, convert_args(src, parent, "--force"), "source")


def test_output_is_a_file(src, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out", "--force"), "out")


def test_output_below_a_file(src, tmp_path, capsys):
    (tmp_path / "afile").write_text("a file")
    refused(capsys, tmp_path, convert_args(src, tmp_path / "afile" / "out"), "afile", "not a folder")


def test_output_name_too_long(src, tmp_path, capsys):
    refused(capsys, tmp_path, convert_args(src, tmp_path / ("m" * 300)), "name", "shorter")


def test_long_output_name_that_fits(src, tmp_path, capsys):
    """Not a fault: a 250-character name is legal, and its temporary folder must not exceed the limit."""
    out = tmp_path / ("m" * 250)
    rc, _, err = run_cli(capsys, convert_args(src, out))
    assert rc == 0, err
    assert is_mlx_folder(out) and {p.name for p in tmp_path.iterdir()} == {"m" * 250, "mixq-cache", "src"}


def test_output_dot_is_refused_not_replaced(src, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(capsys, tmp_path, convert_args(src, ".", "--force"), "not written by mixq")


def test_second_writer_is_refused(src, tmp_path, capsys):
    with output_lock(tmp_path / "out"):
        refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "another mixq process")


def test_disk_without_room(src, tmp_path, small_fs, capsys):
    refused(capsys, tmp_path, convert_args(src, small_fs / "out"), "MB free", str(small_fs))


def test_read_only_disk(src, tmp_path, roomy_fs, capsys):
    with read_only(roomy_fs, roomy_fs):
        refused(capsys, tmp_path, convert_args(src, roomy_fs / "out"), "out",
                "read-only" if os.geteuid() == 0 else "permission")


def test_file_size_limit_mid_write(src, tmp_path, capsys):
    """`ulimit -f 64k`: the first shard cannot be written; the staged folder goes, one line says why."""
    with file_size_limit(64 << 10):
        refused(capsys, tmp_path, ["convert", src, tmp_path / "out", "--recipe", "bf16"], "out", "too large")


def test_killed_force_replacement_is_restored(src, tmp_path, capsys):
    """A convert --force killed between moving the old folder aside and the new one in: the next run puts the old
    folder back (instead of deleting it as a leftover) and refuses to replace it without --force."""
    from mixq.quant.convert import convert

    out = convert(src, tmp_path / "out", recipe="q8", progress=False)
    aside = tmp_path / ".out.old-0123abcd"
    out.rename(aside)
    before = tree(aside)
    rc, _, err = run_cli(capsys, convert_args(src, out))
    assert rc == 2 and len(shown(err)) == 1 and "already exists" in err and TRACEBACK not in err
    assert not aside.exists() and tree(out) == before


def test_read_back_catches_an_index_that_lost_a_tensor(src, tmp_path, capsys, monkeypatch):
    """Issue 16.4: convert reads the written folder back before it becomes OUT. A writer fault (injected here: the
    index loses a tensor) is a one-line refusal and no folder, not a folder mlx_lm.load rejects."""
    import mixq.quant.convert as C

    real = C.write_index

    def lossy(plan, folder, weight_map):
        weight_map.pop("model.norm.weight")
        real(plan, folder, weight_map)

    monkeypatch.setattr(C, "write_index", lossy)
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model.safetensors.index.json")


def test_read_back_catches_a_shard_cut_after_writing(src, tmp_path, capsys, monkeypatch):
    """Issue 16.4: a shard that lost its end after it was written (injected: truncated) is found on read-back."""
    import mixq.quant.convert as C

    real = C.write_weights

    def cut(prep, folder, shard_bytes, progress, pre=None):
        weight_map = real(prep, folder, shard_bytes, progress, pre)
        f = folder / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-512])
        return weight_map

    monkeypatch.setattr(C, "write_weights", cut)
    refused(capsys, tmp_path, convert_args(src, tmp_path / "out"), "model.safetensors", "truncated")


def _sub(args, tmp_path, **kw):
    env = {**os.environ, "MIXQ_CACHE": str(tmp_path / "mixq-cache"), "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mixq.cli", *map(str, args)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return False


def _pause_when(proc, ready, timeout=180.0) -> None:
    """Run `proc` in bursts of a few milliseconds (SIGCONT, SIGSTOP) until `ready()` holds while it is stopped:
    it is then stopped in the middle of its work, and a signal sent before SIGCONT lands before it can finish,
    however fast the machine (a free-running convert of the slow model takes a fifth of a second)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
        os.kill(proc.pid, signal.SIGSTOP)
        while not _stopped(proc.pid):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.001)
        if ready():
            return
    os.kill(proc.pid, signal.SIGCONT)
    raise AssertionError(f"{proc.args}: not ready within {timeout} s")


def _wait_for(pattern: str, folder: Path, proc) -> Path:
    """The first `pattern` in `folder` once it holds a file; `proc` is left stopped (`_pause_when`)."""
    def found():
        return next((p for p in folder.glob(pattern) if any(p.iterdir())), None)

    _pause_when(proc, lambda: found() is not None)
    return found()


def _interrupt(proc) -> None:
    """Ctrl-C to a process `_pause_when` left stopped."""
    proc.send_signal(signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def slow_model(tiny_model):
    """Big enough (31M parameters) that convert writes for a while (signals land by `_pause_when`)."""
    return tiny_model("llama", hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=64, num_hidden_layers=8)


def test_ctrl_c_mid_convert(slow_model, tmp_path):
    proc = _sub(convert_args(slow_model, tmp_path / "out"), tmp_path)
    _wait_for(".out.tmp-*", tmp_path, proc)
    _interrupt(proc)
    _, err = proc.communicate(timeout=120)
    lines = shown(err)
    assert proc.returncode == 130 and TRACEBACK not in err and len(lines) == 1 and "interrupted" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixq-cache"]


def test_sigkill_mid_convert_then_rerun(slow_model, tmp_path, capsys):
    """SIGKILL leaves the hidden temporary folder (OUT itself never exists half-written); the next convert of
    OUT removes it, since its process is gone, and succeeds."""
    proc = _sub(convert_args(slow_model, tmp_path / "out"), tmp_path)
    stale = _wait_for(".out.tmp-*", tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists() and stale.exists()
    rc, _, err = run_cli(capsys, convert_args(slow_model, tmp_path / "out"))
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixq-cache", "out"]
    art = read_artifact(tmp_path / "out")
    assert art.size_bytes == json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())["size_bytes"]


# ================================================================== convert --method gptq: calibration options
def gptq_args(src, out, *extra):
    return convert_args(src, out, "--method", "gptq", *extra)


def test_calib_file_missing(src, tmp_path, capsys):
    refused(capsys, tmp_path, gptq_args(src, tmp_path / "out", "--calib", tmp_path / "nope.txt"), "nope.txt")


def test_calib_file_is_a_folder(src, tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    refused(capsys, tmp_path, gptq_args(src, tmp_path / "out", "--calib", tmp_path / "texts"), "texts")


def test_calib_file_empty(src, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    refused(capsys, tmp_path, gptq_args(src, tmp_path / "out", "--calib", tmp_path / "empty.txt"), "empty.txt")


def test_calib_file_not_utf8(src, tmp_path, capsys):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00text" * 50)
    refused(capsys, tmp_path, gptq_args(src, tmp_path / "out", "--calib", tmp_path / "bin.txt"), "bin.txt")


def test_calib_text_too_short_for_the_windows(src, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("hello world\n")
    refused(capsys, tmp_path, gptq_args(src, tmp_path / "out", "--calib", tmp_path / "short.txt"),
            "short.txt", "--calib-samples")


@pytest.mark.parametrize("option,value", [("--calib-samples", "0"), ("--calib-samples", "-3"),
                                          ("--calib-len", "1"), ("--calib-len", "x")])
def test_calib_counts(src, tmp_path, capsys, option, value):
    refused(capsys, tmp_path, gptq_args(src, tmp_path / "out", option, value), option)


@pytest.mark.parametrize("recipe,method", [("bf16", "gptq"), ("source", "gptq"), ("mxfp4", "dwq")])
def test_method_without_tensors_for_it(src, tmp_path, capsys, recipe, method):
    """A recipe that gives the method no tensor (all kept, or float modes under dwq, which tunes affine ones only)
    must not give a silently round-to-nearest folder."""
    refused(capsys, tmp_path, ["convert", src, tmp_path / "out", "--recipe", recipe, "--method", method],
            "--method", recipe)


# ================================================================== GGUF import

@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """A tiny llama GGUF (hidden 64, Q8_0/F16 matrices, 2 layers)."""
    from gguf import GGMLQuantizationType as T
    from tiny_gguf import write_tiny_gguf

    path, _, _ = write_tiny_gguf("llama", tmp_path_factory.mktemp("gguf"), types=[T.Q8_0, T.F16], hidden=64)
    return path


def patched_gguf(gguf_file: Path, dst: Path, key: str, value=None, rename: str | None = None) -> Path:
    """A copy of `gguf_file` with metadata `key` set to `value` (same type) or renamed (same length)."""
    import gguf

    shutil.copy(gguf_file, dst)
    reader = gguf.GGUFReader(str(dst), "r+")
    field = reader.fields[key]
    if rename is not None:
        assert len(rename) == len(key)
        field.parts[1][:] = list(rename.encode())
    else:
        field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader
    return dst


def test_import_not_a_gguf(tmp_path, capsys):
    f = tmp_path / "model.gguf"
    f.write_text("hello, I am not a model")
    refused(capsys, tmp_path, ["import", f, tmp_path / "out"], "model.gguf", "GGUF")


def test_import_truncated_gguf(gguf_file, tmp_path, capsys):
    f = tmp_path / "cut.gguf"
    f.write_bytes(gguf_file.read_bytes()[:-5000])
    refused(capsys, tmp_path, ["import", f, tmp_path / "out"], "cut.gguf")


def test_import_gguf_without_hyperparameters(gguf_file, tmp_path, capsys):
    f = patched_gguf(gguf_file, tmp_path / "nohp.gguf", "llama.embedding_length", rename="llama.embedding_lengtX")
    refused(capsys, tmp_path, ["import", f, tmp_path / "out"], "nohp.gguf", "llama.embedding_length", "missing")


def test_import_gguf_head_count_zero(gguf_file, tmp_path, capsys):
    f = patched_gguf(gguf_file, tmp_path / "h0.gguf", "llama.attention.head_count", 0)
    refused(capsys, tmp_path, ["import", f, tmp_path / "out"], "h0.gguf", "llama.attention.head_count")


def test_import_gguf_block_count_disagrees(gguf_file, tmp_path, capsys):
    f = patched_gguf(gguf_file, tmp_path / "b3.gguf", "llama.block_count", 3)
    refused(capsys, tmp_path, ["import", f, tmp_path / "out"], "b3.gguf", "3 layers")


def test_import_gguf_sizes_disagree(gguf_file, tmp_path, capsys):
    f = patched_gguf(gguf_file, tmp_path / "ff.gguf", "llama.feed_forward_length", 96)
    refused(capsys, tmp_path, ["import", f, tmp_path / "out"], "ff.gguf", "shape")


def test_import_unsupported_architecture(gguf_file, tmp_path, capsys):
    import gguf

    f = tmp_path / "arch.gguf"
    shutil.copy(gguf_file, f)
    reader = gguf.GGUFReader(str(f), "r+")
    field = reader.fields["general.architecture"]
    field.parts[field.data[0]][:] = list(b"llamb")
    reader.data.flush()
    del reader
    refused(capsys, tmp_path, ["import", f, tmp_path / "out"], "arch.gguf", "llamb")


def test_import_output_exists(gguf_file, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.txt").write_text("mine")
    refused(capsys, tmp_path, ["import", gguf_file, tmp_path / "out"], "out", "--force")


def test_import_missing_file(tmp_path, capsys):
    refused(capsys, tmp_path, ["import", tmp_path / "gone.gguf", tmp_path / "out"], "gone.gguf")


def test_import_onto_a_full_disk(gguf_file, tmp_path, small_fs, capsys):
    refused(capsys, tmp_path, ["import", gguf_file, small_fs / "out"], "out", "disk full")


def test_import_file_size_limit(gguf_file, tmp_path, capsys):
    with file_size_limit(64 << 10):
        refused(capsys, tmp_path, ["import", gguf_file, tmp_path / "out"], "out", "too large")


# ---------------------------------------------------------------- the cached GGUF of an embedded model (issue 16.6)

@pytest.fixture
def embedded_tiny(gguf_file, monkeypatch):
    """`tiny-gguf`: an embedded model whose verified GGUF is already in the cache (nothing to download)."""
    from mixq.sources import embedded
    from mixq.sources.embedded import Embedded, Source, Wheel

    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    src = Source("tiny.gguf", digest, gguf_file.stat().st_size, (Wheel("tiny-none", "1.0", "0" * 64, "x"),))
    monkeypatch.setattr(embedded, "REGISTRY", {**embedded.REGISTRY,
                                               "tiny-gguf": Embedded("tiny-gguf", "tiny", "1M", "MIT", src, False)})
    monkeypatch.setattr(embedded, "pip_download", lambda *a: pytest.fail("nothing may be downloaded"))
    cached = files.cache_dir() / "gguf" / "tiny.gguf"
    cached.parent.mkdir(parents=True)
    shutil.copy(gguf_file, cached)
    record_verified(cached, digest)
    return cached, digest


def _flip_byte(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x55
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_cached_gguf_changed_after_verification(embedded_tiny, tmp_path, capsys):
    cached, _ = embedded_tiny
    _flip_byte(cached, keep_mtime=False)
    refused(capsys, tmp_path, ["import", "tiny-gguf", tmp_path / "out"], "tiny.gguf", "changed", "delete it")
    assert not (files.cache_dir() / "models" / "tiny-gguf").exists()


def test_cached_gguf_changed_with_its_mtime_restored(embedded_tiny, tmp_path, capsys):
    """Size and mtime as recorded, content not: the import still hashes what it reads, and refuses."""
    cached, _ = embedded_tiny
    _flip_byte(cached, keep_mtime=True)
    refused(capsys, tmp_path, ["import", "tiny-gguf", tmp_path / "out"], "tiny.gguf", "changed")
    assert not (files.cache_dir() / "models" / "tiny-gguf").exists()


def test_cached_gguf_reverified_and_its_real_hash_recorded(embedded_tiny, tmp_path, capsys):
    """Not a fault: an old-style marker (a bare hash) makes mixq hash the file again, record size, mtime and
    hash, and the import's provenance holds the hash of the file it read."""
    cached, digest = embedded_tiny
    marker = cached.with_name(cached.name + ".verified")
    marker.write_text(digest + "\n")
    rc, _, err = run_cli(capsys, ["import", "tiny-gguf", tmp_path / "out"])
    assert rc == 0, err
    rec = json.loads(marker.read_text())
    assert rec == {"sha256": digest, "size": cached.stat().st_size, "mtime_ns": cached.stat().st_mtime_ns}
    prov = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert prov["source"]["sha256"] == digest
    assert marker.stat().st_mode & 0o044 == 0o044  # a shared cache stays readable by others


# ================================================================== eval: options, run folders, broken models

@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("ev")
    data = root / "data"
    data.mkdir()
    rows = [{"passage": "Paris is in France.", "question": "is paris in france", "label": 1},
            {"passage": "Rome is in Italy.", "question": "is rome in spain", "label": 0}]
    (data / "boolq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return tiny_model("llama"), data, text


def ev(eval_setup, out, *extra, tasks="boolq"):
    model, data, text = eval_setup
    return ["eval", model, "--tasks", tasks, "--data-dir", data, "--ppl-file", text, "--ctx", "16",
            "--windows", "2", "-o", out, *extra]


@pytest.mark.parametrize("option,value", [("--limit", "0"), ("--sample", "0"), ("--ctx", "1"), ("--windows", "-1"),
                                          ("--threads", "-1"), ("--batch-size", "0"), ("--kld-topk", "-5")])
def test_eval_bad_number(eval_setup, tmp_path, capsys, option, value):
    args = ev(eval_setup, tmp_path / "run", tasks="boolq,ppl")
    if option in args:
        i = args.index(option)
        args[i + 1] = value
    else:
        args += [option, value]
    refused(capsys, tmp_path, args, option)


def test_eval_data_dir_missing(eval_setup, tmp_path, capsys):
    args = ev(eval_setup, tmp_path / "run")
    args[args.index("--data-dir") + 1] = tmp_path / "nodata"
    refused(capsys, tmp_path, args, "--data-dir", "nodata")


def test_eval_data_dir_without_the_task(eval_setup, tmp_path, capsys):
    refused(capsys, tmp_path, ev(eval_setup, tmp_path / "run", tasks="piqa"), "piqa")


def test_eval_ctx_beyond_the_model(eval_setup, tmp_path, capsys):
    args = ev(eval_setup, tmp_path / "run", tasks="ppl")
    args[args.index("--ctx") + 1] = "4096"
    refused(capsys, tmp_path, args, "--ctx 4096", "256")


def test_eval_binary_ppl_file(eval_setup, tmp_path, capsys):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 8)
    args = ev(eval_setup, tmp_path / "run", tasks="ppl")
    args[args.index("--ppl-file") + 1] = blob
    refused(capsys, tmp_path, args, "--ppl-file", "blob.bin")


def test_eval_missing_ppl_file(eval_setup, tmp_path, capsys):
    args = ev(eval_setup, tmp_path / "run", tasks="ppl")
    args[args.index("--ppl-file") + 1] = tmp_path / "gone.txt"
    refused(capsys, tmp_path, args, "--ppl-file", "gone.txt")


def test_eval_empty_ppl_file(eval_setup, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    args = ev(eval_setup, tmp_path / "run", tasks="ppl")
    args[args.index("--ppl-file") + 1] = tmp_path / "empty.txt"
    refused(capsys, tmp_path, args, "empty.txt", "empty")


def test_eval_kld_without_base(eval_setup, tmp_path, capsys):
    refused(capsys, tmp_path, ev(eval_setup, tmp_path / "run", tasks="kld"), "--base")


def test_eval_unknown_task(eval_setup, tmp_path, capsys):
    refused(capsys, tmp_path, ev(eval_setup, tmp_path / "run", tasks="boolq,mmlu"), "mmlu")


def test_eval_bad_dtype(eval_setup, tmp_path, capsys):
    refused(capsys, tmp_path, ev(eval_setup, tmp_path / "run", "--dtype", "float64"), "--dtype")


def test_eval_out_is_a_file(eval_setup, tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    refused(capsys, tmp_path, ev(eval_setup, tmp_path / "run"), "run", "not a folder")


def test_eval_force_onto_a_folder_that_is_not_a_run(eval_setup, tmp_path, capsys):
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "results.json").write_text('{"accuracy": 0.9}')  # another tool's results
    refused(capsys, tmp_path, ev(eval_setup, tmp_path / "project", "--force"), "project", "not a mixq run folder")


def test_eval_existing_run_without_resume_or_force(eval_setup, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"mixq_version": "0", "options": {}, "tasks": {}}))
    refused(capsys, tmp_path, ev(eval_setup, run), "run", "--resume")


def _finished_run(eval_setup, tmp_path, capsys) -> Path:
    rc, _, err = run_cli(capsys, ev(eval_setup, tmp_path / "run"))
    assert rc == 0, err
    return tmp_path / "run"


def test_eval_resume_with_other_options(eval_setup, tmp_path, capsys):
    run = _finished_run(eval_setup, tmp_path, capsys)
    refused(capsys, tmp_path, ev(eval_setup, run, "--resume", "--limit", "1"), "cannot resume", "limit")


def test_eval_resume_with_a_damaged_samples_line(eval_setup, tmp_path, capsys):
    run = _finished_run(eval_setup, tmp_path, capsys)
    results = json.loads((run / "results.json").read_text())
    results["complete"] = False
    (run / "results.json").write_text(json.dumps(results))
    lines = (run / "samples.jsonl").read_text().splitlines()
    (run / "samples.jsonl").write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    refused(capsys, tmp_path, ev(eval_setup, run, "--resume"), "samples.jsonl:1")


def test_eval_resume_with_results_not_json(eval_setup, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text('{"mixq_version": ')
    refused(capsys, tmp_path, ev(eval_setup, run, "--resume"), "results.json")


def test_eval_second_writer_is_refused(eval_setup, tmp_path, capsys):
    with output_lock(tmp_path / "run"):
        refused(capsys, tmp_path, ev(eval_setup, tmp_path / "run"), "another mixq process")


def test_eval_model_with_a_missing_weight(eval_setup, tiny_model, tmp_path, capsys):
    """Issue 16.1: transformers would fill the weight randomly and give scores; no run folder is created."""
    broken = copy_model(tiny_model("llama"), tmp_path / "broken")
    edit_weights(broken, lambda sd: sd.pop("model.layers.2.self_attn.v_proj.weight"))
    args = ev(eval_setup, tmp_path / "run")
    args[1] = broken
    refused(capsys, tmp_path, args, "model.layers.2.self_attn.v_proj.weight", "missing")


def test_eval_model_does_not_exist(eval_setup, tmp_path, capsys):
    args = ev(eval_setup, tmp_path / "run")
    args[1] = tmp_path / "no-model"
    refused(capsys, tmp_path, args, "no-model")


def test_eval_cut_last_sample_line_is_scored_again(eval_setup, tmp_path, capsys):
    """Not a fault: a finished task whose last samples.jsonl line was cut is not kept with a document short;
    --resume says so and scores the missing document again."""
    run = _finished_run(eval_setup, tmp_path, capsys)
    first = json.loads((run / "results.json").read_text())["tasks"]["boolq"]
    text = (run / "samples.jsonl").read_text()
    (run / "samples.jsonl").write_text(text[:-25])
    rc, _, err = run_cli(capsys, ev(eval_setup, run, "--resume"))
    assert rc == 0 and "scoring the missing ones again" in err
    again = json.loads((run / "results.json").read_text())["tasks"]["boolq"]
    assert again["n"] == first["n"] == 2 and again["acc"] == first["acc"]
    assert len((run / "samples.jsonl").read_text().splitlines()) == 2


def test_ctrl_c_mid_eval_then_resume(tiny_model, tmp_path, capsys):
    """Ctrl-C while documents are scored: one line saying how to continue, samples.jsonl keeps whole lines only,
    and --resume scores each remaining document once."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"passage": f"Item {i} is on the list.", "question": f"is item {i} on the list", "label": i % 2}
            for i in range(48)]
    (data / "boolq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval", tiny_model("llama"), "--tasks", "boolq", "--data-dir", data, "-o", tmp_path / "run"]
    proc = _sub(args, tmp_path)
    samples = tmp_path / "run" / "samples.jsonl"
    _pause_when(proc, lambda: samples.exists() and 0 < len(samples.read_bytes().splitlines()) < len(rows))
    _interrupt(proc)
    _, err = proc.communicate(timeout=120)
    lines = shown(err)
    assert proc.returncode == 130 and TRACEBACK not in err and len(lines) == 1 and "--resume" in lines[0], err
    done = [json.loads(x) for x in samples.read_text().splitlines()]  # whole lines only
    assert 0 < len(done) < len(rows)
    rc, _, err = run_cli(capsys, args + ["--resume"])
    assert rc == 0, err
    ids = [json.loads(x)["doc_id"] for x in samples.read_text().splitlines()]
    assert sorted(ids) == list(range(len(rows)))  # each document once
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["complete"] and res["tasks"]["boolq"]["n"] == len(rows)
    assert res["tasks"]["boolq"]["n_scored_now"] == len(rows) - len(done)


def test_damaged_kld_cache_is_rewritten(tiny_model, tmp_path):
    """Not a fault: a damaged cache entry of the base's distributions (here its output head) is computed again
    once and written back, not recomputed on every later run."""
    from mixq.eval.engine import _tokenizer, model_fingerprint
    from mixq.eval.perplexity import base_cache_path, cached_base_dists, make_windows

    model = tiny_model("llama")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    win = make_windows(_tokenizer(model), text, ctx=16, max_windows=2)
    _, hit = cached_base_dists(str(model), win, progress=False)
    assert not hit
    _, head = base_cache_path(model_fingerprint(str(model)), win, "exact")
    head.write_bytes(b"garbage")
    _, hit = cached_base_dists(str(model), win, progress=False)
    assert not hit and head.read_bytes() != b"garbage"
    _, hit = cached_base_dists(str(model), win, progress=False)
    assert hit


# ================================================================== generate, chat, measure

def gen(model, *extra):
    return ["generate", model, "-p", "hello", *extra]


@pytest.mark.parametrize("option,value", [("--temp", "nan"), ("--temp", "-1"), ("--top-p", "0"), ("--top-p", "1.5"),
                                          ("--max-tokens", "0"), ("--seed", "-3")])
def test_generate_bad_sampling_option(tiny_model, tmp_path, capsys, option, value):
    refused(capsys, tmp_path, gen(tiny_model("llama"), option, value), option)


def test_chat_bad_sampling_option(tiny_model, tmp_path, capsys):
    refused(capsys, tmp_path, ["chat", tiny_model("llama"), "--top-p", "-0.5"], "--top-p")


def test_generate_empty_prompt(tiny_model, tmp_path, capsys):
    refused(capsys, tmp_path, ["generate", tiny_model("llama"), "-p", "   "], "--prompt")


def test_generate_prompt_longer_than_the_context(tiny_model, tmp_path, capsys):
    refused(capsys, tmp_path, ["generate", tiny_model("llama"), "-p", "fox " * 400, "--no-chat-template"],
            "context", "256")


def test_generate_chat_template_the_sandbox_rejects(tiny_model, tmp_path, capsys):
    model = copy_model(tiny_model("llama"), tmp_path / "m")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    refused(capsys, tmp_path, ["generate", model, "-p", "hi"], "chat template", "--no-chat-template")


def test_generate_missing_model(tmp_path, capsys):
    refused(capsys, tmp_path, gen(tmp_path / "nothing"), "nothing")


def test_generate_bad_backend(tiny_model, tmp_path, capsys):
    refused(capsys, tmp_path, gen(tiny_model("llama"), "--backend", "cuda"), "--backend")


@pytest.mark.parametrize("option,value", [("--tokens", "0"), ("--ctx", "1"), ("--draws", "0")])
def test_measure_bad_number(tiny_model, tmp_path, capsys, option, value):
    refused(capsys, tmp_path, ["measure", tiny_model("llama"), option, value, "-o", tmp_path / "m.json"], option)


@pytest.mark.parametrize("option,value", [("--target-bpw", "nan"), ("--target-bpw", "0"), ("--target-size", "0MB")])
def test_plan_bad_target(tiny_model, tmp_path, capsys, option, value):
    refused(capsys, tmp_path, ["plan", tiny_model("llama"), option, value, "-o", tmp_path / "r.toml"], option)



# ================================================================== --device, --max-memory (commands that load)

def loading(command: str, model, tmp_path) -> list:
    """A valid command line of each command that loads a model (the bad option is appended)."""
    return {"eval": ["eval", model, "--tasks", "arc_easy", "--limit", "1", "-o", tmp_path / "run"],
            "measure": ["measure", model, "-o", tmp_path / "m.json"],
            "plan": ["plan", model, "--target-bpw", "6", "-o", tmp_path / "r.toml"],
            "generate": gen(model),
            "chat": ["chat", model]}[command]


@pytest.mark.parametrize("command", ["eval", "measure", "plan", "generate", "chat"])
@pytest.mark.parametrize("option,value", [("--device", "tpu"), ("--device", ""), ("--max-memory", "lots"),
                                          ("--max-memory", "-1"), ("--max-memory", "nan"), ("--max-memory", "inf")])
def test_bad_device_or_memory(tiny_model, tmp_path, capsys, command, option, value):
    """Checked before anything is loaded or written: one line naming the option and the value."""
    refused(capsys, tmp_path, [*loading(command, tiny_model("llama"), tmp_path), option, value], option, repr(value)
            if option == "--max-memory" else value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("command", ["eval", "measure", "plan", "generate", "chat"])
def test_device_cuda_without_one(tiny_model, tmp_path, capsys, command):
    refused(capsys, tmp_path, [*loading(command, tiny_model("llama"), tmp_path), "--device", "cuda"],
            "--device cuda", "--device cpu")

# ================================================================== files mixq writes

def test_atomic_files_are_readable_by_others(tmp_path):
    """Not a fault: files written atomically (results, provenance, cache records) get the mode open() gives,
    not mkstemp's 0600 (a shared cache must be readable by its other users)."""
    f = files.write_atomic(tmp_path / "x.json", "{}")
    assert f.stat().st_mode & 0o777 == files.FILE_MODE


def test_stale_temp_folders_of_live_processes_are_kept(src, tmp_path):
    """Only leftovers of processes that are gone are removed: a live writer's folder (another cache, no common
    lock) stays."""
    from mixq.quant.convert import convert

    live = tmp_path / f".out.tmp-{os.getpid()}-0123abcd"
    dead = tmp_path / ".out.tmp-999999999-0123abcd"
    other = tmp_path / ".out2.tmp-999999999-0123abcd"
    for d in (live, dead, other):
        d.mkdir()
    convert(src, tmp_path / "out", recipe="q4", progress=False)
    assert live.exists() and other.exists() and not dead.exists()
