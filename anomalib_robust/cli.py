"""Shorthands the plugin adds to anomalib's own ``anomalib`` command.

anomalib resolves ``--model`` with jsonargparse, which accepts a class name (``AdvRAD``) or a class path. The plugin
also accepts anomalib's snake-case model names (``--model adv_rad``, ``--model padim``), and a ``--callbacks`` option
that takes a registered callback name, class name or class path (``--callbacks robust_eval``), with its arguments as
``--callbacks.init_args.<name> <value>``. Both are rewritten to the long jsonargparse form before anomalib parses them,
and ``--compression_type`` takes anomalib's lower-case values (``int8_ptq``) as well as the enum names.

``anomalib predict`` with a ``--ckpt_path`` that is an exported model (``.xml``/``.bin``/``.onnx``/``.pt``/``.pth``
from ``anomalib export``) runs that file with anomalib's inferencer (:mod:`anomalib_robust.deploy.predict`) instead of
loading a Lightning checkpoint.

``anomalib robust_benchmark --config <yaml>`` runs the robustness leaderboard (:mod:`anomalib_robust.leaderboard`)
through anomalib's pipeline runners, as ``anomalib benchmark --config`` runs anomalib's benchmark.

Example:
    $ anomalib train --model adv_rad --data anomalib_robust.data.FashionMNIST --trainer.max_steps 200
    $ anomalib predict --model AdvRAD --ckpt_path results/AdvRAD/latest/weights/openvino/model.xml --data images/
"""

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from anomalib.data.utils import get_image_filenames
from anomalib.deploy import CompressionType
from anomalib.models import AnomalibModule
from anomalib.utils.path import convert_snake_to_pascal_case, resolve_versioned_path
from rich.console import Console

# imported for their side effect: they register their ``--callbacks`` names in CALLBACKS
import anomalib_robust.callbacks
import anomalib_robust.defenses  # noqa: F401
from anomalib_robust.deploy.predict import (
    OPENVINO_SUFFIXES,
    TORCH_SUFFIXES,
    check_exported_model,
    predict_exported,
    predictions_table,
)
from anomalib_robust.leaderboard import RobustBenchmark
from anomalib_robust.registry import CALLBACKS


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


def _compression_type_name(value: str) -> str:
    """``CompressionType`` member name (what jsonargparse parses) for a value or name in any case."""
    for kind in CompressionType:
        if value.lower() in {kind.value, kind.name.lower()}:
            return kind.name
    return value


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
            ("compression_type", _compression_type_name, "--compression_type"),
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


def _option_value(args: Sequence[str], option: str) -> str | None:
    """Value of ``--option value`` or ``--option=value`` in ``args`` (the last one wins, as in anomalib's parser)."""
    value = None
    for index, token in enumerate(args):
        if token == f"--{option}" and index + 1 < len(args):
            value = args[index + 1]
        value = _split(token, option) or value
    return value


def is_exported_predict(args: Sequence[str]) -> bool:
    """Whether ``args`` is ``predict`` with a ``--ckpt_path`` that names an exported model file."""
    checkpoint = _option_value(args, "ckpt_path")
    return (
        bool(args)
        and args[0] == "predict"
        and checkpoint is not None
        and checkpoint.endswith(OPENVINO_SUFFIXES + TORCH_SUFFIXES)
    )


def _argument_type(check: Callable[[str], Any], hint: str = "") -> Callable[[str], str]:
    """An argparse ``type`` that runs ``check`` and reports its error (and ``hint``) against the option's name."""

    def convert(value: str) -> str:
        try:
            check(value)
        except (OSError, ValueError) as error:
            raise argparse.ArgumentTypeError(f"{error}{hint}") from error
        return value

    convert.__name__ = check.__name__
    return convert


def _seed(value: str) -> int | None:
    """anomalib's ``--seed_everything``: an int seeds the run, ``true``/``false`` draw fresh noise."""
    if value.lower() in {"true", "false"}:
        return None
    try:
        return int(value)
    except ValueError as error:
        msg = f"expected an integer seed or true/false, got {value!r}"
        raise argparse.ArgumentTypeError(msg) from error


def exported_predict_parser() -> argparse.ArgumentParser:
    """Arguments of ``anomalib predict`` on an exported model (anomalib's names, a subset of its options)."""
    parser = argparse.ArgumentParser(
        prog="anomalib predict",
        description="Score images with an exported model (anomalib export) through anomalib's inferencer.",
    )
    parser.add_argument("--model", help="model name or class path; only names the results folder")
    parser.add_argument(
        "--ckpt_path",
        required=True,
        type=_argument_type(check_exported_model),
        help=f"exported model: {'/'.join(OPENVINO_SUFFIXES)} (OpenVINO) or {'/'.join(TORCH_SUFFIXES)} (Torch)",
    )
    parser.add_argument(
        "--data",
        required=True,
        type=_argument_type(get_image_filenames, " (an exported model predicts on an image or a folder of images)"),
        help="an image or a folder of images (searched recursively)",
    )
    parser.add_argument("--default_root_dir", type=Path, default=Path("results"), help="results root")
    parser.add_argument("--device", default="auto", help="inferencer device (auto, cpu, gpu, ...)")
    parser.add_argument(
        "--seed_everything",
        type=_seed,
        default=None,
        help="an integer seeds the in-graph noise (a reproducible run); default: fresh noise",
    )
    return parser


def run_exported_predict(args: Sequence[str]) -> None:
    """``anomalib predict`` on an exported model: score, save visualisations and a CSV, print a table.

    Results go where anomalib's predict writes them: ``<default_root_dir>/<model>/latest`` (resolved to the version
    folder ``latest`` points at).
    """
    arguments = exported_predict_parser().parse_args(args)
    model_name = arguments.model.rsplit(".", 1)[-1] if arguments.model else ""
    output_dir = resolve_versioned_path(arguments.default_root_dir / model_name / "latest")
    predictions = predict_exported(
        arguments.ckpt_path,
        arguments.data,
        output_dir,
        device=arguments.device,
        seed=arguments.seed_everything,
    )
    console = Console()
    data = Path(arguments.data)
    table = predictions_table(predictions, title=str(arguments.ckpt_path), root=data if data.is_dir() else data.parent)
    console.print(table)
    console.print(f"Visualisations and predictions.csv in {output_dir}")


def extend_anomalib_cli(cli_module: ModuleType) -> None:
    """Make ``AnomalibCLI`` accept the plugin's shorthands and predict with exported models (called once
    ``anomalib.cli.cli`` is imported)."""
    cli_class = cli_module.AnomalibCLI
    if getattr(cli_class.__init__, "__anomalib_robust__", False):
        return
    original_init = cli_class.__init__

    @functools.wraps(original_init)
    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        arguments = normalize_arguments(sys.argv[1:] if args is None else args)
        if run and is_exported_predict(arguments):
            run_exported_predict(arguments[1:])
            return
        original_init(self, arguments, run)

    __init__.__anomalib_robust__ = True
    cli_class.__init__ = __init__
    register_pipelines()


def register_pipelines() -> None:
    """Add ``anomalib robust_benchmark`` (:class:`~anomalib_robust.leaderboard.RobustBenchmark`) to anomalib's pipeline
    subcommands, next to ``anomalib benchmark``: anomalib's CLI builds its parser from ``get_parser`` and runs it with
    ``run_pipeline``, as it does its own benchmark."""
    from anomalib.cli import pipelines

    if pipelines.PIPELINE_REGISTRY is not None:  # None when anomalib's pipelines are not installed
        pipelines.PIPELINE_REGISTRY.setdefault("robust_benchmark", RobustBenchmark)
