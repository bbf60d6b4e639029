"""JupyterLab as on Binder, driven by headless Chromium: notebook, dashboard link, dashboard.

The server is started through ``binder/start`` with a JupyterHub-style prefix
(``JUPYTERHUB_SERVICE_PREFIX`` and the same ``base_url``), on 127.0.0.1, a free port and
a token, in a temporary root holding a copy of ``00_cluster_and_data.ipynb``. Chromium
opens the notebook and runs its first cells with Shift+Enter (one calls
``dmlkit.connect()`` and the next prints ``client.dashboard_link``); the test reads that
link from the output, checks it goes through jupyter-server-proxy, checks that the Dask
panel (dask-labextension) accepts it, and loads the dashboard's status page through it
until Bokeh has rendered the plots, which needs the proxied websocket. Screenshots are
saved in the test's ``tmp_path``. Afterwards the kernel (which closes its LocalCluster at
exit), the server and any process they left are stopped.

Needs Debian's ``chromium`` and ``chromium-driver`` (``bash ci/browser.sh`` installs them;
``DMLKIT_CHROMIUM`` and ``DMLKIT_CHROMEDRIVER`` point elsewhere) and skips without them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = "00_cluster_and_data.ipynb"
PREFIX = "/user/dmlkit-test/"  # what JupyterHub gives a Binder session: /user/<name>/
CHROMIUM = os.environ.get("DMLKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (os.environ.get("DMLKIT_CHROMEDRIVER") or shutil.which("chromedriver")
                or "/usr/bin/chromedriver")
CHROMIUM_ARGS = (  # no sandbox as root; no calls home (this machine has no network)
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
)
SERVER_TIMEOUT = 90  # s for JupyterLab to answer
CELL_TIMEOUT = 120  # s per notebook cell (the cluster starts in one)
PAGE_TIMEOUT = 60  # s for a page or a panel to render

pytestmark = [pytest.mark.browser, pytest.mark.cluster]

if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs Chromium ({CHROMIUM}) and ChromeDriver ({CHROMEDRIVER}): "
                "run `bash ci/browser.sh` as root, or apt-get install chromium chromium-driver",
                allow_module_level=True)
for _module, _what in [("selenium", "selenium (the test extra)"),
                       ("jupyterlab", "jupyterlab (the notebooks extra)"),
                       ("jupyter_server_proxy", "jupyter-server-proxy (the notebooks extra)"),
                       ("dask_labextension", "dask-labextension (the notebooks extra)"),
                       ("ipykernel", "ipykernel"), ("psutil", "psutil")]:
    pytest.importorskip(_module, reason=f"needs {_what}")

import psutil  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _api(base: str, token: str, path: str, method: str = "GET") -> object:
    request = urllib.request.Request(urljoin(base, path), method=method,
                                     headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


@pytest.fixture
def lab(tmp_path):
    """JupyterLab started by binder/start as on Binder: (base URL, token, server pid, processes)."""
    from ipykernel.kernelspec import write_kernel_spec

    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    jupyter = tmp_path / "jupyter"
    write_kernel_spec(str(jupyter / "kernels" / "python3"))  # a python3 kernel of this interpreter
    settings = tmp_path / "lab-settings"  # what binder/postBuild installs into the image
    (settings / "overrides.d").mkdir(parents=True)
    shutil.copy(ROOT / "binder" / "jupyterlab-overrides.json", settings / "overrides.d" / "dmlkit.json")
    (settings / "overrides.d" / "test.json").write_text(json.dumps(  # no news pop-up over the page
        {"@jupyterlab/apputils-extension:notification": {"fetchNews": "false"}}))

    port, token = _free_port(), os.urandom(16).hex()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DMLKIT_", "DASK_", "JUPYTER"))}
    env.update({
        "JUPYTERHUB_SERVICE_PREFIX": PREFIX,
        "JUPYTER_PATH": str(jupyter),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "user-settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "DMLKIT_DATA": str(tmp_path / "data"),
        "MPLBACKEND": "Agg",
    })
    command = [str(ROOT / "binder" / "start"), sys.executable, "-m", "jupyter", "lab",
               "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
               f"--ServerApp.base_url={PREFIX}", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", f"--LabApp.app_settings_dir={settings}",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.news_url=", "--LabApp.extension_manager=readonly",
               "--ServerApp.shutdown_no_activity_timeout=600"]
    if os.geteuid() == 0:
        command.append("--allow-root")
    log = open(tmp_path / "jupyterlab.log", "wb")
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}{PREFIX}"
    started: set[psutil.Process] = set()
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            assert server.poll() is None, (
                f"JupyterLab exited with {server.returncode}:\n{_tail(tmp_path / 'jupyterlab.log')}")
            try:
                _api(base, token, "api/status")
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline, (
                    f"JupyterLab did not answer within {SERVER_TIMEOUT} s:\n"
                    f"{_tail(tmp_path / 'jupyterlab.log')}")
                time.sleep(0.5)
        yield base, token, server.pid, started
    finally:
        started.update(_descendants(server.pid))
        # shut the kernels down politely: the kernel's exit closes its LocalCluster
        try:
            for kernel in _api(base, token, "api/kernels"):
                _api(base, token, f"api/kernels/{kernel['id']}", method="DELETE")
        except Exception as exc:  # the server may be gone already; the kill below cleans up
            print(f"could not shut the kernels down through the API: {exc!r}", file=sys.stderr)
        started.update(_descendants(server.pid))
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        _, alive = psutil.wait_procs(list(started), timeout=15)
        for process in alive:  # only processes this server started (recorded above)
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        log.close()
        if alive:
            print(f"killed leftover processes: {[p.pid for p in alive]}", file=sys.stderr)


@pytest.fixture
def browser(tmp_path):
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (*CHROMIUM_ARGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    try:
        yield driver
    finally:
        driver.quit()


def _tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def _cells(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook .jp-Cell")


def _prompt(cell) -> str:
    return cell.find_element(By.CSS_SELECTOR, ".jp-InputArea-prompt").text.strip()


def _run_cells(driver, n: int, screenshot: Path) -> list[str]:
    """Select the first cell, press Shift+Enter ``n`` times; the code cells' output texts."""
    wait = WebDriverWait(driver, PAGE_TIMEOUT)
    wait.until(lambda d: len(_cells(d)) > n)
    # the kernel must be idle before the first Shift+Enter
    wait.until(lambda d: d.find_elements(
        By.CSS_SELECTOR, ".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']"))
    first = _cells(driver)[0]
    first.find_element(By.CSS_SELECTOR, ".jp-InputArea-prompt, .jp-Cell-inputCollapser").click()
    outputs = []
    for index in range(n):
        cell = _cells(driver)[index]
        code = "jp-CodeCell" in cell.get_attribute("class")
        driver.switch_to.active_element.send_keys(Keys.SHIFT, Keys.ENTER)
        if not code:
            continue
        try:  # "[*]:" while running, "[3]:" when done
            WebDriverWait(driver, CELL_TIMEOUT, poll_frequency=0.25).until(
                lambda d: re.fullmatch(r"\[\d+\]:", _prompt(_cells(d)[index])))
        except Exception:
            driver.save_screenshot(str(screenshot))
            raise
        cell = _cells(driver)[index]
        errors = cell.find_elements(By.CSS_SELECTOR, "[data-mime-type='application/vnd.jupyter.error']")
        text = "\n".join(o.text for o in cell.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output"))
        if errors:
            driver.save_screenshot(str(screenshot))
        assert not errors, f"{NOTEBOOK}, cell {index} failed in the browser:\n{text}"
        outputs.append(text)
    return outputs


def _bokeh_rendered(driver, n_roots: int = 1) -> bool:
    return driver.execute_script(
        "return !!(window.Bokeh && Bokeh.documents.length"
        f" && Bokeh.documents[0].roots().length >= {n_roots})")


def _open_task_stream_from_the_dask_panel(driver, link: str, screenshot: Path) -> None:
    wait = WebDriverWait(driver, PAGE_TIMEOUT, poll_frequency=0.25)
    driver.find_element(By.CSS_SELECTOR, ".jp-SideBar .lm-TabBar-tab[data-id='dask-dashboard-launcher']").click()
    panel = wait.until(lambda d: d.find_element(By.ID, "dask-dashboard-launcher"))
    panel.find_element(By.CSS_SELECTOR, "jp-button[title='Auto-detect dashboard URL']").click()
    url_input = panel.find_element(By.CSS_SELECTOR, ".dask-URLInput input")
    try:
        wait.until(lambda d: url_input.get_attribute("value") == link[: -len("status")])
        button = wait.until(lambda d: panel.find_element(
            By.CSS_SELECTOR, ".dask-DashboardListing-item button[value='Task Stream']"))
        button.click()
        frame = wait.until(lambda d: d.find_element(
            By.CSS_SELECTOR, ".jp-MainAreaWidget iframe[src*='individual-task-stream']"))
        driver.switch_to.frame(frame)
        try:
            wait.until(_bokeh_rendered)
        finally:
            driver.switch_to.default_content()
    finally:
        driver.save_screenshot(str(screenshot))
    assert url_input.get_attribute("value") == link[: -len("status")]


def test_notebook_dashboard_link_opens_the_dashboard_through_the_proxy(lab, browser, tmp_path):
    base, token, server_pid, started = lab
    t0 = time.perf_counter()
    browser.get(f"{base}lab/tree/{NOTEBOOK}?token={token}")
    # cells 0-5: title, imports, text, dmlkit.connect(), text, print(client.dashboard_link)
    outputs = _run_cells(browser, 6, tmp_path / "notebook-failed.png")
    started.update(_descendants(server_pid))  # the kernel and the cluster's worker processes
    connected = "\n".join(outputs)
    assert "dmlkit: connected to tcp://127.0.0.1:" in connected, connected
    links = re.findall(r"^dashboard: (\S+)$", outputs[-1], re.M)
    assert links, f"no dashboard link printed by the notebook:\n{outputs[-1]}"
    link = links[0]
    # binder/start made the client report the dashboard behind jupyter-server-proxy
    assert re.fullmatch(re.escape(PREFIX) + r"proxy/\d+/status", link), link
    assert f"dashboard: {link}" in outputs[-2], "connect() printed another link than the client's"
    port = int(link.split("/")[-2])
    browser.save_screenshot(str(tmp_path / "notebook.png"))

    # the Dask panel: its default URL comes from binder/jupyterlab-overrides.json; its search
    # button asks the kernel for the client's link, and it lists the dashboard's plots
    settings = _api(base, token, "lab/api/settings/dask-labextension:plugin")
    default = settings["schema"]["properties"]["defaultURL"]["default"]
    assert default == "proxy/8787", settings["schema"]["properties"]["defaultURL"]
    _open_task_stream_from_the_dask_panel(browser, link, tmp_path / "dask-panel.png")

    # the status page through the link, resolved against the page as a click would
    browser.get(urljoin(browser.current_url, link))
    assert browser.current_url == urljoin(base, f"proxy/{port}/status"), browser.current_url
    try:
        # the plots are Bokeh models sent over the dashboard's websocket, through the proxy
        WebDriverWait(browser, PAGE_TIMEOUT, poll_frequency=0.25).until(
            lambda d: _bokeh_rendered(d, n_roots=3))
    finally:
        browser.save_screenshot(str(tmp_path / "dashboard-status.png"))
    assert "Dask" in browser.title, browser.title
    roots = browser.execute_script(
        "return Bokeh.documents[0].roots().map(r => r.name || r.constructor.name)")
    print(f"dashboard roots: {roots}; screenshots in {tmp_path}; "
          f"{time.perf_counter() - t0:.1f} s in the browser", file=sys.stderr)
