"""napari driven as a napari user drives the service: the real viewer, the real Imaging Server
Kit plugin widget and the service on a real uvicorn (``bench.live_server``).

Not collected by itself: ``tests/test_napari.py`` runs this file in a fresh interpreter, as a
napari user's own process is. In an xdist worker that has imported TensorFlow before (the
training tests), the viewer's first paint crashes the whole process in Mesa's ``glClear``
(TensorFlow's and Mesa's LLVM in one process), which no test here could report.

napari comes with the dev extra (``imaging-server-kit[napari]``: napari with Qt 6, and Server
Kit 0.3's plugin), and the X display from Debian's ``xvfb`` (``make deploy-tools``); the tests
skip, saying why, where napari, Qt or an X display is missing.

An X server is started here (``Xvfb``, apt package ``xvfb``) unless ``DISPLAY`` is set already
(``xvfb-run -a``). Qt 6's xcb platform plugin also needs ``libxcb-icccm4`` and
``libxcb-keysyms1`` besides what a Debian 12 image usually has.

The widget is Server Kit 0.3's own, what napari's *Plugins > Imaging Server Kit > Connect to
server* opens (``imaging_server_kit.gui.napari_serverkit.napari_http_widget.NapariHttpWidget``):
the separate ``napari-serverkit`` package (0.1.2) is for Server Kit < 0.3 and fails to import
with 0.3 (``imaging_server_kit.core.errors`` has no ``ServerRequestError`` there).
"""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from bench.live_server import LiveServer, live_server
from service.api.serverkit import import_serverkit, serverkit_available
from tests.conftest import READY_TIMEOUT_S, tiff_bytes
from tests.test_default_models import synthetic_nuclei

if not serverkit_available():
    pytest.skip("needs the serverkit extra (imaging-server-kit)", allow_module_level=True)
# Server Kit 0.3's package import downloads skimage.data.brain() (a demo sample) and fails
# without internet, as here: the service's offline import stands in for its demo module first
# (what a napari user without internet needs too: test_the_plugin_import_needs_the_internet).
import_serverkit()
pytest.importorskip(
    "napari", reason="napari is not installed: run in napari's environment (module docstring)"
)
pytest.importorskip("qtpy", reason="napari's Qt binding layer (qtpy) is not installed")

MENU = ("&Plugins", "Imaging Server Kit")  # the plugin's display name in napari's menu
WIDGET = "Connect to server"
MODELS = ("nuclei", "nuclei-3class")
RUN_TIMEOUT_S = 60.0


def bundled(root: Path) -> Path:
    """A model directory with the two bundled models (as ``tests/test_serverkit.py``)."""
    from service.core.config import REPO_MODELS

    root.mkdir()
    for name in MODELS:
        (root / name).symlink_to(REPO_MODELS / name)
    return root


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it ends (Linux)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="session")
def display() -> str:
    """An X display for Qt: ``DISPLAY`` as set (``xvfb-run``), or an ``Xvfb`` started here
    that lives as long as this process (Qt keeps its connection until the process ends).

    Qt aborts the whole process when its platform plugin cannot load (a missing xcb library),
    so a throwaway process opens a ``QApplication`` first and the test skips with its error."""
    if not os.environ.get("DISPLAY"):
        if shutil.which("Xvfb") is None:
            pytest.skip("no X display: DISPLAY is unset and Xvfb is not installed (apt xvfb)")
        read, write = os.pipe()
        subprocess.Popen(
            ["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
            pass_fds=(write,),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        os.close(write)
        with os.fdopen(read) as pipe:
            number = pipe.readline().strip()  # written once the server accepts clients
        if not number:
            pytest.skip("Xvfb did not start")
        os.environ["DISPLAY"] = f":{number}"
    probe = subprocess.run(
        [sys.executable, "-c", "from qtpy.QtWidgets import QApplication; QApplication([])"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"Qt cannot open the display {os.environ['DISPLAY']}: {probe.stderr[-800:]}")
    return os.environ["DISPLAY"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("napari")
    models = bundled(root / "models")
    # The newest version of each model: what the widget lists and runs (the others would only
    # add start-up work).
    settings = {"intra_op_threads": "1", "model_versions": "newest"}
    with live_server(models, root / "work", settings, ready_timeout=READY_TIMEOUT_S) as srv:
        yield srv


def segment_png(srv: LiveServer, image: np.ndarray, **params: Any) -> np.ndarray:
    r = httpx.post(
        f"{srv.url}/segment", files={"image": tiff_bytes(image)}, params=params, timeout=120
    )
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


def menu_actions(viewer: Any, path: tuple[str, ...]) -> list[Any]:
    """The actions at ``path`` (menu titles, then the entry's text) of the window's menu bar."""
    bar = viewer.window._qt_window.menuBar()
    return [found for action in bar.actions() for found in submenu_actions(action, path)]


def submenu_actions(action: Any, path: tuple[str, ...]) -> list[Any]:
    """``action`` if it is ``path``'s end, or the actions below it along ``path``."""
    if action.text() != path[0]:
        return []
    if len(path) == 1:
        return [action]
    sub = action.menu()
    return [] if sub is None else [a for b in sub.actions() for a in submenu_actions(b, path[1:])]


def changed(shot: np.ndarray, bare: np.ndarray, by: int = 20) -> np.ndarray:
    """Pixels of a screenshot that differ from the same view without the Labels layer."""
    return (np.abs(shot[..., :3].astype(np.int16) - bare[..., :3]) > by).any(axis=-1)


def test_a_napari_user_segments_an_image_layer(
    display: str, server: LiveServer, tmp_path: Path
) -> None:
    """Plugins > Imaging Server Kit > Connect to server, the service's URL, Connect, the
    ``nuclei`` algorithm and the image layer, Run: the objects arrive as a Labels layer, the
    same labels as ``/segment?output=labels``, drawn in colour over the nuclei."""
    import napari
    from imaging_server_kit.gui.napari_serverkit.napari_http_widget import NapariHttpWidget
    from napari.utils.notifications import notification_manager
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    frame = synthetic_nuclei((300, 420), seed=3)
    viewer = napari.Viewer(show=True)
    try:
        image = viewer.add_image(frame, name="HeLa-like frame")
        # The user's click on Plugins > Imaging Server Kit > Connect to server: the menu's own
        # action (napari's app-model command for the plugin's widget), which docks it.
        (action,) = menu_actions(viewer, (*MENU, WIDGET))
        action.trigger()
        widget = viewer.window.dock_widgets[f"{WIDGET} (Imaging Server Kit)"]
        assert isinstance(widget, NapariHttpWidget), type(widget)
        runner = widget.runner_widget
        app = QApplication.instance()

        # Server URL, Connect (a real mouse click on the button): the models are listed.
        runner.server_url_field.setText(f"{server.url}/serverkit")
        QTest.mouseClick(runner.connect_btn, Qt.MouseButton.LeftButton)
        listed = [runner.cb_algorithms.itemText(i) for i in range(runner.cb_algorithms.count())]
        assert sorted(listed) == sorted(MODELS), notification_manager.records

        # The algorithm and its parameters, as the panel shows them.
        runner.cb_algorithms.setCurrentText("nuclei")
        panel = widget.params_panel
        assert {"image", "threshold", "overlap", "output", "precision"} <= set(panel.ui_state)
        layers = panel.ui_state["image"].qt_widget
        layers.setCurrentText(image.name)
        assert layers.currentText() == image.name
        assert panel.ui_state["output"].qt_widget.currentText() == "labels"
        sent = panel.get_algo_params()
        assert sent["image"] is image.data and sent["precision"] == "auto"
        # Server Kit's float boxes keep Qt's 2 decimals: the service's 0.125 goes as 0.13.
        assert sent["threshold"] == 0.5 and sent["overlap"] == 0.13

        # Run (a mouse click): the request runs on napari's worker thread; the Labels layer is
        # added on the GUI thread when the answer arrives.
        QTest.mouseClick(widget.run_btn, Qt.MouseButton.LeftButton)
        errors: list[BaseException] = []
        for worker in widget.tasks.active_workers:
            worker.errored.connect(errors.append)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not errors and (widget.tasks.active_workers or "nuclei objects" not in viewer.layers):
            assert time.monotonic() < deadline, (notification_manager.records, server.output())
            app.processEvents()
            time.sleep(0.01)
        assert not errors, (errors, server.output())
        assert widget.run_btn.isEnabled()  # the UI is given back

        labels = viewer.layers["nuclei objects"]
        assert isinstance(labels, napari.layers.Labels)
        asked = segment_png(server, frame, output="labels", overlap=sent["overlap"])
        assert asked.max() > 5
        np.testing.assert_array_equal(np.asarray(labels.data), asked)

        # What the user sees: the labels' colours where the nuclei are. export_figure draws the
        # canvas at one screen pixel per image pixel: with the Labels layer shown and hidden.
        viewer.reset_view()
        window = viewer.screenshot(canvas_only=False, flash=False)
        figure = viewer.export_figure(flash=False)
        labels.visible = False
        bare_window = viewer.screenshot(canvas_only=False, flash=False)
        bare = viewer.export_figure(flash=False)
        labels.visible = True
        for name, shot in [("window", window), ("figure", figure), ("bare", bare)]:
            Image.fromarray(shot).save(tmp_path / f"{name}.png")
        assert figure.shape[:2] == frame.shape
        nuclei = asked > 0
        drawn = changed(figure, bare)
        assert (drawn & nuclei).sum() / (drawn | nuclei).sum() > 0.95
        # The whole window (menus, layer list, the plugin's dock) has them as well.
        assert window.shape[0] > 2 * frame.shape[0] and window.shape == bare_window.shape
        assert changed(window, bare_window).sum() > 0.5 * nuclei.sum()
    finally:
        viewer.close()
