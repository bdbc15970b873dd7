"""Installing mir_lightning into a pinned training stack moves none of its pins.

Runs in CI's oldest-pins environment (.ci/run sets ``MIR_OLDEST_PINS`` to
.ci/oldest-pins.txt after installing those pins and then ``pip install -e ".[hf]"``), skipped
elsewhere. Two checks:

* the real install that .ci/run made left every pinned version as it was;
* ``pip install --dry-run --report`` of a fresh (non-editable) ``mir_lightning[hf]`` plans
  to install none of the pinned packages (pip reinstalls a package only to change it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINS_FILE = os.environ.get("MIR_OLDEST_PINS")
pytestmark = pytest.mark.skipif(
    not PINS_FILE, reason="runs in CI's oldest-pins environment only (.ci/run sets MIR_OLDEST_PINS)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of a requirements file."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version.strip()
    return pins


def test_the_pins_are_what_is_installed():
    pins = read_pins(PINS_FILE)
    assert {"torch", "transformers", "accelerate"} <= set(pins)
    installed = {name: metadata.version(name) for name in pins}
    # torch's local version label (+cu121) is not part of the pin
    moved = {name: (pins[name], v) for name, v in installed.items() if v.split("+")[0] != pins[name]}
    assert not moved, f"pinned packages moved (pin, installed): {moved}"
    assert metadata.version("mir_lightning")  # .ci/run installed the package itself into this env


def test_a_fresh_install_plans_no_change_to_the_pins(tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report",
         str(report), f"{ROOT}[hf]"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    planned = {canonical(item["metadata"]["name"]): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "mir-lightning" in planned
    pins = read_pins(PINS_FILE)
    # pip lists only what it would (re)install; an installed package that satisfies the
    # requirements stays, so a pinned name in the plan is a pin that would move
    changed = {name: (pins[name], planned[name]) for name in pins if name in planned}
    assert not changed, f"installing mir_lightning[hf] would move (pin, planned): {changed}"


def test_every_public_entry_point_imports_on_the_pinned_stack():
    import mir_lightning
    from mir_lightning import evaluate  # noqa: F401
    from mir_lightning.adapters.hf_trainer import MIRTrainerCallback  # noqa: F401
    from mir_lightning.models.llava import llava_mask_fn  # noqa: F401

    for name in mir_lightning.__all__:  # the lazy names load their modules (Lightning's included)
        assert getattr(mir_lightning, name) is not None
