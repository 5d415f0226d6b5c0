"""The native library's cache: only a library the user built, in a directory only the user can
write, whose sha256 is the one recorded when it was built, is ever loaded. A library planted in
a shared cache never runs (it would leave a marker file from a constructor); a corrupt library,
or one that does not load, is built again; a flag set that fails is passed over and remembered;
`$CC` is split as a shell would; two processes building at once compile once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from test_sampling import gen, prompt, rope_gpt

import chargpt.generation.decode as decode_module
from chargpt.fileio import sha256_file
from chargpt.generation.loop import generate
from chargpt.generation.native import build, structs

if not build.available()[0]:
    pytest.skip(f"no native decode loop here ({build.available()[1]}); install a C compiler "
                "(gcc or clang) to test it", allow_module_level=True)

SRC = Path(__file__).resolve().parents[1] / "src"
WARNING = "the native decode loop's libraries are not kept in the cache"


@pytest.fixture
def dirs(monkeypatch, tmp_path):
    """chargpt's cache directory (`tmp_path/cache`, not made yet) and the temporary directory
    (`tmp_path/tmp`), for a build module that has loaded no library yet."""
    cache, tmp = tmp_path / "cache", tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("CHARGPT_CACHE", str(cache))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(decode_module, "_REPORTED", set())
    build._load.cache_clear()
    yield cache, tmp
    build._load.cache_clear()


def names() -> list[str]:
    """The name of the library of each flag set, with this machine's compiler, first to last."""
    cc = build._compiler()
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True).stdout
    return [f"native_decode-{build._key(cc, version, (*build._BASE_FLAGS, *tuning))}.so"
            for tuning in build._TUNINGS]


def compile_library(out: Path, *sources: str) -> Path:
    """A library compiled from C `sources` (the loop's own file first when it is named)."""
    work = out.parent / f"{out.stem}-src"
    work.mkdir()
    (work / "structs.h").write_text(structs.header())
    files = []
    for i, text in enumerate(sources):
        files.append(work / f"part{i}.c")
        files[-1].write_text(text)
    run = subprocess.run(["gcc", "-O1", "-fPIC", "-shared", "-std=gnu99",
                          "-I", str(build.HERE), "-I", str(work), "-o", str(out),
                          *map(str, files), "-lm"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return out


def planted(out: Path, marker: Path) -> Path:
    """The loop's library itself, built with a constructor that writes `marker` when loaded."""
    constructor = ("#include <stdio.h>\n__attribute__((constructor)) static void planted(void)"
                   f' {{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    return compile_library(out, build.SOURCES[0].read_text(), constructor)


def record(directory: Path, libraries: dict[str, str]) -> None:
    """A record in `directory` claiming these sha256s for these libraries."""
    (directory / "records.json").write_text(json.dumps({"libraries": libraries, "failed": {}}))


def sample_natively() -> torch.Tensor:
    """A sample through the native loop, checked against the torch step."""
    model = rope_gpt().eval()
    got = generate(model, prompt(1, 3), 30, generator=gen(2), temperature=0.9)
    expected = generate(model, prompt(1, 3), 30, generator=gen(2), temperature=0.9,
                        native=False)
    assert torch.equal(got, expected)
    return got


def test_libraries_are_kept_in_a_directory_only_the_user_can_write(dirs):
    cache, _ = dirs
    cache.mkdir()
    (cache / "native").mkdir(mode=0o755)  # made by an older chargpt: tightened
    lib = build.library()
    kept = Path(lib._name).parent
    assert kept == cache.resolve() / "native" and kept.stat().st_mode & 0o777 == 0o700
    assert kept.stat().st_uid == os.geteuid()
    recorded = json.loads((kept / "records.json").read_text())["libraries"]
    assert recorded == {Path(lib._name).name: sha256_file(lib._name)}


@pytest.mark.parametrize("shared", ["cache", "native"])
def test_a_library_planted_in_a_shared_cache_is_never_loaded(dirs, capsys, shared):
    cache, tmp = dirs
    native = cache / "native"
    native.mkdir(parents=True)
    os.chmod(cache if shared == "cache" else native, 0o777)  # anyone may write there
    marker = tmp / "marker"
    evil = planted(tmp / "evil.so", marker)
    for name in names():  # under every name chargpt could look for, with a matching record
        shutil.copy(evil, native / name)
    record(native, {name: sha256_file(evil) for name in names()})
    for _ in range(2):
        sample_natively()
    assert not marker.exists()
    kept = Path(build.library()._name).parent
    assert kept == tmp.resolve() / f"chargpt-native-{os.geteuid()}"
    assert kept.stat().st_mode & 0o777 == 0o700
    err = capsys.readouterr().err
    assert err.count(WARNING) == 1 and "group- or world-writable" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_cache_that_belongs_to_someone_else_is_not_used(dirs, capsys):
    cache, tmp = dirs
    (cache / "native").mkdir(parents=True, mode=0o700)
    os.chown(cache / "native", 65534, 65534)
    lib = build.library()
    assert Path(lib._name).parent == tmp.resolve() / f"chargpt-native-{os.geteuid()}"
    assert "belongs to someone else" in capsys.readouterr().err


def test_a_squatted_private_directory_is_passed_over_for_a_fresh_one(dirs, capsys):
    cache, tmp = dirs
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    (tmp / f"chargpt-native-{os.geteuid()}").mkdir(mode=0o777)
    os.chmod(tmp / f"chargpt-native-{os.geteuid()}", 0o777)
    kept = Path(build.library()._name).parent
    assert kept.parent == tmp.resolve() and kept.name.startswith("chargpt-native-")
    assert kept.name != f"chargpt-native-{os.geteuid()}"
    assert kept.stat().st_mode & 0o777 == 0o700 and WARNING in capsys.readouterr().err


@pytest.mark.parametrize("recorded", [False, True])
def test_a_library_that_differs_from_its_record_is_never_loaded(dirs, recorded):
    cache, tmp = dirs
    native = cache / "native"
    native.mkdir(parents=True, mode=0o700)
    marker = tmp / "marker"
    evil = planted(tmp / "evil.so", marker)
    first = names()[0]
    shutil.copy(evil, native / first)
    # recorded: the record holds another library's sha256 (the file was swapped after it
    # was built); otherwise the record does not name it at all
    record(native, {first: "0" * 64} if recorded else {})
    sample_natively()
    assert not marker.exists()
    assert sha256_file(native / first) != sha256_file(evil)  # built again, over it
    assert json.loads((native / "records.json").read_text())["libraries"][first] == \
        sha256_file(native / first)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing a function"])
def test_a_library_that_is_corrupt_or_does_not_load_is_built_again(dirs, tmp_path, damage):
    cache, _ = dirs
    native = cache / "native"
    native.mkdir(parents=True, mode=0o700)
    first = native / names()[0]
    good = compile_library(tmp_path / "good.so", build.SOURCES[0].read_text())
    if damage == "truncated":  # cut short after it was built: it differs from its record
        first.write_bytes(good.read_bytes()[:5000])
        record(native, {first.name: sha256_file(good)})
    else:  # built as recorded, yet it does not load (loading a truncated one may crash)
        if damage == "garbage":
            first.write_bytes(b"\x7fELF" * 99)
        else:  # it loads, but has no chargpt_fill
            compile_library(first, "long chargpt_layout(long *out, long n) { return 0; }\n")
        record(native, {first.name: sha256_file(first)})
    damaged = sha256_file(first)
    sample_natively()
    assert build.library()._name == str(first)
    assert sha256_file(first) != damaged
    assert json.loads((native / "records.json").read_text())["failed"] == {}


def test_a_flag_set_whose_library_does_not_load_is_passed_over_and_remembered(dirs,
                                                                              monkeypatch):
    cache, _ = dirs
    first, second = names()[:2]
    load = build.ctypes.CDLL

    def refuse_first(path, *args, **kwargs):
        if Path(path).name == first:
            raise OSError(f"{path}: cannot load (injected)")
        return load(path, *args, **kwargs)

    monkeypatch.setattr(build.ctypes, "CDLL", refuse_first)
    assert Path(build.library()._name).name == second
    failed = json.loads((cache / "native" / "records.json").read_text())["failed"]
    assert len(failed) == 1 and "cannot load (injected)" in next(iter(failed.values()))
    monkeypatch.setattr(build.ctypes, "CDLL", load)
    compiled = []
    monkeypatch.setattr(build, "_compile", lambda *a: compiled.append(a) or "not called")
    build._load.cache_clear()  # as a new process: the first flag set is not tried again
    assert Path(build.library()._name).name == second and compiled == []


def wrapper(path: Path, log: Path, body: str = "", run: str = '"$@"') -> Path:
    """A compiler wrapper script at `path` that logs each compilation (a call with -o) to
    `log`, runs `body` (shell), then `run`: the command it was given, by default."""
    path.write_text(f'#!/bin/sh\ncase " $* " in *" -o "*) echo "$*" >> "{log}"; {body} ;; '
                    f'esac\nexec {run}\n')
    path.chmod(0o755)
    return path


def test_failed_flag_sets_are_not_tried_again(dirs, tmp_path, monkeypatch):
    log = tmp_path / "compiles.log"
    # a compiler that refuses -march=native, as some do
    cc = wrapper(tmp_path / "cc-wrapper", log, 'case " $* " in *-march=native*) exit 1 ;; esac')
    monkeypatch.setenv("CC", f"{cc} gcc")
    assert build.available()[0]
    tried = log.read_text().splitlines()
    assert sum("-march=native" in line for line in tried) == 2  # both such flag sets failed
    assert "-march=native" not in tried[-1]  # and the next one that builds is used
    build._load.cache_clear()
    assert build.available()[0]
    assert log.read_text().splitlines() == tried  # nothing compiled again, nothing retried


def test_cc_is_split_as_a_shell_would(dirs, tmp_path, monkeypatch):
    log = tmp_path / "compiles.log"
    cc = wrapper(tmp_path / "ccache", log)  # `ccache gcc`, the usual form
    monkeypatch.setenv("CC", f"{cc} gcc")
    ok, why = build.available()
    assert ok, why
    assert log.read_text().startswith("gcc ")
    build._load.cache_clear()
    monkeypatch.setenv("CC", "'unbalanced gcc")
    ok, why = build.available()
    assert not ok and "no C compiler found" in why


def test_two_processes_building_at_once_compile_once(dirs, tmp_path):
    cache, tmp = dirs
    log = tmp_path / "compiles.log"
    # gcc, slowly: a build long enough for the other process to start its own, if it could
    cc = wrapper(tmp_path / "slow-gcc", log, "sleep 2", run='gcc "$@"')
    env = {**os.environ, "CHARGPT_CACHE": str(cache), "TMPDIR": str(tmp), "CC": str(cc),
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    code = "from chargpt.generation.native import build; print(build.library()._name)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0] and len(log.read_text().splitlines()) == 1
