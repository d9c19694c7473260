"""No torn checkpoint: saves killed at every filesystem step and at random times, concurrent saves and reads,
file modes, the process umask, stray temporaries and the folder lock (funcpeft._atomic)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _models import MLP

import funcpeft as fp
import funcpeft._atomic as atomic

DRIVER = Path(__file__).with_name("_io_driver.py")
ROOT = Path(__file__).resolve().parents[1]
FILES = ["adapter_config.json", "adapter_model.safetensors"]
CONFIG_TMP = ".adapter_config.json.funcpeft-"
STALE_CONFIG = ".adapter_config.json.funcpeft-0123456789abcdef.tmp"  # seeded by the driver


def _drive(mode: str, tmp_path: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, str(DRIVER), mode, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_save_killed_at_every_filesystem_step_loads_the_old_or_the_new_checkpoint(tmp_path: Path) -> None:
    report = _drive("steps", tmp_path)
    for kind, (old, new, follow) in report["kinds"].items():
        rows = [r for r in report["results"] if r[0] == kind]
        assert len(rows) == len(report["calls"][kind]) + 1 > 15  # one kill before each call, and none
        outcomes = [outcome for _, _, outcome, _, _, _ in rows]
        assert set(outcomes) <= {old, new}, (kind, outcomes)
        switch = outcomes.index(new)
        assert outcomes == [old] * switch + [new] * (len(outcomes) - switch), (kind, outcomes)  # never back
        # killed just before renaming the config: new weights, old config, the new config's temporary: rolled forward
        between = [i for i, call in enumerate(report["calls"][kind]) if call == "replace"][1]
        assert rows[between][2] == new
        assert any(n.startswith(CONFIG_TMP) and n != STALE_CONFIG for n in rows[between][3]), rows[between][3]
        for _, kill_at, _, _, after, files in rows:  # the next save completes and removes the strays
            assert after == follow, (kind, kill_at)
            assert files == (FILES if kind == "fresh" else ["README.md", *FILES]), (kind, kill_at, files)


def test_save_killed_at_random_times_loads_the_old_or_the_new_checkpoint(tmp_path: Path) -> None:
    outcomes = _drive("random", tmp_path)["outcomes"]
    assert len(outcomes) == 30 and set(outcomes) <= {"A", "B"}, outcomes


def test_concurrent_saves_to_one_folder_never_tear_it(tmp_path: Path) -> None:
    report = _drive("concurrent", tmp_path)
    assert report["writer_codes"] == [0, 0]
    assert len(report["reads"]) > 100 and set(report["reads"]) <= {"A", "B"}, set(report["reads"])
    assert report["final"] in {"A", "B"} and report["files"] == FILES


def _adapter(seed: int = 0) -> tuple[fp.Params, fp.LoraConfig]:
    config = fp.LoraConfig(target_modules=["lin0", "lin1"], init_lora_weights=False)
    return fp.adapt(MLP(), config, generator=torch.Generator().manual_seed(seed))[0], config


def _umask() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask in /proc/self/status")


def test_save_never_changes_the_process_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mask = _umask()

    def forbidden(*args: object) -> int:
        raise AssertionError("os.umask is process-wide state; save must not call it")

    monkeypatch.setattr(os, "umask", forbidden)
    stop, modes = threading.Event(), set()

    def create_files() -> None:  # another thread of the program, creating files meanwhile
        i = 0
        while not stop.is_set():
            path = tmp_path / "other" / f"f{i % 50}"
            path.unlink(missing_ok=True)
            with open(path, "w"):
                pass
            modes.add(path.stat().st_mode & 0o777)
            i += 1

    (tmp_path / "other").mkdir()
    thread = threading.Thread(target=create_files)
    thread.start()
    try:
        params, config = _adapter()
        for i in range(20):
            fp.save(tmp_path / f"ckpt{i % 2}", params, config)
    finally:
        stop.set()
        thread.join()
    assert modes == {0o666 & ~mask}
    for name in FILES:
        assert (tmp_path / "ckpt0" / name).stat().st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.parametrize("modes", [(0o600, 0o600), (0o660, 0o640)], ids=["600", "660-640"])
def test_saving_over_a_checkpoint_keeps_its_file_modes(tmp_path: Path, modes: tuple[int, int]) -> None:
    params, config = _adapter()
    fp.save(tmp_path, params, config)
    for name, mode in zip(FILES, modes, strict=True):
        os.chmod(tmp_path / name, mode)
    fp.save(tmp_path, _adapter(seed=1)[0], config)  # PEFT overwrites in place: its files keep their modes
    assert [(tmp_path / name).stat().st_mode & 0o7777 for name in FILES] == list(modes)


def test_only_funcpeft_stray_temporaries_are_removed(tmp_path: Path) -> None:
    params, config = _adapter()
    fp.save(tmp_path, params, config)
    ours = [
        ".adapter_config.json.funcpeft-0123456789abcdef.tmp",
        ".adapter_model.safetensors.funcpeft-00ff00ff00ff00ff.tmp",
    ]
    others = [
        ".adapter_config.json.funcpeft-0123456789abcdeg.tmp",  # not hex
        ".adapter_config.json.funcpeft-0123456789abcdef.tmp.bak",
        ".adapter_model.safetensors.a1b2c3d4.tmp",  # another tool's (or tempfile's) temporary
        "adapter_config.json.funcpeft-0123456789abcdef.tmp",  # not hidden
        ".tokenizer.json.funcpeft-0123456789abcdef.tmp",
        "README.md",
    ]
    for name in ours + others:
        (tmp_path / name).write_text("x")
    fp.save(tmp_path, params, config)
    assert sorted(os.listdir(tmp_path)) == sorted(others + FILES)


def test_a_save_waits_for_the_saver_holding_the_lock_and_spares_its_temporaries(tmp_path: Path) -> None:
    params, config = _adapter()
    fp.save(tmp_path, params, config)
    live = tmp_path / ".adapter_config.json.funcpeft-0123456789abcdef.tmp"
    done = threading.Event()
    with atomic.locked(tmp_path):  # another saver, between writing its temporaries and renaming them
        live.write_text("{}")
        thread = threading.Thread(target=lambda: (fp.save(tmp_path, _adapter(seed=1)[0], config), done.set()))
        thread.start()
        time.sleep(0.3)
        assert not done.is_set() and live.exists()
    thread.join(timeout=10)
    assert done.is_set() and not live.exists()  # after the lock: a stray now, removed
    loaded, _ = fp.load(tmp_path)
    assert torch.equal(loaded["lin0"]["lora_A"], _adapter(seed=1)[0]["lin0"]["lora_A"])


def test_the_lock_falls_back_to_a_lock_file_where_directories_cannot_be_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    real = fcntl.flock

    def no_directory_locks(fd: int, op: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EBADF, "Bad file descriptor")  # as NFS answers for a read-only descriptor
        real(fd, op)

    monkeypatch.setattr(fcntl, "flock", no_directory_locks)
    params, config = _adapter()
    fp.save(tmp_path, params, config)
    assert sorted(os.listdir(tmp_path)) == [".funcpeft.lock", *FILES]
    fp.save(tmp_path, params, config)
    assert fp.load(tmp_path)[1] == config


def test_new_weights_beside_the_config_they_replaced_are_refused_as_torn(tmp_path: Path) -> None:
    params, config = _adapter()
    fp.save(tmp_path, params, config)
    old = (tmp_path / "adapter_config.json").read_bytes()
    fp.save(tmp_path, _adapter(seed=1)[0], config.replace(lora_alpha=3))
    (tmp_path / "adapter_config.json").write_bytes(old)  # what a kill between the renames leaves, minus its temporary
    with pytest.raises(ValueError, match=rf"{tmp_path}.*torn checkpoint.*Save the adapter again"):
        fp.load(tmp_path)


def test_a_config_edited_after_saving_is_read_as_edited(tmp_path: Path) -> None:
    params, config = _adapter()
    fp.save(tmp_path, params, config)
    config_file = tmp_path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**data, "base_model_name_or_path": "my/model", "lora_alpha": 5}))
    loaded, loaded_config = fp.load(tmp_path)  # as PEFT reads it: the user's edit counts
    assert loaded_config == config.replace(lora_alpha=5)
    assert torch.equal(loaded["lin1"]["lora_B"], params["lin1"]["lora_B"])
