"""Errors a user can fix. The CLI prints their message as one line and exits 2; anything else is a bug."""

from __future__ import annotations

import errno


class RobustServeError(Exception):
    """Base of every error caused by input, settings or the environment; the message names the fix."""


class ConfigError(RobustServeError, ValueError):
    """An unknown name (recipe, preset, architecture, dataset, attack) or an invalid setting."""


class CheckpointError(RobustServeError):
    """A checkpoint or run folder cannot be used; the message names the fix."""


class TrainingDivergedError(RobustServeError):
    """Training diverged (a NaN or infinite loss, or a network collapsed to one output); the run keeps its last good
    epoch."""


USER_ERRORS: tuple[type[BaseException], ...] = (RobustServeError,)


def cannot_write(path: object, err: OSError, elsewhere: str = "write somewhere else") -> str:
    """One line for a write that failed: what, why, and the fix for the usual causes (full disk, no permission).

    ``elsewhere`` is the other way out, in the caller's terms (e.g. "choose another --out")."""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some space on that disk or {elsewhere}"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make the folder writable or {elsewhere}"
    else:
        fix = f"check the folder or {elsewhere}"
    return f"cannot write {path}: {reason}; {fix}"
