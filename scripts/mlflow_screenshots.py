"""Screenshots of what a reviewer sees in MLflow's own UI, for the README.

Starts `mlflow ui` on 127.0.0.1 over a project's store (mlflow.db; artifacts where its runs
say), then takes headless-Chromium screenshots (over the DevTools protocol) of
  - the champion's model version page (verdict line, gate table, headline tags),
  - the epsilon chart of every private fine-tuning run (epsilon against step),
  - the runs table in the headline view (model-training view, headline columns),
and stops the server. Needs a Chromium (`apt-get install chromium`; or CHROMIUM=/path).

    python scripts/mlflow_screenshots.py --project . --out docs/img
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from privtune.tracking import TELEMETRY_OFF, headline_url, project_experiment  # noqa: E402

REGISTERED_MODEL = "privtune-clinical-notes"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and (found := shutil.which(candidate)):
            return found
    raise SystemExit("no Chromium found: apt-get install chromium, or set CHROMIUM=/path")


API = "api/2.0/mlflow"  # the REST API's routes; other routes (an artifact's) are the UI's


class Ui:
    """`mlflow ui` on a free local port over a project's store; `get`/`post` a route of it
    (tests/test_pipeline.py reads the store through it as a browser would)."""

    def __init__(self, project: Path, log: Path) -> None:
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        env = os.environ | TELEMETRY_OFF
        mlflow = Path(sys.executable).parent / "mlflow"
        self._log = log.open("w")
        self.process = subprocess.Popen(
            [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}"]
            + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=project,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=2):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise SystemExit(f"mlflow ui did not start; see {log}") from None
                time.sleep(0.5)

    def get(self, route: str, **query: str) -> Any:
        url = f"{self.base}/{route}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.base}/{route}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


# Set before the UI's own scripts run: the model-training view, and MLflow 3's assistant panel
# closed (it opens itself on a first visit and would cover a third of every screenshot).
BROWSER_STATE = {
    "mlflow.workflowType_v1": json.dumps("machine_learning"),
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": json.dumps(True),
    "mlflow.assistant.panelOpen_v1": json.dumps(False),
}


class Browser:
    """Headless Chromium driven over the DevTools protocol (websockets comes with Prefect)."""

    def __init__(self) -> None:
        self._profile = tempfile.TemporaryDirectory()
        self.process = subprocess.Popen(
            [
                _chromium(),
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile.name}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # its singleton socket directory (org.chromium.Chromium.*) goes with the profile
            env={**os.environ, "TMPDIR": self._profile.name},
        )
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if line.startswith("DevTools listening on "):
                port = urllib.parse.urlparse(line.split()[-1]).port
                break
        else:
            raise SystemExit("Chromium exited before opening its DevTools port")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        from websockets.sync.client import connect

        self._ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self._id = 0
        self.call("Page.enable")
        state = "".join(
            f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});"
            for k, v in BROWSER_STATE.items()
        )
        self.call("Page.addScriptToEvaluateOnNewDocument", source=state)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=120))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def screenshot(
        self, url: str, out: Path, size: tuple[int, int], ready: str, timeout: float = 90
    ) -> Path:
        """Load `url` at `size`, wait until the JavaScript condition `ready` holds (the UI
        fetches its data after the page loads) and the page settles, then save a PNG."""
        width, height = size
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while True:
            done = self.call("Runtime.evaluate", expression=f"Boolean({ready})", returnByValue=True)
            if done.get("result", {}).get("value"):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"page not ready after {timeout:.0f} s: {url}")
            time.sleep(0.5)
        time.sleep(2.0)  # charts animate in
        shot = self.call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        return out

    def close(self) -> None:
        self._ws.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._profile.cleanup()


Page = tuple[str, tuple[int, int], str]  # url, window size, JavaScript "ready" condition


def pages(ui: Ui, name: str, version: str | None, experiment_name: str) -> dict[str, Page]:
    """The URLs to shoot, found through the REST API: the version (the champion unless given),
    the epsilon chart of every private fine-tuning run, the headline runs table."""
    experiment = ui.get(f"{API}/experiments/get-by-name", experiment_name=experiment_name)[
        "experiment"
    ]
    experiment_id = experiment["experiment_id"]
    if version is None:
        try:
            model = ui.get(f"{API}/registered-models/get", name=name)["registered_model"]
        except urllib.error.HTTPError as err:
            if err.code != 404:
                raise
            found = ui.get(f"{API}/registered-models/search").get("registered_models", [])
            known = ", ".join(sorted(m["name"] for m in found)) or "none"
            raise SystemExit(
                f"no registered model '{name}' in this store (it has: {known}); a profile's run "
                f"registers '{name}-<profile>': pass --name"
            ) from None
        aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
        version = aliases.get("champion") or aliases.get("challenger")
        if version is None:
            found = ui.get(f"{API}/model-versions/search", filter=f"name='{name}'")
            found = found["model_versions"]
            version = max(found, key=lambda v: int(v["version"]))["version"]
    runs = ui.post(
        f"{API}/runs/search",
        {"experiment_ids": [experiment_id], "filter": "tags.stage = 'finetune'"},
    )["runs"]
    private = sorted(
        r["info"]["run_id"]
        for r in runs
        if any(m["key"] == "epsilon" for m in r["data"].get("metrics", []))
    )
    quote = urllib.parse.quote
    metric = (
        f"{ui.base}/#/metric?runs={quote(json.dumps(private))}"
        f"&metric={quote(json.dumps('epsilon'))}&experiments={quote(json.dumps([experiment_id]))}"
        f"&plot_metric_keys={quote(json.dumps(['epsilon']))}&plot_layout={{}}&x_axis=step"
        "&y_axis_scale=linear&line_smoothness=1&show_point=true&deselected_curves=[]"
        "&last_linear_y_axis_range=[]"
    )
    text = "document.body.innerText.includes"
    return {
        "mlflow-model-version.png": (
            f"{ui.base}/#/models/{quote(name)}/versions/{version}",
            (1400, 1250),
            f"{text}('Privacy model card')",
        ),
        "mlflow-epsilon-chart.png": (
            metric,
            (1400, 760),
            "document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length > 0",
        ),
        "mlflow-runs-headline.png": (
            headline_url(experiment_id, ui.base),
            (1920, 620),  # the headline columns are wide enough for full-precision values
            # the grid's rows come a few seconds after its header, once the view's widths apply
            f"{text}('attack.audit_epsilon_lower_bound') && {text}('dpsgd') && "
            "document.querySelectorAll('.ag-row').length > 0",
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="holds mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--name", default=REGISTERED_MODEL, help="registered model")
    parser.add_argument("--version", help="model version to show (default: the champion)")
    parser.add_argument(
        "--pages",
        nargs="+",
        choices=["model-version", "epsilon-chart", "runs-headline"],
        help="only these (default: all)",
    )
    args = parser.parse_args(argv)
    project = args.project.resolve()
    if not (project / "mlflow.db").is_file():
        raise SystemExit(f"{project / 'mlflow.db'} not found: run the pipeline first")
    args.out.mkdir(parents=True, exist_ok=True)
    ui = Ui(project, args.out / ".mlflow-ui.log")
    browser = None
    try:
        browser = Browser()
        shots = pages(ui, args.name, args.version, project_experiment(project))
        for file, (url, size, ready) in shots.items():
            if args.pages and file.removeprefix("mlflow-").removesuffix(".png") not in args.pages:
                continue
            browser.screenshot(url, args.out / file, size, ready)
            print(f"{args.out / file}  <-  {url}")
    finally:
        if browser is not None:
            browser.close()
        ui.stop()
    (args.out / ".mlflow-ui.log").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
