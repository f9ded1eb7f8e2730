"""klq-convert cannot delete its input, read outside it, leave debris, lose DST on --overwrite, or
write a tokenizer that does not fit the embedding (issue 14: each example + one more of its kind)."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments import cli
from tests.helpers import testing
from klq_jax.models import hf
from klq_jax.models.hf import files


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    testing.tiny_hf_gpt_neox(d, seed=21)
    return d


def _snapshot(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _cli(*args):
    """``klq convert ARGS`` in process: the exit status (2 and one line on stderr for our errors)."""
    return cli.run("convert", ["--no-compile-cache", *map(str, args)])


# ------------------------------------------------------------------------------------------------
# Overlapping SRC / DST
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["same-dir", "dst-parent-of-src", "src-parent-of-dst", "flax-to-hf-same-dir"])
def test_overlapping_src_dst_refused_and_src_kept(tmp_path, tiny_src, capsys, layout):
    parent = tmp_path / "parent"
    src = parent / "model"
    shutil.copytree(tiny_src, src)
    (parent / "other.txt").write_text("keep me")
    if layout == "flax-to-hf-same-dir":
        assert _cli("hf-to-flax", src, tmp_path / "flax") == 0
        src = tmp_path / "flax"
    before, before_parent = _snapshot(src), _snapshot(parent)
    cmd = "flax-to-hf" if layout == "flax-to-hf-same-dir" else "hf-to-flax"
    dst = {"same-dir": src, "dst-parent-of-src": parent, "src-parent-of-dst": src / "out",
           "flax-to-hf-same-dir": src}[layout]
    assert _cli(cmd, "--overwrite", src, dst) == 2
    err = capsys.readouterr().err
    assert "SRC" in err and "DST" in err and "separate directory" in err and "Traceback" not in err
    assert _snapshot(src) == before and _snapshot(parent) == before_parent


# ------------------------------------------------------------------------------------------------
# Reading only plain files inside SRC
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["../outside/x.safetensors", "ABSOLUTE", "shards/../../outside/x.safetensors"])
def test_index_pointing_outside_src_is_refused(tmp_path, tiny_src, where):
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    (tmp_path / "outside").mkdir()
    # A perfectly readable checkpoint outside SRC: reading it would succeed, so only the check stops it.
    os.replace(src / "model.safetensors", tmp_path / "outside" / "x.safetensors")
    target = str(tmp_path / "outside" / "x.safetensors") if where == "ABSOLUTE" else where
    names = list(load_file(str(tmp_path / "outside" / "x.safetensors")))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))
    with pytest.raises(hf.ConversionError, match="refusing to read outside the checkpoint directory") as e:
        hf.load_hf(src)
    assert str(src / "model.safetensors.index.json") in str(e.value)


def test_index_naming_a_non_regular_file_is_refused(tmp_path, tiny_src):
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    sd = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    (src / "shard.safetensors").mkdir()  # a directory where a shard should be
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: "shard.safetensors" for n in sd}}))
    with pytest.raises(hf.ConversionError, match="is not a regular file"):
        hf.load_hf(src)


# ------------------------------------------------------------------------------------------------
# Temporary directories: cleaned up, also after a killed run
# ------------------------------------------------------------------------------------------------


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temp_dir_of_a_killed_run_is_removed(tmp_path, tiny_src):
    stale = tmp_path / f".out.tmp-{_dead_pid()}-0123abcd"
    stale.mkdir()
    (stale / "params.safetensors").write_bytes(b"x" * 1000)  # a killed run's half-written output
    live_child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.tmp-{live_child.pid}-4567cdef"  # a run still going: left alone
        live.mkdir()
        assert _cli("hf-to-flax", tiny_src, tmp_path / "out") == 0
        assert not stale.exists() and live.exists()
    finally:
        live_child.kill()
        live_child.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "out"]


def test_set_aside_old_dst_of_a_killed_overwrite_is_restored(tmp_path, tiny_src):
    """A kill between 'old DST aside' and 'new DST in' (no atomic exchange) is repaired next time."""
    assert _cli("hf-to-flax", tiny_src, tmp_path / "out") == 0
    before = _snapshot(tmp_path / "out")
    os.rename(tmp_path / "out", tmp_path / f".out.old-{_dead_pid()}-89abcdef")  # the killed run's state
    (tmp_path / f".out.tmp-{_dead_pid()}-fedcba98").mkdir()
    done = hf.clean_stale(tmp_path / "out")
    assert any("restored" in line for line in done)
    assert _snapshot(tmp_path / "out") == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------------------------------------
# --overwrite keeps DST whole
# ------------------------------------------------------------------------------------------------


def test_overwrite_failing_while_writing_keeps_the_old_dst(tmp_path, tiny_src, monkeypatch):
    assert _cli("hf-to-flax", tiny_src, tmp_path / "out") == 0
    before = _snapshot(tmp_path / "out")

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "write_weights", fail)
    monkeypatch.setattr("klq_jax.models.hf.convert.write_weights", fail)
    assert _cli("hf-to-flax", "--overwrite", tiny_src, tmp_path / "out") == 2
    assert _snapshot(tmp_path / "out") == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_swaps_atomically_and_restores_when_the_swap_fails(tmp_path, tiny_src, monkeypatch):
    assert _cli("hf-to-flax", tiny_src, tmp_path / "out") == 0
    config, _, params = hf.load_flax(tmp_path / "out")
    # With an atomic exchange DST is never renamed away: the only operation on it is the swap.
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((str(a), str(b))), real_rename(a, b))[1])
    if files._exchange(tmp_path / "out", tmp_path / "out"):  # this filesystem supports RENAME_EXCHANGE
        hf.save_flax(tmp_path / "out", config.replace(dtype="bfloat16"), params, overwrite=True)
        assert not [r for r in renames if r[0] == str(tmp_path / "out")]
        assert hf.read_flax_config(tmp_path / "out").dtype == "bfloat16"
    # Without it: old DST aside, new in; if moving the new one in fails, the old one is restored.
    before = _snapshot(tmp_path / "out")
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)

    def flaky(a, b):
        if ".tmp-" in str(a):
            raise OSError(5, "Input/output error")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises(hf.ConversionError, match=f"in place at {re.escape(str(tmp_path / 'out'))} .*Input/output error"):
        hf.save_flax(tmp_path / "out", config, params, overwrite=True)
    assert _snapshot(tmp_path / "out") == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("klq convert: error: "), err
    return err[0]


def test_overwrite_refuses_a_directory_that_is_no_conversion_output_and_deletes_nothing(tmp_path, tiny_src, capsys):
    """--overwrite used to delete whatever DST held (a user's documents: thesis.txt, sub/data.csv)."""
    docs = tmp_path / "mydocs"
    (docs / "sub").mkdir(parents=True)
    (docs / "thesis.txt").write_text("thesis")
    (docs / "sub" / "data.csv").write_text("x")
    before = _snapshot(docs)
    assert _cli("hf-to-flax", tiny_src, docs) == 2  # without --overwrite: says what --overwrite would replace
    assert "choose a new output directory (--overwrite replaces only a previous conversion output" \
        in _one_error_line(capsys)
    for cmd in ("hf-to-flax", "flax-to-hf"):
        src = tiny_src if cmd == "hf-to-flax" else tmp_path / "flax"
        if cmd == "flax-to-hf":
            assert _cli("hf-to-flax", tiny_src, src) == 0
            capsys.readouterr()
        assert _cli(cmd, "--overwrite", src, docs) == 2
        line = _one_error_line(capsys)
        assert ("--overwrite replaces only a previous conversion output" in line
                and "sub (not written by a conversion); thesis.txt (not written by a conversion)" in line
                and "The conversion will not delete them: choose another DST." in line), line
        assert _snapshot(docs) == before and sorted(os.listdir(docs)) == ["sub", "thesis.txt"]
    # One more of the kind: a conversion's file names, a user's content or a user's file among them.
    hf_dir = tmp_path / "hf"
    assert _cli("flax-to-hf", tmp_path / "flax", hf_dir) == 0
    (hf_dir / "README.md").write_text("my model card")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "tokenizer.json").write_text("{}")
    # review s7 F2: a directory (or a link to one) under an output file's name was deleted with what it held.
    shutil.copytree(hf_dir, tmp_path / "hf2")
    (tmp_path / "hf2" / "README.md").unlink()
    (tmp_path / "hf2" / "tokenizer.json").mkdir()
    (tmp_path / "hf2" / "tokenizer.json" / "precious").write_text("x")
    shutil.copytree(tmp_path / "hf2", tmp_path / "hf3")
    shutil.rmtree(tmp_path / "hf3" / "tokenizer.json")
    (tmp_path / "hf3" / "vocab.txt").symlink_to(docs, target_is_directory=True)
    # review s7 F3: a model the user saved with transformers (names as an export's) is not ours to replace.
    testing.tiny_hf_gpt_neox(tmp_path / "finetuned", seed=5)
    for dst, named in ((tmp_path / "finetuned", "model.safetensors (not written by klq convert: no klq_jax_export mark"),
                       (hf_dir, "README.md (not written by a conversion)"),
                       (mine, "config.json (not the config of a Hugging Face export)"),
                       (tmp_path / "hf2", "tokenizer.json (a directory; a conversion writes a file)"),
                       (tmp_path / "hf3", "vocab.txt (a symbolic link)")):
        before = _snapshot(dst)
        capsys.readouterr()
        assert _cli("hf-to-flax", "--overwrite", tiny_src, dst) == 2
        assert named in _one_error_line(capsys)
        assert _snapshot(dst) == before


def test_overwrite_replaces_a_previous_conversion_output_of_either_direction(tmp_path, tiny_src):
    flax, hf_dir = tmp_path / "flax", tmp_path / "hf"
    assert _cli("hf-to-flax", tiny_src, flax) == 0 and _cli("flax-to-hf", flax, hf_dir) == 0
    # onto its own kind: a klq_jax checkpoint (rewritten in bfloat16), a Hugging Face export (sharded)
    assert _cli("hf-to-flax", "--overwrite", "--dtype", "bfloat16", tiny_src, flax) == 0
    assert hf.read_flax_config(flax).dtype == "bfloat16"
    assert _cli("flax-to-hf", "--overwrite", "--max-shard-size", "20KB", flax, hf_dir) == 0
    assert (hf_dir / "model.safetensors.index.json").is_file() and not (hf_dir / "model.safetensors").exists()
    # onto the other kind: the sharded export is replaced by a checkpoint, and back
    assert _cli("hf-to-flax", "--overwrite", tiny_src, hf_dir) == 0
    assert (hf_dir / "klq_config.json").is_file() and not list(hf_dir.glob("model*"))
    assert _cli("flax-to-hf", "--overwrite", hf_dir, flax) == 0
    assert (flax / "config.json").is_file() and not (flax / "klq_config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["flax", "hf"]


def test_overwrite_refuses_a_directory_a_live_run_holds(tmp_path, tiny_src, capsys):
    """--overwrite used to replace a live training run's directory, its lock included."""
    out = tmp_path / "out"
    assert _cli("hf-to-flax", tiny_src, out) == 0  # a conversion output: only the lock is in the way
    with testing.held_by_another_process(out) as pid:
        before = _snapshot(out)
        capsys.readouterr()
        assert _cli("hf-to-flax", "--overwrite", tiny_src, out) == 2
        line = _one_error_line(capsys)
        assert f"is in use by another training run (pid {pid}" in line and "choose another DST" in line, line
        assert _snapshot(out) == before
    # The holder died: its stale lock no longer refuses a previous conversion's directory.
    assert _cli("hf-to-flax", "--overwrite", tiny_src, out) == 0
    assert not (out / ".klq-run.lock").exists()
    # A lock written on another host (a shared filesystem) cannot be checked from here: refused,
    # as the trainer refuses it, saying how to clear it.
    (out / ".klq-run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere-7", "started": 0}))
    before = _snapshot(out)
    capsys.readouterr()
    assert _cli("hf-to-flax", "--overwrite", tiny_src, out) == 2
    line = _one_error_line(capsys)
    assert "host elsewhere-7" in line and "cannot check" in line and "delete " in line, line
    assert _snapshot(out) == before


@pytest.mark.parametrize("exchange", ["as-the-filesystem-allows", "without-exchange"])
def test_overwrite_of_a_dst_symlink_replaces_the_link_and_leaves_no_debris(tmp_path, tiny_src, monkeypatch, exchange):
    """DST a symlink to an unrelated directory: --overwrite puts the new output in the link's place,
    leaves no .DST.tmp-*/.old-* link behind, and never touches the directory the link pointed to."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("unrelated, keep me")
    (other / "sub").mkdir()
    (other / "sub" / "data.bin").write_bytes(b"\x00" * 64)
    before = _snapshot(other)
    work = tmp_path / "work"
    work.mkdir()
    (work / "out").symlink_to(other, target_is_directory=True)
    stale = work / f".out.tmp-{_dead_pid()}-0123abcd"  # what an earlier version left: a link to `other`
    stale.symlink_to(other, target_is_directory=True)
    if exchange == "without-exchange":
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    assert _cli("hf-to-flax", tiny_src, work / "out") == 2  # a non-empty DST without --overwrite
    assert _cli("hf-to-flax", "--overwrite", tiny_src, work / "out") == 0
    assert sorted(os.listdir(work)) == ["out"]
    assert not (work / "out").is_symlink() and (work / "out" / "klq_config.json").is_file()
    assert _snapshot(other) == before and sorted(os.listdir(other)) == ["notes.txt", "sub"]


def test_a_broken_symlink_dst_is_refused_in_one_line(tmp_path, tiny_src, capsys):
    (tmp_path / "out").symlink_to(tmp_path / "gone", target_is_directory=True)
    assert _cli("hf-to-flax", "--overwrite", tiny_src, tmp_path / "out") == 2
    assert "is a broken symlink; choose another output path" in capsys.readouterr().err
    assert (tmp_path / "out").is_symlink() and sorted(os.listdir(tmp_path)) == ["out"]
    # A link to a file is no broken link (it used to be called one): a DST that is not a directory.
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "to-file").symlink_to(tmp_path / "notes.txt")
    assert _cli("hf-to-flax", "--overwrite", tiny_src, tmp_path / "to-file") == 2
    assert "to-file exists and is not a directory; choose another output path" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "to-file").is_symlink()


def test_a_dst_of_dot_or_dotdot_is_refused_in_one_line(tmp_path, tiny_src, capsys, monkeypatch):
    """DST "." or ".." (even with --overwrite) used to fail with "[Errno 16] Device or resource busy"."""
    here = tmp_path / "a" / "here"
    here.mkdir(parents=True)
    (here / "mine.txt").write_text("mine")
    monkeypatch.chdir(here)
    for dst in (".", "..", ""):
        capsys.readouterr()
        assert _cli("hf-to-flax", "--overwrite", tiny_src, dst) == 2
        err = capsys.readouterr().err.strip()
        assert "is the current directory or a parent of it; name the output directory" in err and "\n" not in err
    assert sorted(os.listdir(here)) == ["mine.txt"] and os.listdir(tmp_path / "a") == ["here"]


def test_a_read_only_dst_location_is_one_line_naming_dst(tmp_path, tiny_src, capsys):
    """newcomer 3 #5: a read-only location gave `[Errno 30] Read-only file system: '.ck.tmp-...'`,
    our hidden temp directory's name, instead of the DST the user gave, and no advice."""
    ro = tmp_path / "ro"
    ro.mkdir()
    for dst in (ro / "ck", ro / "sub" / "ck"):  # the temp sibling, or DST's parent, cannot be made
        capsys.readouterr()
        with testing.read_only(ro):
            assert _cli("hf-to-flax", tiny_src, dst) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"klq convert: error: Cannot create the output directory {dst} (") and "\n" not in err, err
        assert "choose a writable output directory" in err and ".tmp-" not in err and "Errno" not in err, err
    assert os.listdir(ro) == []


@pytest.mark.parametrize("how", ["safetensors", "config-file", "tokenizer-copy"])
def test_a_full_disk_while_writing_is_one_line_naming_dst(tmp_path, tiny_src, capsys, monkeypatch, how):
    """review s7 F7: safetensors' SafetensorError on a full disk gave a traceback and exit 1; an
    OSError from writing a config or copying the tokenizer named our temp directory."""
    import errno
    import pathlib

    import safetensors.numpy
    from safetensors import SafetensorError

    def full(*a, **k):
        if how == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device")

    target = {"safetensors": (safetensors.numpy, "save_file"), "config-file": (pathlib.Path, "write_text"),
              "tokenizer-copy": (shutil, "copy2")}[how]
    monkeypatch.setattr(*target, full)
    dst = tmp_path / "out"
    capsys.readouterr()
    assert _cli("hf-to-flax", tiny_src, dst) == 2
    err = _one_error_line(capsys)
    assert f"Could not write the output directory {dst} (OSError: No space left on device)" in err, err
    assert "free disk space or choose another output directory" in err and ".tmp-" not in err, err
    assert os.listdir(tmp_path) == []


def test_a_dst_that_is_a_mount_point_is_refused_before_writing(tmp_path, tiny_src, capsys, monkeypatch):
    """review s7 F6: a mounted DST (a container volume) was written whole beside it, then the swap
    failed with EBUSY naming our temp directory."""
    dst = tmp_path / "volume"
    dst.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(dst) or real(p))
    written = []
    monkeypatch.setattr(files, "write_weights", lambda *a, **k: written.append(a))
    monkeypatch.setattr("klq_jax.models.hf.convert.write_weights", lambda *a, **k: written.append(a))
    capsys.readouterr()
    assert _cli("hf-to-flax", tiny_src, dst) == 2
    err = _one_error_line(capsys)
    assert f"{dst} is a mount point" in err and f"new directory inside it, e.g. {dst / 'model'}" in err, err
    assert written == [] and os.listdir(tmp_path) == ["volume"] and os.listdir(dst) == []


@pytest.mark.parametrize("code", ["EBUSY", "EXDEV"])
def test_a_swap_the_os_refuses_names_dst_and_keeps_it(tmp_path, tiny_src, capsys, monkeypatch, code):
    import errno

    assert _cli("hf-to-flax", tiny_src, tmp_path / "out") == 0
    before = _snapshot(tmp_path / "out")

    def refuse(a, b):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), str(a))

    monkeypatch.setattr(files, "_exchange", refuse)
    capsys.readouterr()
    assert _cli("hf-to-flax", "--overwrite", tiny_src, tmp_path / "out") == 2
    err = _one_error_line(capsys)
    assert f"in place at {tmp_path / 'out'} (OSError: {os.strerror(getattr(errno, code))})" in err, err
    assert ".tmp-" not in err and "convert into a new directory" in err, err
    assert _snapshot(tmp_path / "out") == before and os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("dst_at_start", ["absent", "empty"])
def test_a_dst_another_process_fills_meanwhile_is_left_alone(tmp_path, dst_at_start):
    """review s7 F8: two conversions into one new DST both said "wrote"; the second replaced the first."""
    dst = tmp_path / "out"
    if dst_at_start == "empty":
        dst.mkdir()
    with pytest.raises(hf.ConversionError, match="written by another process meanwhile"):
        with files.AtomicDir(dst, False) as tmp:
            (tmp / "ours.txt").write_text("ours")
            dst.mkdir(exist_ok=True)
            (dst / "theirs.txt").write_text("theirs")  # the other process finished first
    assert _snapshot(dst) == {"theirs.txt": b"theirs"} and os.listdir(tmp_path) == ["out"]
    with files.AtomicDir(tmp_path / "new", False) as tmp:  # absent and left so: written
        (tmp / "ours.txt").write_text("ours")
    assert _snapshot(tmp_path / "new") == {"ours.txt": b"ours"}


# ------------------------------------------------------------------------------------------------
# A tokenizer larger than the embedding
# ------------------------------------------------------------------------------------------------


def test_tokenizer_larger_than_embedding_refused(tmp_path, tiny_src, capsys):
    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)  # vocab_size 64
    vocab = {f"t{i}": i for i in range(60)}
    added = [{"id": 60 + i, "content": f"<x{i}>", "special": True} for i in range(10)]  # ids up to 69
    (src / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": added}))
    assert _cli("hf-to-flax", src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "70 tokens" in err and "64 rows" in err and not (tmp_path / "out").exists()


def test_a_tokenizer_dir_without_tokenizer_files_lists_only_tokenizer_files(tmp_path, tiny_src):
    """A model directory (config.json, generation_config.json, weights) passed as the tokenizer: the
    error lists the tokenizer files looked for, not generation_config.json, which is there."""
    assert (tiny_src / "generation_config.json").is_file()
    config, _, params = hf.load_hf(tiny_src)
    with pytest.raises(hf.ConversionError, match="No tokenizer files in") as info:
        hf.save_hf(tmp_path / "hf", config, params, tokenizer_dir=tiny_src)
    looked = ast.literal_eval(re.search(r"looked for (\[.*?\])", str(info.value)).group(1))
    assert "tokenizer.json" in looked and not [n for n in looked if (tiny_src / n).exists()]
    with pytest.raises(hf.ConversionError, match=r"No tokenizer files in .*nowhere \(no such directory\)"):
        hf.save_hf(tmp_path / "hf2", config, params, tokenizer_dir=tmp_path / "nowhere")


def test_tokenizer_from_vocab_and_added_tokens_larger_than_embedding_refused(tmp_path, tiny_src):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(64)}))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (tok / "added_tokens.json").write_text(json.dumps({"<pad>": 64}))
    assert files.tokenizer_size(tok) == 65
    config, _, params = hf.load_hf(tiny_src)
    with pytest.raises(hf.ConversionError, match="has 65 tokens but the model's embedding has only 64 rows"):
        hf.save_hf(tmp_path / "hf", config, params, tokenizer_dir=tok)
    assert not (tmp_path / "hf").exists()
    # One that fits is copied.
    (tok / "added_tokens.json").write_text(json.dumps({"<pad>": 63}))
    hf.save_hf(tmp_path / "hf", config, params, tokenizer_dir=tok)
    assert (tmp_path / "hf" / "vocab.json").is_file()
    np.testing.assert_array_equal(
        load_file(str(tmp_path / "hf" / "model.safetensors"))["gpt_neox.embed_in.weight"],
        load_file(str(tiny_src / "model.safetensors"))["gpt_neox.embed_in.weight"],
    )


@pytest.mark.parametrize("kept", [("vocab.txt",), ("tokenizer.model",), ("tokenizer.json", "chat_template.jinja")])
def test_flax_to_hf_copies_every_tokenizer_file_kept_in_src(tmp_path, tiny_src, kept):
    """review s7 F5: only tokenizer.json / tokenizer_config.json / special_tokens_map.json /
    vocab.json / merges.txt made SRC count as a tokenizer: a vocab.txt-only (BERT) or
    tokenizer.model-only (sentencepiece) tokenizer was dropped without a word."""
    src = tmp_path / "hf"
    shutil.copytree(tiny_src, src)
    contents = {"vocab.txt": "[PAD]\n[UNK]\nhello\n", "tokenizer.model": "\x00sentencepiece bytes",
                "tokenizer.json": json.dumps({"model": {"vocab": {"a": 0, "b": 1}}, "added_tokens": []}),
                "chat_template.jinja": "{{ messages }}"}
    for n in kept:
        (src / n).write_text(contents[n])
    assert _cli("hf-to-flax", src, tmp_path / "flax") == 0
    assert _cli("flax-to-hf", tmp_path / "flax", tmp_path / "back") == 0
    for n in kept:
        assert (tmp_path / "back" / n).read_text() == contents[n], n


def test_values_beyond_float16_range_are_refused_not_made_inf(tmp_path, capsys):
    """review s7 F9: a bias of 1e5 became inf in float16 both ways, exit 0 (a numpy warning only)."""
    import torch

    model = testing.tiny_hf_gpt_neox()
    with torch.no_grad():
        model.gpt_neox.layers[0].mlp.dense_h_to_4h.bias[3] = -1.0e5
    model.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    assert _cli("hf-to-flax", "--param-dtype", "float16", tmp_path / "hf", tmp_path / "f16") == 2
    line = _one_error_line(capsys)
    assert "Tensor 'gpt_neox.layers.0.mlp.dense_h_to_4h.bias'" in line and "values up to 1e+05" in line, line
    assert "bfloat16 or float32" in line and not (tmp_path / "f16").exists(), line
    assert _cli("hf-to-flax", tmp_path / "hf", tmp_path / "f32") == 0  # float32 holds it; so does bfloat16
    assert _cli("flax-to-hf", "--dtype", "bfloat16", tmp_path / "f32", tmp_path / "bf16") == 0
    capsys.readouterr()
    assert _cli("flax-to-hf", "--dtype", "float16", tmp_path / "f32", tmp_path / "hf16") == 2
    line = _one_error_line(capsys)
    assert "Tensor 'gpt_neox.layers.0.mlp.dense_h_to_4h.bias' has values up to 1e+05" in line, line
    assert not (tmp_path / "hf16").exists()
    # Values within range still convert (the largest finite float16 included).
    with torch.no_grad():
        model.gpt_neox.layers[0].mlp.dense_h_to_4h.bias[3] = 65504.0
    model.save_pretrained(tmp_path / "hf-ok")
    assert _cli("hf-to-flax", "--param-dtype", "float16", tmp_path / "hf-ok", tmp_path / "ok16") == 0
    _, _, params = hf.load_flax(tmp_path / "ok16")
    assert float(params["layers"][0]["mlp"]["up_bias"][...][3]) == 65504.0


def test_written_weights_are_the_same_bytes_whatever_the_metadata_order(tmp_path):
    """safetensors writes its metadata keys in a random order (a Rust HashMap): two exports of one
    model differed in their bytes (save_hf's format + klq_jax_export mark, save_flax's format + version)."""
    spec = {"w": files.TensorSpec((2, 3), np.dtype(np.float32), lambda: np.arange(6.0).reshape(2, 3))}
    meta = {"format": "pt", "klq_jax_export": "1", "version": "1", "z": "last"}
    outs = set()
    for i in range(12):
        (tmp_path / str(i)).mkdir()
        files.write_weights(tmp_path / str(i), spec, metadata=meta)
        outs.add((tmp_path / str(i) / "model.safetensors").read_bytes())
    assert len(outs) == 1
    (out,) = outs
    assert b'{"__metadata__":{"format":"pt","klq_jax_export":"1","version":"1","z":"last"},' in out
    np.testing.assert_array_equal(load_file(tmp_path / "0" / "model.safetensors")["w"], np.arange(6.0).reshape(2, 3))
