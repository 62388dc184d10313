"""napari with the service: the plugin's widget in a real viewer (``tests/napari_session.py``,
run here in its own interpreter), and what importing the plugin needs without internet.

The session runs in a fresh interpreter because an xdist worker that imported TensorFlow before
(the training tests) crashes in Mesa's ``glClear`` at the viewer's first paint: a segfault takes
the worker down and no test could say why. A napari user's process is a fresh one too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from service.api.serverkit import serverkit_available

if not serverkit_available():
    pytest.skip("needs the serverkit extra (imaging-server-kit)", allow_module_level=True)
if importlib.util.find_spec("napari") is None:
    pytest.skip("napari is not installed (the dev extra has it)", allow_module_level=True)

pytestmark = pytest.mark.slow

SESSION = Path(__file__).with_name("napari_session.py")
SESSION_TIMEOUT_S = 600


def test_a_napari_user_segments_an_image_layer(tmp_path: Path) -> None:
    """``tests/napari_session.py`` in a fresh ``pytest`` process: its outcome is this test's,
    a skip (no X display, no Qt) with its reason, a failure with its output."""
    report = tmp_path / "session.xml"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(SESSION),
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            f"--junitxml={report}",
            f"--basetemp={tmp_path / 'session'}",
        ],
        cwd=SESSION.parents[1],
        env=environ,
        capture_output=True,
        text=True,
        timeout=SESSION_TIMEOUT_S,
    )
    output = run.stdout[-6000:] + run.stderr[-3000:]
    assert report.exists(), output  # pytest itself ran (no crash before its report)
    root = ElementTree.parse(report).getroot()
    cases = list(root.iter("testcase"))
    skips = [e.get("message") for e in root.iter("skipped")]
    assert cases, output
    if len(skips) == len(cases):
        pytest.skip(f"the napari session skipped: {skips}")
    assert run.returncode == 0, output


def offline(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` with no network at all (a new network namespace: ``unshare -rn``),
    without pytest's ``PYTEST_CURRENT_TEST`` (scikit-image's fetcher acts on it)."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    environ.update(env)
    return subprocess.run(
        ["unshare", "-rn", sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def no_network() -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -rn: no user or network namespaces here")


WIDGET_IMPORT = "import imaging_server_kit.gui.napari_serverkit.napari_http_widget"


def test_the_plugin_import_needs_the_internet(no_network: None, tmp_path: Path) -> None:
    """What napari runs when the user opens the plugin's widget imports ``imaging_server_kit``,
    whose demo module loads ``skimage.data.brain()``: not in scikit-image's wheel, so a
    download. Without network and with scikit-image's cache cold it fails (after pooch's
    retries); with the demo module stood in for (the service's ``import_serverkit``, which a
    launcher script can run before napari) the widget imports."""
    cold = {"SKIMAGE_DATADIR": str(tmp_path / "skimage-data")}
    stock = offline(WIDGET_IMPORT, **cold)
    assert stock.returncode != 0 and "brain.tiff" in stock.stderr, stock.stderr[-2000:]
    stood_in = offline(
        f"from service.api.serverkit import import_serverkit; import_serverkit(); {WIDGET_IMPORT}",
        **cold,
    )
    assert stood_in.returncode == 0, stood_in.stderr[-2000:]
