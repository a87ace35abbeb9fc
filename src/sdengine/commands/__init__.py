"""CLI subcommands that live in their own modules.

Each module has ``register(subparsers, train_subparsers)``, which adds its parser (at the top level, or
under ``sdengine train``) and sets ``func`` to a function ``(argparse.Namespace) -> int``; ``cli.py``
calls them all (and ``register_eval(eval_subparsers)`` where a module has it, for ``sdengine eval X``). Errors a user can cause are raised as exceptions (ValueError, OSError, sdengine's own
error classes) and become one line on stderr.
"""

# Modules listed here are optional: one that does not exist yet (a feature still being built) is skipped.
COMMAND_MODULES = ["convert", "generate", "serve", "bench", "train_lora", "train_controlnet", "train_emoji", "eval_emoji"]
COMMAND_MODULES += ["list", "pnginfo", "xyz"]  # everyday commands (sdengine list / pnginfo / xyz)
