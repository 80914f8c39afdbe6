"""Deployments for real: `prefect server` (SQLite, API auth on) on loopback, `deployments.setup`,
prefect.yaml applied, a process worker on pool `cpu`, runs triggered by REST, CLI, Python and the UI."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from tests.helpers.audiogen import audio_file
from tests.helpers.constants import MODEL_NAME
from tests.helpers.prefect_stack import REPO_ROOT, PrefectServer, start_server, start_worker, stop, tail, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server, pytest.mark.timeout(1800)]
AUTH = "stemworks:not-a-real-secret"
STEMS = {"drums", "bass", "other", "vocals"}
ARTIFACTS = REPO_ROOT / "test-artifacts"


@dataclass
class Stack:
    server: PrefectServer
    root: Path
    out: Path
    catalog: Path
    worker_log: Path
    model_repo: Path

    def separation(self, **extra) -> dict:
        return {"model": MODEL_NAME, "model_repo": str(self.model_repo), "device": "cpu", "shifts": 0, **extra}

    def explain(self) -> str:
        return f"worker log:\n{tail(self.worker_log)}\nserver log:\n{tail(self.server.log, 2000)}"


def setup_command(stack_root: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deployments.setup",
        "--out",
        str(stack_root / "stems"),
        "--catalog",
        str(stack_root / "catalog.duckdb"),
        "--library-root",
        str(stack_root / "library"),
        *extra,
    ]


def run_setup(server: PrefectServer, root: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        setup_command(root, *extra),
        env=server.client_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"setup failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_repo: Path):
    root = tmp_path_factory.mktemp("stack")
    server = start_server(root / "prefect", AUTH)
    worker = None
    try:
        run_setup(server, root, "--gpu-slots", "2")
        worker_log = root / "worker.log"
        worker = start_worker(server, "cpu", worker_log, STEMWORKS_WORK_DIR=str(root / "work"))
        yield Stack(
            server=server,
            root=root,
            out=root / "stems",
            catalog=root / "catalog.duckdb",
            worker_log=worker_log,
            model_repo=model_repo,
        )
    finally:
        if worker is not None:
            stop(worker)
        stop(server.process)


def trigger(stack: Stack, parameters: dict, key: str | None = None, deployment: str = "separate-library/adhoc"):
    """What README's curl example does: POST create_flow_run on the deployment."""
    body: dict = {"parameters": parameters}
    if key is not None:
        body["idempotency_key"] = key
    with stack.server.http() as api:
        return api.post(f"/deployments/{stack.server.deployment_id(deployment)}/create_flow_run", json=body)


def deployments_by_name(stack: Stack) -> dict[str, dict]:
    with stack.server.http() as api:
        response = api.post("/deployments/filter", json={})
        response.raise_for_status()
        return {d["name"]: d for d in response.json()}


def flow_runs_of(stack: Stack, deployment: str = "separate-library/adhoc") -> list[dict]:
    with stack.server.http() as api:
        response = api.post(
            "/flow_runs/filter",
            json={"flow_runs": {"deployment_id": {"any_": [stack.server.deployment_id(deployment)]}}},
        )
        response.raise_for_status()
        return response.json()


def catalog_rows(catalog: Path, sql: str, *params) -> list[tuple]:
    with duckdb.connect(str(catalog), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


@pytest.fixture(scope="module")
def api_run(stack: Stack) -> dict:
    library = stack.root / "api-library"
    audio_file(library, "one.wav", "wav", seconds=1.5, seed=1)
    audio_file(library / "sub", "two.flac", "flac", seconds=1.0, seed=2)
    (library / "broken.mp3").write_bytes(b"ID3 not really an mp3" * 40)
    response = trigger(stack, {"sources": [str(library)], "separation": stack.separation()}, key=uuid.uuid4().hex)
    assert response.status_code == 201, response.text
    run = stack.server.wait_terminal(response.json()["id"])
    return {"library": library, "run": run}


def test_setup_creates_pools_gpu_slots_and_deployments(stack: Stack) -> None:
    with stack.server.http() as api:
        pools = {p["name"]: p["type"] for p in api.post("/work_pools/filter", json={}).json()}
        limit = api.get("/v2/concurrency_limits/gpu-slots").json()
    assert pools == {"cpu": "process", "gpu": "process"}
    assert limit["limit"] == 2
    deployments = deployments_by_name(stack)
    assert {name: d["work_pool_name"] for name, d in deployments.items()} == {
        "adhoc": "cpu",
        "adhoc-gpu": "gpu",
        "nightly": "gpu",
        "evaluate": "cpu",
        "clean": "cpu",
    }
    nightly = deployments["nightly"]
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
    assert nightly["parameters"]["sources"] == [str(stack.root / "library")]
    assert deployments["adhoc-gpu"]["parameters"]["separation"]["device"] == "cuda"
    for deployment in deployments.values():
        assert deployment["enforce_parameter_schema"] is True
        assert deployment["parameters"]["catalog"] == str(stack.catalog)
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO_ROOT)}}
        ]


def test_setup_runs_again_without_duplicating_anything(stack: Stack) -> None:
    before = {name: d["id"] for name, d in deployments_by_name(stack).items()}
    again = run_setup(stack.server, stack.root, "--gpu-slots", "2")
    assert "work pool cpu: exists" in again.stdout and "work pool gpu: exists" in again.stdout
    after = {name: d["id"] for name, d in deployments_by_name(stack).items()}
    assert after == before


def test_api_without_credentials_gets_401(stack: Stack) -> None:
    with stack.server.http(authenticated=False) as anonymous:
        refused = anonymous.post("/deployments/filter", json={})
        wrong = anonymous.post("/deployments/filter", json={}, auth=("stemworks", "guess"))
    assert refused.status_code == 401, refused.text
    assert wrong.status_code == 401, wrong.text
    with stack.server.http() as api:
        assert api.post("/deployments/filter", json={}).status_code == 200


def test_api_run_by_authenticated_worker_publishes_stems_and_records_catalog(stack: Stack, api_run: dict) -> None:
    run, library = api_run["run"], api_run["library"]
    # One broken track: not a clean success, and the state says how many failed (the good ones are published).
    assert (run["state"]["type"], run["state"]["name"]) == ("FAILED", "TracksFailed"), stack.explain()
    assert run["state"]["message"].startswith("1 of 3 tracks failed (2 succeeded, 0 skipped, 1 failed)")
    manifests = sorted(stack.out.rglob("manifest.json"))
    assert len(manifests) == 2
    for manifest in manifests:
        assert {p.stem for p in manifest.parent.glob("*.wav")} == STEMS
    ((run_id, status, total, ok, failed),) = catalog_rows(
        stack.catalog,
        "SELECT run_id, status, tracks_total, tracks_succeeded, tracks_failed FROM runs WHERE flow_run_id = ?",
        run["id"],
    )
    assert (status, total, ok, failed) == ("failed", 3, 2, 1)
    tracks = dict(catalog_rows(stack.catalog, "SELECT source, status FROM tracks WHERE run_id = ?", run_id))
    assert tracks == {
        str(library / "one.wav"): "succeeded",
        str(library / "sub" / "two.flac"): "succeeded",
        str(library / "broken.mp3"): "failed",
    }
    stems = catalog_rows(stack.catalog, "SELECT count(*) FROM stems WHERE run_id = ?", run_id)
    assert stems == [(8,)]


def test_api_run_leaves_progress_and_track_table_artifacts(stack: Stack, api_run: dict) -> None:
    artifacts = {a["type"]: a for a in stack.server.artifacts(api_run["run"]["id"])}
    assert artifacts["progress"]["data"] == 100
    table = json.loads(artifacts["table"]["data"])
    by_source = {Path(row["source"]).name: row for row in table}
    assert by_source["one.wav"]["status"] == "succeeded"
    assert set(by_source["two.flac"]["stems"].split(", ")) == STEMS
    assert by_source["broken.mp3"]["status"] == "failed" and by_source["broken.mp3"]["error"]
    assert "2 separated, 0 skipped (unchanged), 1 failed" in artifacts["table"]["description"]


@pytest.mark.parametrize(
    "parameters, field",
    [
        ({"sources": []}, "sources"),
        ({"sources": ["x.wav"], "separation": {"device": "tpu"}}, "device"),
        ({"sources": ["x.wav"], "output": {"format": "ogg"}}, "format"),
        ({"sources": ["x.wav"], "separation": {"shifts": "many"}}, "shifts"),
        ({}, "sources"),
        # a combination: flac stores 16 or 24 bits (OutputSettings' JSON-schema rule)
        ({"sources": ["x.wav"], "output": {"format": "flac", "bit_depth": 32}}, "output.bit_depth"),
    ],
)
def test_invalid_parameters_are_rejected_before_a_run_exists(stack: Stack, parameters: dict, field: str) -> None:
    before = len(flow_runs_of(stack))
    response = trigger(stack, parameters)
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert detail.startswith("Error creating flow run: Validation failed") and field in detail, detail
    assert len(flow_runs_of(stack)) == before


def test_one_idempotency_key_starts_one_flow_run(stack: Stack) -> None:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    before = len(flow_runs_of(stack))
    key = f"nightly-import-{uuid.uuid4().hex}"
    parameters = {"sources": [str(stack.root / "nothing-here")], "separation": stack.separation()}
    first, second = trigger(stack, parameters, key=key), trigger(stack, parameters, key=key)
    assert first.status_code == 201 and second.status_code in (200, 201), second.text
    with temporary_settings({PREFECT_API_URL: stack.server.url, PREFECT_API_AUTH_STRING: stack.server.auth}):
        third = run_deployment("separate-library/adhoc", parameters=parameters, idempotency_key=key, timeout=0)
    assert first.json()["id"] == second.json()["id"] == str(third.id)
    assert len(flow_runs_of(stack)) == before + 1
    stack.server.wait_terminal(first.json()["id"])


def test_cli_trigger_skips_tracks_already_published(stack: Stack, api_run: dict) -> None:
    command = [
        sys.executable,
        "-m",
        "prefect",
        "deployment",
        "run",
        "separate-library/adhoc",
        "--param",
        f"sources={json.dumps([str(api_run['library'] / 'one.wav')])}",
        "--param",
        f"separation={json.dumps(stack.separation())}",
        "--watch",
        "--watch-timeout",
        "600",
    ]
    done = subprocess.run(
        command, env=stack.server.client_env(), cwd=REPO_ROOT, capture_output=True, check=False, text=True, timeout=700
    )
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}\n{stack.explain()}"
    assert "Completed" in done.stdout
    newest = catalog_rows(
        stack.catalog, "SELECT status, tracks_total, tracks_skipped FROM runs ORDER BY started_at DESC LIMIT 1"
    )
    assert newest == [("completed", 1, 1)]  # every track fine (here: skipped): a clean Completed run


def test_nightly_schedule_puts_runs_on_the_calendar(stack: Stack) -> None:
    scheduled = wait_for(
        lambda: [r for r in flow_runs_of(stack, "separate-library/nightly") if r["state"]["type"] == "SCHEDULED"],
        240,
        "nightly runs to be scheduled",
        3,
    )
    times = sorted(r["expected_start_time"] for r in scheduled)
    assert all("T02:00:00" in t for t in times), times
    assert all(r["parameters"]["sources"] == [str(stack.root / "library")] for r in scheduled)


@pytest.mark.ui
def test_ui_run_form_starts_a_run_with_custom_parameters(stack: Stack) -> None:
    from tests.helpers.ui_driver import field, open_browser, screenshot, system_browser, type_into

    found = system_browser()
    if found is None:
        pytest.skip("no system chromium + chromedriver (Debian: apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    library = stack.root / "ui-library"
    audio_file(library, "from the ui.wav", "wav", seconds=1.0, seed=7)
    out = stack.root / "ui-stems"
    session = open_browser(*found)
    try:
        session.get(f"{stack.server.ui}/deployments")
        # The server wants the auth string: the UI asks for it on its login page.
        session.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(stack.server.auth)
        session.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        session.find_element(By.XPATH, "//a[normalize-space()='adhoc']").click()
        WebDriverWait(session, 60).until(lambda s: "/deployments/deployment/" in s.current_url)
        session.get(session.current_url.split("?")[0].rstrip("/") + "/run")
        field(session, "sources").find_element(By.CSS_SELECTOR, "button.p-draggable-list__create-button").click()
        type_into(field(session, "sources").find_element(By.CSS_SELECTOR, "textarea"), str(library))
        type_into(field(session, "Model (Optional)").find_element(By.CSS_SELECTOR, "textarea"), MODEL_NAME)
        repo_label = "Local model repository (Optional)"
        field(session, repo_label).find_element(By.XPATH, ".//button[normalize-space()='str']").click()
        # Choosing "str" re-renders the property: look it up again once its text box exists.
        repo_box = WebDriverWait(session, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
            lambda s: field(s, repo_label).find_element(By.CSS_SELECTOR, "textarea")
        )
        type_into(repo_box, str(stack.model_repo))
        type_into(field(session, "Shifts (Optional)").find_element(By.CSS_SELECTOR, "input"), "0")
        type_into(field(session, "Output location (Optional)").find_element(By.CSS_SELECTOR, "textarea"), str(out))
        Select(field(session, "Format (Optional)").find_element(By.CSS_SELECTOR, "select")).select_by_visible_text(
            "flac"
        )
        screenshot(session, ARTIFACTS / "ui-run-form.png")
        before = {r["id"] for r in flow_runs_of(stack)}
        submit = "//button[@type='submit' and normalize-space()='Submit']"
        # Submitting returns to the deployment page, which lists the new run; the API says which it is. On a
        # loaded 2-core machine the SQLite-backed server can answer a UI call with 503 ("Oops. Something went
        # wrong." in the UI): as a user would, submit the unchanged form again while it is still there.
        created: set[str] = set()
        for _attempt in range(3):
            session.find_element(By.XPATH, submit).click()
            try:
                created = wait_for(
                    lambda: {r["id"] for r in flow_runs_of(stack)} - before, 60, "the UI's flow run to be created"
                )
                break
            except TimeoutError:
                screenshot(session, ARTIFACTS / "ui-submit-failed.png")
                if not session.find_elements(By.XPATH, submit):
                    break
        if not created:
            raise AssertionError(
                f"the form did not start a run:\n{session.find_element(By.TAG_NAME, 'body').text[-3000:]}"
            )
        (flow_run_id,) = created
        run = stack.server.wait_terminal(flow_run_id)
        assert run["state"]["type"] == "COMPLETED", stack.explain()
        session.get(f"{stack.server.ui}/runs/flow-run/{flow_run_id}")
        WebDriverWait(session, 60).until(lambda s: "Completed" in s.find_element(By.TAG_NAME, "body").text)
        screenshot(session, ARTIFACTS / "ui-run-completed.png")
        session.find_element(By.XPATH, "//*[text()[normalize-space()='Artifacts']]").click()
        WebDriverWait(session, 60).until(
            lambda s: "separate-library-tracks" in s.find_element(By.TAG_NAME, "body").text
        )
        screenshot(session, ARTIFACTS / "ui-run-artifacts.png")
    finally:
        session.quit()
    assert run["parameters"]["output"]["format"] == "flac"
    assert run["parameters"]["separation"]["model"] == MODEL_NAME
    (manifest,) = out.rglob("manifest.json")
    assert {p.stem for p in manifest.parent.glob("*.flac")} == STEMS


def test_two_nightly_runs_never_overlap(stack: Stack) -> None:
    """The deployment's concurrency limit (1, CANCEL_NEW): a second nightly run while one is going is cancelled."""
    library = stack.root / "nightly-library"
    audio_file(library, "night.wav", "wav", seconds=1.0, seed=11)
    # No GPU here: run the nightly deployment's runs on CPU through a worker of its pool `gpu`.
    parameters = {"sources": [str(library)], "separation": stack.separation()}
    gpu_worker = start_worker(
        stack.server, "gpu", stack.root / "gpu-worker.log", STEMWORKS_WORK_DIR=str(stack.root / "gpu-work")
    )
    try:
        runs = [trigger(stack, parameters, deployment="separate-library/nightly") for _ in range(2)]
        assert all(r.status_code == 201 for r in runs), [r.text for r in runs]
        finished = sorted(
            (stack.server.wait_terminal(r.json()["id"])["state"] for r in runs), key=lambda state: state["type"]
        )
    finally:
        stop(gpu_worker)
    assert [s["type"] for s in finished] == ["CANCELLED", "COMPLETED"], (
        f"{finished}\n{tail(stack.root / 'gpu-worker.log')}"
    )
    assert finished[0]["message"] == "Deployment concurrency limit reached."
