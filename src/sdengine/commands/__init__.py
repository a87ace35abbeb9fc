"""CLI subcommands that live in their own modules.

Each module has ``register(subparsers, train_subparsers)``, which adds its parser (at the top level, or
under ``sdengine train``) and sets ``func`` to a function ``(argparse.Namespace) -> int``; ``cli.py``
calls them all (and ``register_eval(eval_subparsers)`` where a module has it, for ``sdengine eval X``).
Errors a user can cause are raised as
:class:`sdengine.errors.SdengineError` subclasses (or OSError) and become one line on stderr; anything
else is a bug and keeps its traceback.
"""

# Every module listed here must exist: a missing one is an import error, not a silently absent command.
COMMAND_MODULES = ["convert", "merge", "generate", "train_lora", "train_controlnet", "train_emoji", "eval_emoji"]
COMMAND_MODULES += ["list", "pnginfo", "xyz", "bench"]
COMMAND_MODULES += ["serve", "comfy"]
COMMAND_MODULES += ["train_embedding"]
COMMAND_MODULES += ["train_tiny_vae"]
