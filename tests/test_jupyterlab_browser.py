"""train.ipynb as a researcher uses it: the real JupyterLab in a real (headless) Chromium, driven by selenium.

One test, step by step (every wait with its own timeout, all of them together under ``TEST_TIMEOUT_S``):

1. copy the project (``pyproject.toml``, which marks the project root, ``notebooks/``, ``params/``) into a
   temporary folder, so nothing is written into the checkout, and edit the copy's parameters cell as a
   user would (a tiny digits run);
2. start JupyterLab from this venv on a free loopback port with a token, in that copy, with its own
   config/data/runtime/settings folders (the kernel ``tdro`` is found through ``JUPYTER_PATH``);
3. open ``notebooks/train.ipynb`` in the lab UI, check that the kernel ``tdro`` started, Run All from
   the Run menu, wait until every code cell ran, save from the File menu, and check that no cell failed;
4. (a) the run went to the project's ``outputs/runs`` (not ``notebooks/outputs/runs``, where the
   kernel's working directory ``notebooks/`` would put it);
5. (b) the latent-space widget responds: moving its slider changes the epoch shown and the kernel redraws
   the image;
6. (c) the saved notebook exported to HTML (``python -m tdro report NOTEBOOK``, as ``make report`` does, and
   plain ``jupyter nbconvert --to html``) read in Chromium with the network disabled (DevTools
   ``Network.emulateNetworkConditions`` offline): the latent-evolution animation shows its frames and
   steps through them, the widget's place says what it is (no blank area, no ``VBox(children=...)``),
   and the tdro export asks for nothing over the network.

The server, its kernels, chromedriver and Chromium are stopped whatever happens. Needs Debian's
``chromium`` and ``chromium-driver`` (``.ci/install-browser``, run by ``.ci/run``) and ``selenium``
(dev extras); missing ones fail the test with the command that installs them.
"""
from __future__ import annotations

import contextlib
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

import nbformat
import pytest

from processes import descendants, wait_gone  # tests/processes.py

REPO = Path(__file__).resolve().parents[1]
TEST_TIMEOUT_S = 150  # from the started server and browser to the last check; every wait has its own, shorter limit
SERVER_START_S = 60
LAB_LOAD_S = 60
RUN_ALL_S = 120
WIDGET_S = 30
# a user's edits of the copy's parameters cell: a tiny digits run (2 epochs: the slider has two epochs to step to)
TINY_EDITS = "\n".join(["epochs = 2", "digits_sizes = [200, 60]", "latent_samples_per_group = 60"])
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
INSTALL = "run .ci/install-browser (apt-get install chromium chromium-driver) and `make install` (selenium)"

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------------------------------------ helpers
class Deadline(Exception):
    """The test ran past ``TEST_TIMEOUT_S``."""


class Fatal(Exception):
    """Raised through ``wait_for`` at once: waiting longer cannot help (a cell failed, the server exited)."""


@contextlib.contextmanager
def overall_timeout(seconds: int):
    """Interrupt the test (the cleanup in ``finally`` blocks still runs) after ``seconds``."""
    def expire(signum, frame):
        raise Deadline(f"the JupyterLab browser test ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.25):
    """``condition()``'s first truthy value within ``timeout`` seconds, else fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Fatal:
            raise
        except Exception as err:  # noqa: BLE001 - stale elements and the like while the page changes
            last_error = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


def browser_binaries() -> tuple[str, str]:
    browser = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver") if os.access(p, os.X_OK)), None)
    if browser is None or driver is None:
        pytest.fail(f"headless Chromium is missing (chromium: {browser}, chromedriver: {driver}): {INSTALL}")
    return browser, driver


def project_copy(root: Path) -> Path:
    """The project files JupyterLab needs, in ``root``, with the copied train.ipynb's parameters cell edited."""
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, root / name)
    for folder in ("notebooks", "params"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    path = root / "notebooks" / "train.ipynb"
    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "train.ipynb must have one cell tagged 'parameters'"
    cells[0].source = cells[0].source.rstrip("\n") + "\n# edited for a tiny run\n" + TINY_EDITS
    nbformat.write(nb, path)
    return path


def lab_settings(folder: Path) -> None:
    """User settings of the test's own JupyterLab: no news or update toasts over the page, every cell rendered."""
    settings = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                            "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for name, value in settings.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def api(base: str, token: str, path: str, method: str = "GET", timeout: float = 5):
    request = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"},
                                     data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if body else None


def jupyter_env(home: Path) -> dict[str, str]:
    """The environment of the test's Jupyter commands: their own folders under ``home``, none of the user's."""
    return {**os.environ,
            "JUPYTER_PATH": str(Path(sys.prefix) / "share" / "jupyter"),  # the venv's kernel `tdro`
            "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
            "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "IPYTHONDIR": str(home / "ipython"),
            "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def jupyterlab(project: Path, home: Path):
    """A JupyterLab server in ``project`` on a free loopback port; yields (base URL, token, process, log path,
    the set of pids to stop at the end: the server's children are added to it)."""
    port, token = free_port(), os.urandom(16).hex()
    for name in ("config", "data", "runtime", "settings", "workspaces", "ipython"):
        (home / name).mkdir(parents=True)
    lab_settings(home / "settings")
    env = jupyter_env(home)
    env.pop("MPLBACKEND", None)  # as a user's JupyterLab: the kernel's own (inline) backend
    env.pop("JPY_SESSION_NAME", None)
    log_path = home / "jupyterlab.log"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={project}",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url=None",
               "--LabApp.extension_manager=readonly", "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:  # CI runs as root
        command.append("--allow-root")
    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    started: set[int] = set()
    try:
        def up():
            if process.poll() is not None:
                raise Fatal(f"JupyterLab exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                return api(base, token, "/api/status", timeout=2) is not None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                return False

        try:
            wait_for(up, SERVER_START_S, "JupyterLab to answer on /api/status")
        except AssertionError as err:
            raise AssertionError(f"{err}\n{log_path.read_text()[-3000:]}") from None
        yield base, token, process, log_path, started
    finally:
        started.update(descendants(process.pid))  # the kernels, before the server goes
        if process.poll() is None:
            with contextlib.suppress(Exception):
                for session in api(base, token, "/api/sessions"):
                    api(base, token, f"/api/kernels/{session['kernel']['id']}", method="DELETE", timeout=10)
            with contextlib.suppress(Exception):
                api(base, token, "/api/shutdown", method="POST", timeout=10)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        for pid in wait_gone(sorted(started), timeout=10):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()


@contextlib.contextmanager
def chromium(profile: Path):
    """Headless Chromium driven by chromedriver (both Debian's; selenium never downloads a driver)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed: {INSTALL}")
    browser, driver_path = browser_binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={profile}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the requests a page makes
    service = Service(executable_path=driver_path, log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.set_script_timeout(30)
        yield driver
    finally:
        pid = service.process.pid if service.process else None
        browsers = descendants(pid) if pid else []
        with contextlib.suppress(Exception):
            driver.quit()
        for leftover in wait_gone([p for p in [pid, *browsers] if p], timeout=10):
            with contextlib.suppress(ProcessLookupError):
                os.kill(leftover, signal.SIGKILL)


def css(driver, selector: str, root=None):
    from selenium.webdriver.common.by import By

    return (root or driver).find_elements(By.CSS_SELECTOR, selector)


def click_menu(driver, menu: str, label: str) -> None:
    """Open a menu of the lab's menu bar and click its item ``label`` (as a user does)."""
    item = wait_for(lambda: next((e for e in css(driver, ".lm-MenuBar-item") if e.text.strip() == menu), None),
                    WIDGET_S, f"the {menu!r} menu")
    item.click()

    def entry():
        for li in css(driver, ".lm-Menu li.lm-Menu-item"):
            labels = css(driver, ".lm-Menu-itemLabel", li)
            if labels and labels[0].text.strip() == label and "lm-mod-disabled" not in li.get_attribute("class"):
                return li
        return None

    wait_for(entry, WIDGET_S, f"the menu item {menu} > {label}").click()


def code_prompts(driver) -> list[str]:
    """The input prompt of every code cell of the open notebook: '[ ]:', '[*]:' or '[n]:'."""
    return [p.text.strip() for p in css(driver, ".jp-NotebookPanel .jp-CodeCell .jp-InputArea-prompt")]


def kernel_status(driver) -> str | None:
    indicator = css(driver, ".jp-NotebookPanel .jp-Notebook-ExecutionIndicator")
    return indicator[0].get_attribute("data-status") if indicator else None


def performance_requests(driver) -> list[str]:
    """URLs the current tab asked for since the previous call (chromedriver's performance log, this tab only)."""
    tab = driver.execute_cdp_cmd("Target.getTargetInfo", {})["targetInfo"]["targetId"]
    urls = []
    for entry in driver.get_log("performance"):
        record = json.loads(entry["message"])
        message = record["message"]
        if message.get("method") == "Network.requestWillBeSent" and record.get("webview") in (None, tab):
            urls.append(message["params"]["request"]["url"])
    return urls


def check_offline_html(driver, html: Path, label: str) -> list[str]:
    """Open an exported report with the network disabled; check the latent animation steps through its
    frames and the widget's place says what it is. Returns the non-local URLs the page asked for."""
    driver.switch_to.new_window("tab")
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {
        "offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
    performance_requests(driver)  # drop what came before
    driver.get(html.resolve().as_uri())
    wait_for(lambda: driver.execute_script("return document.readyState") == "complete", WIDGET_S,
             f"{label} to load")
    image = wait_for(lambda: next(iter(css(driver, "div.animation img")), None), WIDGET_S,
                     f"the latent-evolution animation in {label}")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)
    assert image.is_displayed(), f"{label}: the latent-evolution animation is not visible"
    wait_for(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image),
             WIDGET_S, f"{label}: the animation's frame to render")
    player = image.find_element("xpath", "./ancestor::div[contains(@class, 'animation')][1]")
    buttons = {b.get_attribute("onclick") or "": b for b in css(driver, "button", player)}
    first = next((b for k, b in buttons.items() if "first_frame" in k), None)
    step = next((b for k, b in buttons.items() if "next_frame" in k), None)
    assert first is not None and step is not None, f"{label}: the animation has no first/next frame buttons"
    first.click()
    frame0 = image.get_attribute("src")
    step.click()
    wait_for(lambda: image.get_attribute("src") != frame0, WIDGET_S, f"{label}: the animation to step to a new frame")
    text = driver.find_element("tag name", "body").text
    assert "VBox(children=" not in text, f"{label}: a widget shows its bare repr"
    assert "[LatentExplorer of run" in text, f"{label}: the latent explorer's place does not say what it is"
    requested = [u for u in performance_requests(driver) if not u.startswith(("file:", "data:", "blob:", "about:"))]
    # the network really is off, and a request the page makes would have been seen above
    probe = "https://example.org/tdro-offline-probe"
    outcome = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0], {mode: 'no-cors'}).then(() => done('reached'), e => done('failed: ' + e));", probe)
    assert outcome.startswith("failed"), f"{label}: the network is not disabled ({probe}: {outcome})"
    assert probe in performance_requests(driver), "the browser's request log does not show the page's requests"
    driver.close()
    driver.switch_to.window(driver.window_handles[0])
    return requested


def remote_resources(html: str) -> list[str]:
    """Scripts, stylesheets, images and fonts an HTML page loads from the network (links to click do not count)."""
    tags = re.findall(r"<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*[\"']((?:https?:)?//[^\"']+)",
                      html, flags=re.I)
    imports = re.findall(r"@import\s+(?:url\()?[\"']?((?:https?:)?//[^\"')]+)", html, flags=re.I)
    urls = re.findall(r"url\([\"']?((?:https?:)?//[^\"')]+)", html, flags=re.I)
    return sorted(set(tags + imports + urls))


# ------------------------------------------------------------------------------------------------ the test
def test_train_notebook_in_jupyterlab_and_its_report_offline(tmp_path):
    from selenium.webdriver.common.keys import Keys

    project = tmp_path / "project"
    project.mkdir()
    notebook = project_copy(project)
    # the deadline covers what runs inside; starting (with its own limits) and stopping stay outside it,
    # so that running out of time never interrupts the cleanup
    with jupyterlab(project, tmp_path / "jupyter") as (base, token, server, server_log, started), \
            chromium(tmp_path / "chromium-profile") as driver, overall_timeout(TEST_TIMEOUT_S):
        try:
            specs = api(base, token, "/api/kernelspecs")["kernelspecs"]
            assert "tdro" in specs, f"JupyterLab finds no kernel tdro (make install registers it): {sorted(specs)}"

            # --- open train.ipynb in the lab UI; its kernel tdro starts
            driver.get(f"{base}/lab/tree/notebooks/train.ipynb?token={token}")
            n_code = sum(c.cell_type == "code" for c in nbformat.read(notebook, as_version=4).cells)
            wait_for(lambda: len(code_prompts(driver)) == n_code, LAB_LOAD_S, "the notebook to open in JupyterLab")

            def kernel_idle():
                dialogs = css(driver, ".jp-Dialog")
                if dialogs:
                    raise Fatal(f"JupyterLab asks, instead of starting the notebook's kernel: {dialogs[0].text}")
                sessions = api(base, token, "/api/sessions")
                return (len(sessions) == 1 and sessions[0]["kernel"]["execution_state"] == "idle"
                        and kernel_status(driver) == "idle" and sessions)

            sessions = wait_for(kernel_idle, LAB_LOAD_S, "the notebook's kernel to start (status idle)")
            assert sessions[0]["kernel"]["name"] == "tdro", f"the notebook runs on {sessions[0]['kernel']['name']}"
            started.update(descendants(server.pid))

            # --- Run All, then wait until every code cell ran and the kernel is idle again
            click_menu(driver, "Run", "Run All Cells")
            wait_for(lambda: any(p != "[ ]:" for p in code_prompts(driver)), WIDGET_S, "Run All to start")

            def finished():
                prompts = code_prompts(driver)
                if kernel_status(driver) != "idle" or "[*]:" in prompts:
                    return False
                if all(re.fullmatch(r"\[\d+\]:", p) for p in prompts):
                    return True
                # idle with cells left unrun: a cell failed and JupyterLab dropped the rest of Run All
                stderr = [e.text for e in css(driver, ".jp-NotebookPanel .jp-OutputArea-output"
                                                      "[data-mime-type='application/vnd.jupyter.stderr']")]
                raise Fatal(f"Run All stopped with cells unrun (prompts {prompts}):\n" + "\n".join(stderr)[-3000:])

            try:
                wait_for(finished, RUN_ALL_S, "Run All to finish (every code cell numbered, kernel idle)", interval=1)
            except AssertionError as err:
                raise AssertionError(f"{err}; prompts: {code_prompts(driver)}; "
                                     f"kernel: {kernel_status(driver)}") from None
            assert len(code_prompts(driver)) == n_code

            # --- save it from the File menu and read what ran
            mtime = notebook.stat().st_mtime_ns
            click_menu(driver, "File", "Save Notebook")
            wait_for(lambda: notebook.stat().st_mtime_ns != mtime and all(  # saved, with what ran
                     c.get("execution_count") for c in json.loads(notebook.read_text())["cells"]
                     if c["cell_type"] == "code"), WIDGET_S, "the notebook to be saved")
            ran = nbformat.read(notebook, as_version=4)
            errors = [o for c in ran.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
            assert not errors, f"a cell failed in JupyterLab: {errors[0].ename}: {errors[0].evalue}"
            assert all(c.execution_count for c in ran.cells if c.cell_type == "code")

            # --- (a) the run went to the project's outputs/runs, not notebooks/outputs/runs
            runs = sorted(p.parent for p in (project / "outputs" / "runs").glob("*/summary.json"))
            stray = sorted(p.parent for p in (project / "notebooks").rglob("summary.json"))
            printed = "".join(o.get("text", "") for c in ran.cells for o in c.get("outputs", [])
                              if o.output_type == "stream")
            assert not stray, (f"Run All in JupyterLab wrote its run into notebooks/: {stray} "
                               "(relative paths must resolve against the project root)")
            assert len(runs) == 1, (f"expected one run under {project / 'outputs' / 'runs'}, found {runs}; "
                                    f"output:\n{printed[-2000:]}")
            run_dir = runs[0]
            assert (f"run directory: {run_dir}" in printed
                    or f"run directory: {run_dir.relative_to(project)}" in printed), printed
            assert len((run_dir / "history.jsonl").read_text().splitlines()) == 2  # the edited parameters took effect

            # --- (b) the latent explorer responds: its slider steps to the other epoch and the kernel redraws
            slider = wait_for(lambda: next(iter(css(driver, ".jp-NotebookPanel .widget-play")), None), WIDGET_S,
                              "the latent explorer (play button and slider)")
            explorer = slider.find_element("xpath", "./ancestor::div[contains(@class, 'jp-OutputArea-output')][1]")
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", explorer)
            readout = css(driver, ".widget-readout", explorer)[0]
            image = wait_for(lambda: next((i for i in css(driver, "img", explorer) if i.get_attribute("src")), None),
                             WIDGET_S, "the latent explorer's image")
            before_epoch, before_src = readout.text.strip(), image.get_attribute("src")
            assert before_epoch in {"1", "2"}, f"the explorer shows epoch {before_epoch!r}"
            handle = css(driver, ".noUi-handle", explorer)[0]
            handle.click()
            handle.send_keys(Keys.ARROW_RIGHT if before_epoch == "1" else Keys.ARROW_LEFT)
            wait_for(lambda: readout.text.strip() not in ("", before_epoch), WIDGET_S,
                     "the explorer's slider to show the other epoch")
            wait_for(lambda: image.get_attribute("src") != before_src, WIDGET_S,
                     "the kernel to redraw the explorer's image for the other epoch")
            assert readout.text.strip() == ("2" if before_epoch == "1" else "1")

            # --- (c) the exported HTML reads with the network disabled
            report = run_dir / "jupyterlab.ipynb"
            shutil.copy2(notebook, report)
            exports = {}
            env = {**jupyter_env(tmp_path / "jupyter"), "MPLBACKEND": "agg"}
            result = subprocess.run([sys.executable, "-m", "tdro", "report", str(report)], cwd=project, env=env,
                                    capture_output=True, text=True, timeout=90)
            assert result.returncode == 0, f"python -m tdro report failed:\n{result.stdout}{result.stderr}"
            exports["tdro report"] = report.with_suffix(".html")
            result = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", str(report),
                                     "--output", "nbconvert"], cwd=project, env=env, capture_output=True, text=True,
                                    timeout=90)
            assert result.returncode == 0, f"jupyter nbconvert failed:\n{result.stdout}{result.stderr}"
            exports["jupyter nbconvert"] = run_dir / "nbconvert.html"
            for label, html in exports.items():
                assert html.is_file(), f"{label} wrote no {html}"
                requested = check_offline_html(driver, html, label)
                if label == "tdro report":
                    assert not requested, f"{label}: the page asks the network for {requested}"
                    remote = remote_resources(html.read_text(encoding="utf-8"))
                    assert not remote, f"{label}: the page loads {remote}"
        except BaseException:
            with contextlib.suppress(Exception):  # what the page showed, for the failure report
                driver.save_screenshot(str(tmp_path / "failure.png"))
                (tmp_path / "failure.html").write_text(driver.page_source)
                print(f"JupyterLab browser test failed: screenshot {tmp_path / 'failure.png'}, "
                      f"server log {server_log}:\n{server_log.read_text()[-3000:]}")
            raise
