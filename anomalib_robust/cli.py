"""Shorthands the plugin adds to anomalib's own ``anomalib`` command.

anomalib resolves ``--model`` with jsonargparse, which accepts a class name (``AdvRAD``) or a class path. The plugin
also accepts anomalib's snake-case model names (``--model adv_rad``, ``--model padim``), and a ``--callbacks`` option
that takes a registered callback name, class name or class path (``--callbacks robust_eval``), with its arguments as
``--callbacks.init_args.<name> <value>``. Both are rewritten to the long jsonargparse form before anomalib parses them.

Example:
    $ anomalib train --model adv_rad --data anomalib_robust.data.FashionMNIST --trainer.max_steps 200
"""

import functools
import sys
from collections.abc import Sequence
from types import ModuleType

from anomalib.models import AnomalibModule
from anomalib.utils.path import convert_snake_to_pascal_case

CALLBACKS: dict[str, str] = {}
"""Callback shorthands for ``--callbacks NAME``: name -> class path. Modules register their callbacks here."""


def register_callback(name: str, class_path: str) -> None:
    """Make ``--callbacks <name>`` resolve to ``class_path`` in the ``anomalib`` command."""
    CALLBACKS[name] = class_path


def _model_class_path(name: str) -> str:
    """Class path of the ``AnomalibModule`` whose name matches ``name`` as anomalib's ``get_model`` matches it."""
    if "." in name or name.endswith((".yaml", ".yml")):
        return name
    wanted = convert_snake_to_pascal_case(name).lower()
    for model in AnomalibModule.__subclasses__():
        if model.__name__.lower() in {wanted, name.lower()}:
            return f"{model.__module__}.{model.__name__}"
    return name


def _callback_class_path(name: str) -> str:
    return CALLBACKS.get(name, name)


def _split(token: str, option: str) -> str | None:
    """Value of ``--option=value``, or ``None`` when ``token`` is not that form."""
    prefix = f"--{option}="
    return token[len(prefix) :] if token.startswith(prefix) else None


def normalize_arguments(args: Sequence[str]) -> list[str]:
    """Rewrite the plugin's shorthands in an ``anomalib`` argument list to the form anomalib's parser accepts.

    Example:
        >>> normalize_arguments(["train", "--model", "adv_rad", "--callbacks", "robust_eval"])[:3]
        ['train', '--model', 'anomalib_robust.models.adv_rad.lightning_model.AdvRAD']
    """
    rewritten: list[str] = []
    tokens = list(args)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        for option, resolve, target in (
            ("model", _model_class_path, "--model"),
            ("callbacks", _callback_class_path, "--trainer.callbacks+"),
        ):
            inline = _split(token, option)
            if inline is not None:
                rewritten += [target, resolve(inline)]
                break
            if token == f"--{option}" and index + 1 < len(tokens):
                rewritten += [target, resolve(tokens[index + 1])]
                index += 1
                break
        else:
            if token.startswith("--callbacks."):
                token = "--trainer.callbacks." + token.removeprefix("--callbacks.")
            rewritten.append(token)
        index += 1
    return rewritten


def extend_anomalib_cli(cli_module: ModuleType) -> None:
    """Make ``AnomalibCLI`` accept the plugin's shorthands (called once ``anomalib.cli.cli`` is imported)."""
    cli_class = cli_module.AnomalibCLI
    if getattr(cli_class.__init__, "__anomalib_robust__", False):
        return
    original_init = cli_class.__init__

    @functools.wraps(original_init)
    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        original_init(self, normalize_arguments(sys.argv[1:] if args is None else args), run)

    __init__.__anomalib_robust__ = True
    cli_class.__init__ = __init__
