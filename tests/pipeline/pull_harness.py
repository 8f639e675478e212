"""A registered model pulled where this project is not installed: a Python that sees the venv's
third-party packages but cannot import this project, and the script it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

# Run in the clean interpreter: load by alias, predict, report where `models` came from.
PULL = r"""
import json, sys, time
started = time.perf_counter()
try:
    import models
except ImportError:
    pass
else:
    sys.exit(f"this project is importable here: {models.__file__}")
import mlflow
import numpy as np
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
loaded = time.perf_counter() - started
outputs = {}
for name in sys.argv[4:]:
    crops = np.load(f"{sys.argv[3]}/{name}.npy")
    outputs[name] = {key: value.tolist() for key, value in model.predict(crops).items()}
import models
print(json.dumps({"cold_load_s": loaded, "models_from": models.__file__, "outputs": outputs}))
"""


def clean_python(folder: Path) -> Path:
    """A virtualenv that sees this venv's third-party packages (one path line) but not this
    project: the editable install's hook is a .pth file there, and path lines are not scanned."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    packages = Path(np.__file__).resolve().parents[1]
    site = next((folder / "lib").glob("python3*/site-packages"))
    (site / "third-party.pth").write_text(f"{packages}\n")
    return folder / "bin" / "python"
