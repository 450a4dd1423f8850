"""Atomic, resumable checkpoints.

Layout of a stage's checkpoint folder::

    checkpoints/<stage>/step_00000030.pt   # one file per save: everything needed to resume exactly
    checkpoints/<stage>/latest             # text: the file name of the newest complete checkpoint
    checkpoints/<stage>/final              # text: the file of the stage's last step (only once it finished)

Writes are crash-safe: the payload goes to a temporary file in the same folder, is flushed and ``fsync``-ed,
then ``os.replace``-d onto its final name (atomic on POSIX within one file system), and the folder is
``fsync``-ed; only then is ``latest`` rewritten the same way. A crash at any point leaves ``latest`` naming a
complete file. Readers ignore temporary files, and fall back to the newest ``step_*.pt`` if ``latest`` is
missing or names a file that no longer exists. The newest ``keep_last`` files are kept.

A checkpoint whose model weights contain NaN/inf is refused (``NonFiniteError``): a bad file must never
replace a good one.

Files are read with ``torch.load(weights_only=False)`` because they hold Python/NumPy RNG states: load only
checkpoints you wrote.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch

LATEST = "latest"
FINAL = "final"
_CKPT_RE = re.compile(r"^step_(\d{8,})\.pt$")


class NonFiniteError(RuntimeError):
    """Training produced NaN/inf (too many skipped steps in a row, or non-finite weights at save time)."""


class CheckpointError(ValueError):
    """A checkpoint is missing or unreadable; the message names the file (and the stage that produces it)."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_bytes_via(path: Path, write) -> None:
    """``write(fileobj)`` into a temp file beside ``path``, fsync, rename onto ``path``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # a real crash cannot run this; then the stray temp file is ignored by every reader
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` onto ``path`` the way checkpoints are written: a reader sees the old file or the new one, never half."""
    path = Path(path)
    _atomic_write_bytes_via(path, lambda f: f.write(data))
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes_via(path, lambda f: torch.save(obj, f))
    return path


def assert_finite_state(state: Mapping[str, torch.Tensor], what: str = "model") -> None:
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"refusing to save a checkpoint: {what} tensor '{name}' contains NaN/inf "
                                 "(the previous checkpoint is kept)")


def list_checkpoints(ckpt_dir: str | Path) -> List[Path]:
    """Complete checkpoint files in ``ckpt_dir``, oldest step first (temporary files excluded)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _read_pointer(d: Path, pointer: str) -> Optional[Path]:
    p = d / pointer
    if p.is_file():
        name = p.read_text(encoding="utf-8").strip()
        if _CKPT_RE.match(name) and (d / name).is_file():
            return d / name
    return None


def latest_checkpoint(ckpt_dir: str | Path) -> Optional[Path]:
    """The file ``latest`` names, else the newest ``step_*.pt``, else None."""
    d = Path(ckpt_dir)
    found = _read_pointer(d, LATEST)
    if found is not None:
        return found
    files = list_checkpoints(d)
    return files[-1] if files else None


def final_checkpoint(ckpt_dir: str | Path) -> Optional[Path]:
    """The checkpoint of the stage's last step, or None if the stage has not finished."""
    return _read_pointer(Path(ckpt_dir), FINAL)


def save_checkpoint(ckpt_dir: str | Path, step: int, state: Dict[str, Any], keep_last: int = 2,
                    final: bool = False) -> Path:
    """Write ``state`` as ``step_<step>.pt``, point ``latest`` (and ``final`` when ``final``) at it, prune to the
    newest ``keep_last`` files.

    ``state["model"]`` (a state dict) is checked for NaN/inf first; a non-finite model raises ``NonFiniteError``
    and nothing is written.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if "model" in state:
        assert_finite_state(state["model"], "model")
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = atomic_torch_save(state, d / checkpoint_name(step))
    _atomic_write_bytes_via(d / LATEST, lambda f: f.write((path.name + "\n").encode()))
    if final:
        _atomic_write_bytes_via(d / FINAL, lambda f: f.write((path.name + "\n").encode()))
    else:
        # training continues past an earlier end (more steps were asked for): that end is no longer final
        (d / FINAL).unlink(missing_ok=True)
    for old in list_checkpoints(d)[:-keep_last]:
        if old.name != path.name:
            old.unlink(missing_ok=True)
    remove_stale_temp_files(d)
    return path


_TMP_RE = re.compile(r"^\.(?:step_\d{8,}\.pt|latest|final)\.tmp-(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's live process / not a pid here
        return True
    return True


def remove_stale_temp_files(ckpt_dir: str | Path) -> List[Path]:
    """Delete the temp files of saves whose process died mid-write (SIGKILL, OOM kill, node loss): every reader
    ignores them, but a gpu-full one holds several GB. A temp file of this or any other live process is kept."""
    removed = []
    d = Path(ckpt_dir)
    for p in (d.iterdir() if d.is_dir() else ()):
        m = _TMP_RE.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_checkpoint(path_or_dir: str | Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Load a checkpoint file, or the latest one of a checkpoint folder."""
    p = Path(path_or_dir)
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"no checkpoint in {p} (expected {LATEST} or step_*.pt files)")
        p = found
    if not p.exists():
        raise CheckpointError(f"no checkpoint in {p}: no such file or folder")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} is not a file")
    try:
        return torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated/corrupt file: say which one
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {e}") from e


def file_identity(path: str | Path) -> Dict[str, Any]:
    """Path, size and modification time of a checkpoint file: the key of caches derived from it (DPO reference
    log-probs, verifier samples). A stage retrained into the same file name gets a new mtime, so its caches
    are recomputed rather than silently reused; hashing the contents would cost a full read of a large file."""
    st = Path(path).stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def read_keyed_cache(path: str | Path, key: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The dict saved by ``write_keyed_cache(path, key, ...)`` when it was saved under an equal ``key``, else None
    (no file, another key, or a torn file: the caller recomputes)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return None
    return cached if isinstance(cached, dict) and cached.get("key") == key else None


def write_keyed_cache(path: str | Path, key: Mapping[str, Any], payload: Mapping[str, Any]) -> Path:
    """Save ``payload`` with its ``key`` atomically (read back by ``read_keyed_cache``)."""
    return atomic_torch_save({**payload, "key": dict(key)}, path)


def stage_checkpoint_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / "checkpoints" / stage


def require_stage_output(run_dir: str | Path, stage: str, consumer: str) -> Path:
    """Path of ``stage``'s final checkpoint, or a ``CheckpointError`` naming the missing file and the stage that
    writes it (for ``consumer``, the stage that needs it)."""
    d = stage_checkpoint_dir(run_dir, stage)
    found = final_checkpoint(d)
    if found is not None:
        return found
    partial = latest_checkpoint(d)
    if partial is not None:
        raise CheckpointError(f"stage '{consumer}' needs the final checkpoint of stage '{stage}', but {d / FINAL} "
                              f"does not exist (stage '{stage}' stopped at {partial.name}): finish it with "
                              f"`--stage {stage} --resume`")
    raise CheckpointError(f"stage '{consumer}' needs the final checkpoint of stage '{stage}', but {d / FINAL} "
                          f"does not exist: run `--stage {stage}` first (same --run-name)")


def load_model_weights(model: torch.nn.Module, path_or_dir: str | Path, strict: bool = True) -> Dict[str, Any]:
    """Copy a checkpoint's ``model`` state into ``model``; returns the checkpoint's other entries' metadata."""
    state = load_checkpoint(path_or_dir)
    if "model" not in state:
        raise CheckpointError(f"{path_or_dir}: no 'model' entry in the checkpoint")
    model.load_state_dict(state["model"], strict=strict)
    return {k: v for k, v in state.items() if k in ("stage", "step", "total_steps", "complete", "config")}
