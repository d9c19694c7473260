"""Hub ids: ``funcpeft.load("org/name", revision=..., subfolder=...)`` and ``funcpeft inspect org/name`` resolve
through huggingface_hub's cache as ``peft.PeftModel.from_pretrained`` does, offline from a cache built in the
test (no network here or in CI); a local folder wins; each failure names what is missing.

The cache is written in huggingface_hub's layout (``models--org--name/{blobs,refs,snapshots}``, snapshot files
symlinked to their blobs) and checked with huggingface_hub's own ``scan_cache_dir``. huggingface_hub reads
``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, at import, into ``huggingface_hub_constants``: the in-process tests
set both the environment and those constants; the subprocess test sets only the environment, as a user does.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from safetensors.torch import load_file

import funcpeft as fp
from funcpeft import _hub
from funcpeft.__main__ import main
from funcpeft.io import read_checkpoint, read_config
from tests._models import MLP, oracle, tiny_gpt2

hub = oracle("huggingface_hub")
hub_constants = importlib.import_module("huggingface_hub.constants")  # huggingface_hub's submodules load lazily
hub_utils = importlib.import_module("huggingface_hub.utils")

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "org/tiny-lora"

# PEFT's save_pretrained calls a transformers method that transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


# ----- a Hub cache, written as huggingface_hub writes it ----------------------------------------------------------


def _populate(cache: Path, repo_id: str, files: Mapping[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
    """Put one commit of ``repo_id`` holding ``files`` (repo path -> bytes) into the cache; returns its hash.

    Blobs are named by their sha256 (the Hub's LFS etag), snapshot entries are relative symlinks to them, and
    each ref (branch or tag) in ``refs`` points at the commit, exactly as ``hf_hub_download`` leaves them.
    """
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    digest = hashlib.sha1(repo_id.encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name])
    commit = digest.hexdigest()
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = storage / "snapshots" / commit / name
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


def _files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}{p.name}": p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache in ``tmp_path``, offline: environment and huggingface_hub's import-time constants."""
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # PEFT reads the environment as well as the constant
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def _lora_folder(path: Path, seed: int, **config: Any) -> Path:
    """GPT-2 LoRA with random A and B (so every adapter gives different outputs), saved by funcpeft."""
    config = fp.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], **config})
    params, _ = fp.adapt(tiny_gpt2(), config, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1000)
    params = optree.tree_map(lambda t: torch.randn(t.shape, generator=g) * 0.1, params)
    fp.save(path, params, config)
    return path


def _equal(a: Any, b: Any) -> bool:
    (params_a, config_a), (params_b, config_b) = a, b
    same_tree = optree.tree_structure(params_a) == optree.tree_structure(params_b)
    leaves = zip(optree.tree_leaves(params_a), optree.tree_leaves(params_b), strict=True) if same_tree else []
    return same_tree and config_a == config_b and all(torch.equal(x, y) for x, y in leaves)


@pytest.fixture
def repo(cache: Path, tmp_path: Path) -> dict[str, Any]:
    """``org/tiny-lora`` with four distinct adapters: main (also tag v1.0), an older commit, branch ``dev``, and a
    commit with the adapter in ``adapters/second`` (branch ``nested``). Returns each one's folder and commit."""
    folders = {name: _lora_folder(tmp_path / name, seed) for seed, name in enumerate(("old", "main", "dev", "nested"))}
    commits = {
        "old": _populate(cache, REPO_ID, _files(folders["old"]), refs=()),
        "main": _populate(cache, REPO_ID, _files(folders["main"]), refs=("main", "v1.0")),
        "dev": _populate(cache, REPO_ID, _files(folders["dev"]), refs=("dev",)),
        "nested": _populate(cache, REPO_ID, _files(folders["nested"], "adapters/second/"), refs=("nested",)),
    }
    return {"folders": folders, "commits": commits}


# ----- resolution -----------------------------------------------------------------------------------------------


def test_the_cache_is_huggingface_hubs_layout(repo: dict[str, Any], cache: Path) -> None:
    [cached] = hub.scan_cache_dir(cache).repos
    assert (cached.repo_id, cached.repo_type) == (REPO_ID, "model")
    assert {r.commit_hash for r in cached.revisions} == set(repo["commits"].values())
    refs = {r.commit_hash: set(r.refs) for r in cached.revisions}
    assert refs[repo["commits"]["main"]] == {"main", "v1.0"}
    # and huggingface_hub itself serves the files from it, offline
    path = hub.hf_hub_download(REPO_ID, "adapter_config.json", revision="dev")
    assert Path(path).read_bytes() == (repo["folders"]["dev"] / "adapter_config.json").read_bytes()


@pytest.mark.parametrize(
    ("revision", "expected"),
    [(None, "main"), ("main", "main"), ("v1.0", "main"), ("dev", "dev"), ("old", "old")],
    ids=["default", "branch-main", "tag", "branch-dev", "commit-hash"],
)
def test_load_by_id_equals_loading_the_folder(repo: dict[str, Any], revision: str | None, expected: str) -> None:
    if revision == "old":
        revision = repo["commits"]["old"]  # a commit no ref points at: only its hash finds it
    loaded = fp.load(REPO_ID, revision=revision)
    assert _equal(loaded, fp.load(repo["folders"][expected]))
    others = [name for name in repo["folders"] if name not in (expected, "nested")]
    assert not any(_equal(loaded, fp.load(repo["folders"][name])) for name in others)
    _, _, source = read_checkpoint(REPO_ID, revision=revision)
    assert source.parent.name == repo["commits"][expected]  # read from that commit's snapshot
    assert read_config(REPO_ID, revision=revision) == loaded[1]


def test_subfolder(repo: dict[str, Any]) -> None:
    expected = fp.load(repo["folders"]["nested"])
    assert _equal(fp.load(REPO_ID, revision="nested", subfolder="adapters/second"), expected)
    assert _equal(fp.load(REPO_ID, revision=repo["commits"]["nested"], subfolder="adapters/second"), expected)
    with pytest.raises(FileNotFoundError, match="adapters/second"):
        fp.load(REPO_ID, subfolder="adapters/second")  # main has no such folder


def test_legacy_bin_is_the_fallback_and_safetensors_wins(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _lora_folder(tmp_path / "adapter", seed=3)
    state = load_file(folder / "adapter_model.safetensors")
    config_bytes = (folder / "adapter_config.json").read_bytes()
    legacy = tmp_path / "legacy.bin"
    torch.save(state, legacy)
    _populate(cache, "org/legacy", {"adapter_config.json": config_bytes, "adapter_model.bin": legacy.read_bytes()})
    params, config = fp.load("org/legacy")
    assert _equal((params, config), fp.load(folder))
    assert read_checkpoint("org/legacy")[2].name == "adapter_model.bin"

    doubled = tmp_path / "doubled.bin"
    torch.save({k: v * 2 for k, v in state.items()}, doubled)
    both = {**_files(folder), "adapter_model.bin": doubled.read_bytes()}
    _populate(cache, "org/both", both)
    assert _equal(fp.load("org/both"), fp.load(folder))  # PEFT reads the safetensors when both exist


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")  # PEFT on GPT-2's Conv1D
def test_peft_from_pretrained_on_the_same_cache_gives_the_same_outputs(repo: dict[str, Any], cache: Path) -> None:
    peft = oracle("peft")
    x = torch.randint(0, 50, (2, 6))
    nested = cache / "models--org--tiny-lora" / "snapshots" / repo["commits"]["nested"]
    cases = [
        ({}, REPO_ID, {}),
        ({"revision": "dev"}, REPO_ID, {"revision": "dev"}),
        ({"revision": repo["commits"]["old"]}, REPO_ID, {"revision": repo["commits"]["old"]}),
        # PEFT 0.21 cannot load a Hub subfolder offline: `load_peft_weights` joins the subfolder into the file
        # name *and* passes `subfolder=`, so it asks the cache for adapters/second/adapters/second/...; PEFT
        # reads the same cached snapshot as a local folder with `subfolder=` instead.
        ({"revision": "nested", "subfolder": "adapters/second"}, str(nested), {"subfolder": "adapters/second"}),
    ]
    base = tiny_gpt2()(x).logits
    for ours_kwargs, peft_id, peft_kwargs in cases:
        params, config = fp.load(REPO_ID, **ours_kwargs)
        _, fwd = fp.adapt(tiny_gpt2(), config)
        ours = fwd(params, x).logits
        theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), peft_id, **peft_kwargs).eval()(x).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda m, k=ours_kwargs: f"{k}: {m}")
        assert not torch.allclose(ours, base, atol=1e-3), ours_kwargs  # the adapter does something


def test_a_local_folder_wins_over_the_hub_id(
    repo: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "cwd"
    local = _lora_folder(work / REPO_ID, seed=7)  # ./org/tiny-lora, also cached under that id
    monkeypatch.chdir(work)
    assert _equal(fp.load(REPO_ID), fp.load(local))
    assert not _equal(fp.load(REPO_ID), fp.load(repo["folders"]["main"]))
    assert _equal(fp.load(REPO_ID, revision="dev"), fp.load(local))  # revision means nothing for a folder (PEFT)
    _lora_folder(local / "inner", seed=8)
    assert _equal(fp.load(REPO_ID, subfolder="inner"), fp.load(local / "inner"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fp.load(REPO_ID, revision="nested", subfolder="adapters/second")  # the folder wins even where the Hub has it


def test_a_local_folder_needs_no_huggingface_hub(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` now raises ImportError
    folder = repo["folders"]["main"]
    params, config = fp.load(folder)
    assert config.r == 4 and params
    assert main(["inspect", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hub"] is None


# ----- errors ---------------------------------------------------------------------------------------------------


def test_missing_extra_names_the_extra(repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match=r"pip install 'funcpeft\[hub\]'") as info:
        fp.load(REPO_ID, revision="dev")
    assert REPO_ID in str(info.value) and "'dev'" in str(info.value)
    with pytest.raises(ImportError, match=r"funcpeft\[hub\]"):
        read_config(REPO_ID)


def test_missing_extra_in_inspect_is_one_line(
    repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert main(["inspect", REPO_ID]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("funcpeft inspect: error: ")
    assert "funcpeft[hub]" in err and REPO_ID in err


@pytest.mark.parametrize(
    ("revision", "subfolder"), [(None, None), ("v9", None), (None, "sub")], ids=["repo", "revision", "subfolder"]
)
def test_not_in_the_cache_offline(repo: dict[str, Any], revision: str | None, subfolder: str | None) -> None:
    repo_id = "org/never-downloaded" if revision is None and subfolder is None else REPO_ID
    with pytest.raises(FileNotFoundError) as info:
        fp.load(repo_id, revision=revision, subfolder=subfolder)
    message = str(info.value)
    assert repr(repo_id) in message and "offline" in message and "HF_HUB_OFFLINE=1" in message
    for asked in (revision, subfolder):
        if asked is not None:
            assert repr(asked) in message


def test_cached_config_without_weights_offline(cache: Path, repo: dict[str, Any]) -> None:
    config_only = {"adapter_config.json": (repo["folders"]["main"] / "adapter_config.json").read_bytes()}
    commit = _populate(cache, "org/config-only", config_only)
    with pytest.raises(FileNotFoundError) as info:
        fp.load("org/config-only")
    message = str(info.value)
    assert "'org/config-only'" in message and "adapter_model.safetensors" in message and "adapter_model.bin" in message
    assert "offline" in message and commit in message
    assert read_config("org/config-only") == fp.load(repo["folders"]["main"])[1]  # the config alone is there


@pytest.mark.parametrize("path", ["/no/such/adapter", "a/b/c", "bad--name", "-dash", "x.git", "../up"])
def test_neither_a_folder_nor_a_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # consulting the Hub would raise ImportError
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        fp.load(path)
    assert repr(path) in str(info.value)


@pytest.mark.parametrize(
    "value",
    ["gpt2", "org/name", "org/na.me-2_x", "a" * 96, "a" * 97, "org/", "/name", "a/b/c", "a--b", "a..b", "x.git",
     "-a", "a-", ".a", "café", "org name", "", "org/name/", "o/" + "n" * 96],
)  # fmt: skip
def test_repo_id_rules_are_huggingface_hubs(value: str) -> None:
    try:
        hub_utils.validate_repo_id(value)
        valid = True
    except hub_utils.HFValidationError:
        valid = False
    assert _hub.is_repo_id(value) is valid
    assert _hub.is_repo_id(Path(value)) is False  # a Path is a path, never an id


def test_offline_uses_the_cache_only(repo: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real = hub.hf_hub_download

    def spy(*args: Any, **kwargs: Any) -> str:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(hub, "hf_hub_download", spy)
    fp.load(REPO_ID, revision="dev")
    assert len(calls) == 2 and all(c["local_files_only"] is True for c in calls)
    # the weights come from the commit the config came from, not from whatever "dev" points at by then
    assert [c["revision"] for c in calls] == ["dev", repo["commits"]["dev"]]


class _FakeHub:
    """``hf_hub_download`` online, from a dict; ``missing`` files raise what the Hub's 404 raises."""

    def __init__(self, snapshot: Path, missing: set[str], unreachable: bool = False) -> None:
        self.snapshot, self.missing, self.unreachable = snapshot, missing, unreachable
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, repo_id: str, filename: str, *, subfolder: str | None, revision: str | None, **kw: Any) -> str:
        self.calls.append((filename, revision))
        if self.unreachable:
            raise hub_utils.LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
        if filename in self.missing:
            raise hub_utils.EntryNotFoundError(f"404 Client Error: Entry Not Found for {filename}")
        return str(self.snapshot / filename)


@pytest.fixture
def online(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


def test_online_falls_back_to_the_bin_when_the_repo_has_no_safetensors(
    online: None, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _lora_folder(tmp_path / "adapter", seed=4)
    commit = "c" * 40
    snapshot = cache / "models--org--x" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    torch.save(load_file(folder / "adapter_model.safetensors"), snapshot / "adapter_model.bin")
    fake = _FakeHub(snapshot, missing={"adapter_model.safetensors"})
    monkeypatch.setattr(hub, "hf_hub_download", fake)
    assert _equal(fp.load("org/x", revision="dev"), fp.load(folder))
    assert fake.calls == [
        ("adapter_config.json", "dev"),
        ("adapter_model.safetensors", commit),
        ("adapter_model.bin", commit),
    ]
    fake.missing.add("adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        fp.load("org/x")
    fake.missing = {"adapter_config.json"}
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        fp.load("org/x")


def test_online_but_unreachable_says_so(online: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(hub, "hf_hub_download", _FakeHub(tmp_path, set(), unreachable=True))
    with pytest.raises(FileNotFoundError, match="could not be reached") as info:
        fp.load("org/x", revision="v2")
    assert "'org/x'" in str(info.value) and "'v2'" in str(info.value) and "offline" not in str(info.value)


# ----- funcpeft inspect -------------------------------------------------------------------------------------------


def test_inspect_a_hub_id(repo: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", REPO_ID, "--revision", "nested", "--subfolder", "adapters/second", "--json"]) == 0
    out, err = capsys.readouterr()
    facts = json.loads(out)
    assert err == ""
    assert facts["hub"] == {
        "repo_id": REPO_ID,
        "revision": "nested",
        "commit": repo["commits"]["nested"],
        "subfolder": "adapters/second",
    }
    assert main(["inspect", str(repo["folders"]["nested"]), "--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert local["hub"] is None
    assert {k: v for k, v in facts.items() if k not in ("hub", "path")} == {
        k: v for k, v in local.items() if k not in ("hub", "path")
    }
    assert main(["inspect", REPO_ID, "--revision", "dev"]) == 0
    text = capsys.readouterr().out
    assert f"{REPO_ID} (Hugging Face Hub; revision 'dev', commit {repo['commits']['dev']})" in text


def test_inspect_not_in_the_cache_is_one_line(repo: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", REPO_ID, "--revision", "v9"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("funcpeft inspect: error: ")
    assert REPO_ID in err and "'v9'" in err and "offline" in err


def test_cli_offline_from_the_environment(repo: dict[str, Any], cache: Path) -> None:
    """A fresh process: huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE from the environment at import."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "funcpeft", "inspect", REPO_ID, "--revision", "dev", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    facts = json.loads(run.stdout)
    assert facts["hub"]["commit"] == repo["commits"]["dev"]
    assert Path(facts["path"]).is_relative_to(cache)


def test_mlp_adapter_round_trip_through_the_cache(cache: Path, tmp_path: Path) -> None:
    """Not only GPT-2: any funcpeft folder, pushed as is, loads by id into an equal forward."""
    model = MLP()
    config = fp.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False)
    params, fwd = fp.adapt(model, config, generator=torch.Generator().manual_seed(0))
    fp.save(tmp_path / "mlp", params, config)
    _populate(cache, "someone/mlp", _files(tmp_path / "mlp"))
    loaded, loaded_config = fp.load("someone/mlp")
    x = torch.randn(3, 10)
    assert loaded_config == config
    torch.testing.assert_close(fwd(loaded, x), fwd(params, x), rtol=0, atol=0)
