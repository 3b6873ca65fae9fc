# Install the wheel bundle of `make gpu-bundle` on the GPU machine (Python 3.12 with torch and CUDA, no network) and
# check that anomalib and the plugin load: `anomalib train --help`, `get_model("AdvRAD")`, the plugin's callbacks and
# its CLI shorthands. Sourced, so that the `anomalib` command stays on the caller's PATH:
#
#   source benchmarks/gpu/install.sh [BUNDLE]      # BUNDLE: the wheels' folder, .whl by default
#
# The wheels go into $SITE (/tmp/site by default) with `pip install --no-index --no-deps`. The plugin joins anomalib
# through a start-up hook, a .pth file, which Python reads only in a site directory and not in a PYTHONPATH entry, so a
# .pth in the interpreter's own site-packages makes $SITE a site directory for every later process. $PYTHON (python3
# by default) is the interpreter that gets the bundle.
set -euo pipefail
bundle=${1:-.whl}
SITE=${SITE:-/tmp/site}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target "$SITE" "$bundle"/*.whl
"$PYTHON" - "$SITE" <<'EOF'
import site
import sys
from pathlib import Path

Path(site.getsitepackages()[0], "anomalib_robust_bundle.pth").write_text(f"import site; site.addsitedir({sys.argv[1]!r})\n")
EOF
export PATH="$SITE/bin:$PATH"

anomalib train --help > /dev/null
anomalib train --model adv_rad --data MVTecAD --print_config | grep "class_path: anomalib_robust.models" > /dev/null
"$PYTHON" - <<'EOF'
import importlib

from anomalib.models import get_model  # the start-up hook imports the plugin with anomalib.models

from anomalib_robust.registry import CALLBACKS

model = get_model("AdvRAD")
callbacks = {}
for name, class_path in CALLBACKS.items():
    module, _, attribute = class_path.rpartition(".")
    callbacks[name] = getattr(importlib.import_module(module), attribute).__name__
print(f"installed: {type(model).__name__} {tuple(model.model.image_size)} from {model.__module__}; callbacks {callbacks}")
EOF
