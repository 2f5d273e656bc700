"""Errors a user can fix. The CLI prints their message as one line and exits 2; anything else is a bug."""

from __future__ import annotations


class RobustServeError(Exception):
    """Base of every error caused by input, settings or the environment; the message names the fix."""


class ConfigError(RobustServeError, ValueError):
    """An unknown name (recipe, preset, architecture, dataset, attack) or an invalid setting."""


USER_ERRORS: tuple[type[BaseException], ...] = (RobustServeError,)
