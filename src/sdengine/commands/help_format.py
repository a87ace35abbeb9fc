"""``--help`` that shows every default: argparse's ArgumentDefaultsHelpFormatter, minus the noise (no
"(default: None)" for flags whose absence means "decided later", nothing added where the help already says it)."""

from __future__ import annotations

import argparse
import copy


def _shown(default: object) -> bool:
    # identity, not ==: a default of 0 (warm-up, seed) is shown, only None/False/SUPPRESS are not
    return default is not None and default is not False and default is not argparse.SUPPRESS


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to each option's help unless the default is None/False or the help names it."""

    def _format_action(self, action: argparse.Action) -> str:
        # argparse prints nothing after a flag without help text; such a flag still has a default to show
        if not action.help and action.option_strings and _shown(action.default):
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not _shown(action.default) or "default" in text:
            return action.help
        return super()._get_help_string(action)


__all__ = ["DefaultsHelpFormatter"]
