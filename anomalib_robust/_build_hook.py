"""Hatchling build hook: put the anomalib startup hook into every wheel, editable ones included.

anomalib has no plugin entry points; its CLI resolves ``--model AdvRAD`` among the ``AnomalibModule`` subclasses
that are already imported. The wheel therefore carries ``anomalib_robust.pth``, which imports the tiny module
``anomalib_robust_autoload``; that module imports this plugin only once ``anomalib.models`` itself is imported.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

STARTUP_FILES = {
    "anomalib_robust/_autoload.py": "anomalib_robust_autoload.py",
    "anomalib_robust/_autoload.pth": "anomalib_robust.pth",
}


class StartupHookBuildHook(BuildHookInterface):
    """Adds the ``.pth`` startup hook and its module to the wheel root."""

    def initialize(self, version: str, build_data: dict) -> None:
        """Map the startup files into the wheel (``force_include_editable`` for ``pip install -e``)."""
        key = "force_include_editable" if version == "editable" else "force_include"
        build_data.setdefault(key, {}).update(STARTUP_FILES)
