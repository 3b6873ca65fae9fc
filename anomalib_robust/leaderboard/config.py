"""The leaderboard's YAML: parsing, validation with errors that name the key, and the grid of cells.

The file has the shape of anomalib's ``anomalib benchmark --config`` file (``accelerator`` at the top, the job's
section below it, ``grid`` lists expanded by anomalib's own ``get_iterator_from_grid_dict``), with a
``robust_benchmark`` section instead of ``benchmark``::

    accelerator: cpu
    robust_benchmark:
      seed: 0
      output_dir: runs/robust_benchmark/fashion_mnist
      trainer: {max_steps: 200}                 # Engine arguments for every model
      model:
        grid:
          - class_path: Padim                   # an anomalib name, a plugin name (AdvRAD) or a class path
            init_args: {backbone: resnet18, pre_trained: false}
            image_size: [32, 32]                # optional: the model's pre-processor resizes to this size
            trainer: {max_steps: 100}           # optional: overrides the common Engine arguments
            defense:                            # optional: a diffusion purifier in front of the fitted model
              class_path: anomalib_robust.defenses.DiffPure
              init_args: {level: 25}
              denoiser: {class_path: AdvRAD, init_args: {...}, trainer: {...}}  # fitted on the same data
      data:
        class_path: anomalib_robust.data.FashionMNIST
        init_args: {root: embedded, image_size: 32, category: {grid: [trouser, bag]}}
      robust_eval:                              # RobustEvaluator arguments, passed through as given
        threat_models: [{norm: Linf, eps: [0.00784313725]}, {norm: L2, eps: [0.2]}]
        attacks: [pgd]
        steps: 10

Only ``seed``, ``model`` and ``data`` go through the grid expansion: anomalib's expansion treats every flattened key
that contains ``grid`` as a grid, which would catch evaluator arguments such as ``num_grid_images``.
"""

import importlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from anomalib.data import AnomalibDataModule
from anomalib.models import AnomalibModule
from anomalib.pipelines.components.utils import get_iterator_from_grid_dict

from anomalib_robust.defenses import DiffusionPurifier
from anomalib_robust.evaluation import RobustEvaluator

SECTION = "robust_benchmark"
"""The job's section of the YAML, as ``benchmark`` is anomalib's benchmark job's."""

DEFAULT_OUTPUT_DIR = "runs/robust_benchmark"

MODEL_KEYS = {"class_path", "init_args", "name", "image_size", "trainer", "defense"}
DEFENSE_KEYS = {"class_path", "init_args", "denoiser"}
DATA_KEYS = {"class_path", "init_args"}
SECTION_KEYS = {"seed", "output_dir", "trainer", "model", "data", "robust_eval", "random_init_backbones"}
THREAT_MODEL_KEYS = {"norm", "eps"}


class LeaderboardConfigError(ValueError):
    """An invalid leaderboard YAML; the message names the key."""


@dataclass(frozen=True)
class ThreatModel:
    """A norm and its radii: one cell of the leaderboard per threat model."""

    norm: str
    eps: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"norm": self.norm, "eps": list(self.eps)}


@dataclass
class CellGroup:
    """One model on one datamodule: fitted once, then evaluated at every threat model (one cell each)."""

    model: dict
    data: dict
    seed: int
    trainer: dict
    key: str
    """Where the model entry sits in the YAML, for error messages and the run's log."""


@dataclass
class LeaderboardConfig:
    """A validated leaderboard YAML."""

    accelerator: list[str]
    output_dir: Path
    groups: list[CellGroup]
    threat_models: list[ThreatModel]
    evaluator: dict = field(default_factory=dict)
    """``RobustEvaluator`` arguments other than ``norm`` and ``eps``, as given in ``robust_eval``."""
    random_init_backbones: bool = True


def _fail(key: str, message: str) -> None:
    raise LeaderboardConfigError(f"{key}: {message}")


def _mapping(value: object, key: str, allowed: set[str]) -> dict:
    if not isinstance(value, dict):
        _fail(key, f"expected a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        _fail(key, f"unknown key(s) {unknown}; expected keys from {sorted(allowed)}")
    return value


def _import_class(class_path: str, key: str) -> type:
    module_name, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as error:
        _fail(key, f"cannot import {class_path!r} ({error})")
    return type  # unreachable: _fail raises


def _subclasses(base: type) -> dict[str, type]:
    found, pending = {}, list(base.__subclasses__())
    while pending:
        cls = pending.pop()
        found.setdefault(cls.__name__.lower(), cls)
        pending.extend(cls.__subclasses__())
    return found


def resolve_class(class_path: object, base: type, key: str) -> type:
    """The ``base`` subclass named by ``class_path``: a class name (``Padim``, ``AdvRAD``, case-insensitive, snake
    case accepted) of a loaded subclass, or a dotted class path; an unknown name raises naming ``key``."""
    if not isinstance(class_path, str) or not class_path:
        _fail(key, f"expected a class name or class path, got {class_path!r}")
    if "." in class_path:
        cls = _import_class(class_path, key)
    else:
        importlib.import_module("anomalib_robust")  # registers AdvRAD and PatchGuard as AnomalibModule subclasses
        known = _subclasses(base)
        cls = known.get(class_path.lower()) or known.get(class_path.replace("_", "").lower())
        if cls is None:
            names = sorted(known[name].__name__ for name in known if not known[name].__name__.startswith("_"))
            _fail(key, f"unknown {base.__name__} {class_path!r}; expected one of {names} or a class path")
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        _fail(key, f"{class_path!r} is not a {base.__name__} subclass")
    return cls


def class_path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def _check_init_args(cls: type, init_args: object, key: str, reserved: tuple[str, ...] = ()) -> dict:
    """``init_args`` as a mapping of arguments that ``cls`` accepts (unless it takes ``**kwargs``)."""
    init_args = {} if init_args is None else init_args
    if not isinstance(init_args, dict):
        _fail(key, f"expected a mapping of {cls.__name__} arguments, got {type(init_args).__name__}")
    parameters = inspect.signature(cls.__init__).parameters
    if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        accepted = set(parameters) - {"self", *reserved}
        unknown = sorted(set(init_args) - accepted)
        if unknown:
            _fail(key, f"unknown {cls.__name__} argument(s) {unknown}; expected names from {sorted(accepted)}")
    for name in reserved:
        if name in init_args:
            _fail(f"{key}.{name}", "set by the leaderboard, not allowed here")
    return init_args


def _check_model(entry: object, key: str) -> dict:
    entry = _mapping(entry, key, MODEL_KEYS)
    cls = resolve_class(entry.get("class_path"), AnomalibModule, f"{key}.class_path")
    resolved = {**entry, "class_path": class_path_of(cls)}
    resolved["init_args"] = _check_init_args(cls, entry.get("init_args"), f"{key}.init_args")
    if "image_size" in entry:
        size = entry["image_size"]
        size = [size, size] if isinstance(size, int) else size
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
            _fail(f"{key}.image_size", f"expected a positive int or [height, width], got {entry['image_size']!r}")
        resolved["image_size"] = size
    if "name" in entry and (not isinstance(entry["name"], str) or not entry["name"]):
        _fail(f"{key}.name", f"expected a non-empty string, got {entry['name']!r}")
    _mapping(entry.get("trainer", {}), f"{key}.trainer", set(entry.get("trainer", {}) or {}))
    if "defense" in entry:
        defense = _mapping(entry["defense"], f"{key}.defense", DEFENSE_KEYS)
        purifier = resolve_class(defense.get("class_path"), DiffusionPurifier, f"{key}.defense.class_path")
        _check_init_args(purifier, defense.get("init_args"), f"{key}.defense.init_args", reserved=("denoiser",))
        if "denoiser" not in defense:
            _fail(f"{key}.defense.denoiser", "missing: the purifier's diffusion model (a model entry, e.g. AdvRAD)")
        resolved["defense"] = {
            **defense,
            "class_path": class_path_of(purifier),
            "denoiser": _check_model(defense["denoiser"], f"{key}.defense.denoiser"),
        }
    return resolved


def _check_data(entry: object, key: str) -> dict:
    entry = _mapping(entry, key, DATA_KEYS)
    cls = resolve_class(entry.get("class_path"), AnomalibDataModule, f"{key}.class_path")
    init_args = _check_init_args(cls, entry.get("init_args"), f"{key}.init_args")
    return {**entry, "class_path": class_path_of(cls), "init_args": init_args}


def _grid_entries(value: object) -> list:
    return list(value["grid"]) if isinstance(value, dict) and set(value) == {"grid"} else [value]


def _threat_models(values: object, key: str) -> list[ThreatModel]:
    if not isinstance(values, list) or not values:
        _fail(key, f"expected a non-empty list of {{norm, eps}} mappings, got {values!r}")
    threats = []
    for index, value in enumerate(values):
        item = _mapping(value, f"{key}[{index}]", THREAT_MODEL_KEYS)
        eps = item.get("eps")
        eps = [eps] if isinstance(eps, int | float) else eps
        if not isinstance(eps, list) or not eps or not all(isinstance(e, int | float) and e > 0 for e in eps):
            _fail(f"{key}[{index}].eps", f"expected a positive radius or a list of them, got {item.get('eps')!r}")
        threats.append(ThreatModel(str(item.get("norm")), tuple(sorted(float(e) for e in eps))))
    return threats


def _evaluator_settings(section: dict, threats: list[ThreatModel], key: str) -> dict:
    settings = {name: value for name, value in section.items() if name != "threat_models"}
    for name in ("norm", "eps", "defense"):
        if name in settings:
            _fail(f"{key}.{name}", "not allowed here: norm and eps go in threat_models, a defense in a model entry")
    for index, threat in enumerate(threats):
        try:
            RobustEvaluator(norm=threat.norm, eps=list(threat.eps), **settings)
        except TypeError as error:
            _fail(key, f"not a RobustEvaluator argument ({error})")
        except ValueError as error:
            _fail(f"{key}.threat_models[{index}] or {key}", str(error))
    return settings


def parse_config(config: dict, base_dir: Path | None = None) -> LeaderboardConfig:
    """Validate a loaded leaderboard YAML and expand its grid; relative ``output_dir`` is relative to ``base_dir``
    (the working directory when ``None``)."""
    if not isinstance(config, dict) or SECTION not in config:
        _fail(SECTION, f"missing: the leaderboard YAML needs a {SECTION!r} section (and optionally 'accelerator')")
    _mapping(config, "<top level>", {"accelerator", SECTION})
    accelerator = config.get("accelerator", "cpu")
    accelerators = accelerator if isinstance(accelerator, list) else [accelerator]
    for index, name in enumerate(accelerators):
        if name not in {"cpu", "cuda"}:
            _fail(f"accelerator[{index}]", f"expected 'cpu' or 'cuda', got {name!r}")
    section = _mapping(config[SECTION], SECTION, SECTION_KEYS)
    for name in ("model", "data"):
        if name not in section:
            _fail(f"{SECTION}.{name}", "missing")
    robust_eval = section.get("robust_eval") or {}
    if not isinstance(robust_eval, dict):
        _fail(f"{SECTION}.robust_eval", f"expected a mapping of RobustEvaluator arguments, got {robust_eval!r}")
    default_threats = [{"norm": "Linf", "eps": [2 / 255]}, {"norm": "L2", "eps": [0.2]}]
    threats = _threat_models(robust_eval.get("threat_models", default_threats), f"{SECTION}.robust_eval.threat_models")
    evaluator = _evaluator_settings(robust_eval, threats, f"{SECTION}.robust_eval")
    trainer = _mapping(section.get("trainer", {}), f"{SECTION}.trainer", set(section.get("trainer", {}) or {}))
    seed = section.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int | dict):
        _fail(f"{SECTION}.seed", f"expected an integer or {{grid: [integers]}}, got {seed!r}")
    models = _grid_entries(section["model"])
    if not models:
        _fail(f"{SECTION}.model.grid", "expected at least one model entry")
    in_grid = isinstance(section["model"], dict) and "grid" in section["model"]
    model_keys = [f"{SECTION}.model" + (f".grid[{i}]" if in_grid else "") for i in range(len(models))]
    checked_models = {key: _check_model(entry, key) for key, entry in zip(model_keys, models, strict=True)}
    data_key = f"{SECTION}.data"
    _check_data({**_mapping(section["data"], data_key, DATA_KEYS), "init_args": {}}, data_key)  # before expanding
    groups = []
    for model_key, model in checked_models.items():
        grid = {"seed": section.get("seed", 0), "data": section["data"]}
        for cell in get_iterator_from_grid_dict(grid):
            groups.append(CellGroup(model, _check_data(cell["data"], data_key), int(cell["seed"]), trainer, model_key))
    output_dir = Path(section.get("output_dir", DEFAULT_OUTPUT_DIR))
    if not output_dir.is_absolute() and base_dir is not None:
        output_dir = base_dir / output_dir
    return LeaderboardConfig(
        accelerators, output_dir, groups, threats, evaluator, bool(section.get("random_init_backbones", True))
    )


def load_config(path: str | Path, output_dir: str | Path | None = None) -> LeaderboardConfig:
    """Read and validate the leaderboard YAML at ``path``; ``output_dir`` overrides the YAML's."""
    path = Path(path)
    if not path.is_file():
        msg = f"--config: no such file {str(path)!r}"
        raise FileNotFoundError(msg)
    config = parse_config(yaml.safe_load(path.read_text(encoding="utf-8")))
    if output_dir is not None:
        config.output_dir = Path(output_dir)
    return config


def model_label(model: dict) -> str:
    """The leaderboard's name of a model entry: its ``name``, else its class name (with the defense and its level)."""
    if model.get("name"):
        return str(model["name"])
    label = model["class_path"].rsplit(".", 1)[-1]
    if "defense" in model:
        defense = model["defense"]
        args = ", ".join(f"{k}={v}" for k, v in (defense.get("init_args") or {}).items())
        label = f"Purified({label}, {defense['class_path'].rsplit('.', 1)[-1]}({args}))"
    return label


def data_label(data: dict) -> tuple[str, str]:
    """The datamodule's class name and its category (``"-"`` when it has none)."""
    category = (data.get("init_args") or {}).get("category", "-")
    return data["class_path"].rsplit(".", 1)[-1], str(category)


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, for cache keys and JSON entries."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
