"""Load anomalib-robust into anomalib as soon as anomalib itself is imported, and not before.

Installed at the top level of site-packages and imported by ``anomalib_robust.pth`` at interpreter start-up. It only
registers an import hook, so Python processes that never import anomalib pay nothing. anomalib has no plugin entry
points: its CLI resolves ``--model AdvRAD`` among the ``AnomalibModule`` subclasses already imported. So:

- once ``anomalib.models`` has executed, ``anomalib_robust`` is imported (its models become visible to
  ``get_model``, ``list_models`` and the CLI);
- once ``anomalib.cli.cli`` has executed, ``anomalib_robust.cli.extend_anomalib_cli`` adds the plugin's CLI
  shorthands (``--model adv_rad``, ``--callbacks robust_eval``).

``ANOMALIB_ROBUST_AUTOLOAD=0`` (or ``false``/``no``/``off``) in the environment switches the hook off for that process:
anomalib then runs as if the plugin were not installed, and ``import anomalib_robust`` still loads it explicitly.
"""

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import warnings

DISABLE_VARIABLE = "ANOMALIB_ROBUST_AUTOLOAD"
"""Set to ``0`` to switch the start-up hook off."""

AFTER_IMPORT = {
    "anomalib.models": "anomalib_robust",
    "anomalib.cli.cli": "anomalib_robust.cli:extend_anomalib_cli",
}


def _run(target: str, module: object) -> None:
    """Import ``target`` (``"package"`` or ``"package.module:function"``, the function called with ``module``)."""
    module_name, _, function_name = target.partition(":")
    try:
        plugin = importlib.import_module(module_name)
        if function_name:
            getattr(plugin, function_name)(module)
    except Exception as error:  # noqa: BLE001 - a broken plugin must not break anomalib itself
        warnings.warn(f"anomalib-robust could not be loaded ({error!r}); its models are unavailable.", stacklevel=2)


class _RunAfterLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the plugin's hook for that module."""

    def __init__(self, loader: importlib.abc.Loader, target: str) -> None:
        self._loader = loader
        self._target = target

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run(self._target, module)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _AnomalibFinder(importlib.abc.MetaPathFinder):
    """Finds the trigger modules with the regular path finder and wraps their loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in AFTER_IMPORT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RunAfterLoader(spec.loader, AFTER_IMPORT[fullname])
        return spec


if os.environ.get(DISABLE_VARIABLE, "1").strip().lower() not in {"0", "false", "no", "off"} and not any(
    type(finder).__name__ == "_AnomalibFinder" for finder in sys.meta_path
):
    sys.meta_path.insert(0, _AnomalibFinder())
