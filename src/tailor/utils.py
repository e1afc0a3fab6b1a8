"""Small shared helpers: atomic writes, provenance, logging."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tailor import distributed


def provenance(p, stage: str) -> dict:
    """What every artifact records: its stage, the code version and the params (a tailor.config.Params)."""
    return {"stage": stage, "code_version": code_version(), "params": p.model_dump(mode="json")}


def log(msg: str) -> None:
    if not distributed.world().main:  # under torchrun, rank 0 speaks for all
        return
    print(f"[tailor {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); artifacts are read by other users and containers
    # (a Triton server, a KFP step under another uid), so give it an ordinary file's mode.
    os.chmod(tmp, 0o644)
    return Path(tmp)


def atomic_torch_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file beside `path`, then rename: a kill leaves the old file or the new."""
    if not distributed.world().main:  # under torchrun only rank 0 writes; every rank computed the same
        return
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as one: corrupt, truncated, or not tensors and plain data."""


def load_checkpoint(path: str | Path, what: str = "checkpoint", keys: tuple[str, ...] = ()) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, so a crafted file
    cannot run code; any failure, or a missing one of `keys`, is one CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusals, truncated zips and bad magic numbers all land here
        msg = str(e)
        if "GLOBAL" in msg:  # torch names the refused callable, e.g. 'posix.system'
            why = "it holds Python objects other than tensors and plain data; refused without running them"
        elif "central directory" in msg or "zip archive" in msg:
            why = "truncated or corrupt (its zip archive is incomplete)"
        else:
            why = "corrupt, or not a file torch.save wrote"
        raise CheckpointError(f"{what} {path}: not a readable tailor checkpoint: {why}") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{what} {path}: not a tailor checkpoint (holds a {type(ck).__name__}, not a dict)")
    missing = [k for k in keys if k not in ck]
    if missing:
        stage = ck.get("stage")
        raise CheckpointError(f"{what} {path}: has no {', '.join(map(repr, missing))}"
                              + (f" (it was written by {stage}, not the stage that makes a {what})" if stage else ""))
    return ck


def load_state(module: torch.nn.Module, state: dict, path: str | Path, what: str, strict: bool = True):
    """module.load_state_dict, with a mismatch (another space or network) as one CheckpointError."""
    try:
        return module.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{what} {path}: its weights do not fit this network ({first[:160]}...); was it "
                              "made with another search space or by another stage?") from None


def read_json(path: str | Path, what: str = "file"):
    """json.loads of a file, with a missing or malformed file as one error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path}: not valid JSON ({e}); truncated? re-run the stage that writes it") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    if not distributed.world().main:  # under torchrun only rank 0 writes; every rank computed the same
        return
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


OUTPUT_MARKER = ".tailor-output"


class OutputError(ValueError):
    """An output path that tailor must not replace."""


def check_replaceable(path: Path, force: bool = False) -> None:
    """Raise OutputError unless `path` is absent, an empty directory, or a directory tailor wrote."""
    here = Path.cwd().resolve()
    target = path.resolve()
    if target == here or target in here.parents:
        raise OutputError(f"output {path}: is the working directory or one of its parents; choose a new directory")
    if not path.exists() or force:
        return
    if not path.is_dir():
        raise OutputError(f"output {path}: exists and is a file, not a directory tailor wrote; remove it, choose "
                          "another path, or pass --force to replace it")
    if any(path.iterdir()) and not (path / OUTPUT_MARKER).exists():
        raise OutputError(f"output {path}: a non-empty directory that tailor did not write (no {OUTPUT_MARKER}); "
                          "it would be replaced whole. Remove it, choose another path, or pass --force")


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False):
    """Yield a temporary directory beside `path`; on success it replaces `path` whole.

    Only what tailor wrote is replaced: a directory produced here holds an OUTPUT_MARKER file, and
    an existing `path` that is a file, or a non-empty directory without the marker, is refused
    (before any work) unless `force`. The working directory and its parents are never replaced.
    Temporary directories a killed run left beside `path` are removed first.
    """
    path = Path(path)
    check_replaceable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared artifact
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text("written by tailor: a later run may replace this directory whole\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def code_version() -> str:
    """The git commit (with '-dirty' when the tree has changes), else TAILOR_CODE_VERSION, else the package version."""
    if os.environ.get("TAILOR_CODE_VERSION"):
        return os.environ["TAILOR_CODE_VERSION"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version
        return f"tailor-{version('tailor')}"


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (params sections, input file hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
