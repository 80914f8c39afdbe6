"""prefect.yaml: every entrypoint imports, and each deployment's run form is self-explanatory and valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema, parameter_schema_from_entrypoint
from prefect.utilities.schema_tools import validate

REPO_ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDERS = {
    "{{ $STEMWORKS_CATALOG }}": "/srv/stemworks/catalog.duckdb",
    "{{ $STEMWORKS_OUT }}": "s3://stems/out",
    "{{ $STEMWORKS_LIBRARY_ROOT }}": "/srv/music",
    "{{ $STEMWORKS_CODE_DIR }}": "/opt/stemworks",
}


def prefect_yaml() -> dict:
    return yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())


def resolved(value):
    """Deployment parameters with the deploy-time `{{ $ENV }}` placeholders filled in."""
    if isinstance(value, dict):
        return {k: resolved(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolved(v) for v in value]
    return PLACEHOLDERS.get(value, value) if isinstance(value, str) else value


DEPLOYMENTS = {d["name"]: d for d in prefect_yaml()["deployments"]}
# Each flow's name and its one required parameter (a list of locations, at least one).
FLOWS = {
    "flows/library.py:separate_library": ("separate-library", "sources"),
    "flows/evaluate.py:evaluate": ("evaluate", "datasets"),
    "flows/clean.py:clean_up": ("clean", None),  # housekeeping: every parameter has a default
}


def test_deployments_pools_and_nightly_guard() -> None:
    assert {name: d["work_pool"]["name"] for name, d in DEPLOYMENTS.items()} == {
        "adhoc": "cpu",
        "adhoc-gpu": "gpu",
        "nightly": "gpu",
        "evaluate": "cpu",
        "clean": "cpu",
    }
    assert DEPLOYMENTS["clean"]["schedules"][0]["cron"] == "0 5 * * *"
    nightly = DEPLOYMENTS["nightly"]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert DEPLOYMENTS["adhoc-gpu"]["parameters"]["separation"]["device"] == "cuda"
    assert prefect_yaml()["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $STEMWORKS_CODE_DIR }}"}}
    ]


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_entrypoint_imports_and_its_form_is_described(name: str) -> None:
    deployment = DEPLOYMENTS[name]
    flow = load_flow_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"]))
    flow_name, required = FLOWS[deployment["entrypoint"]]
    assert flow.name == flow_name
    schema = parameter_schema(flow).model_dump_for_openapi()
    # What `prefect deploy` sends is built from the source; it must agree with the imported flow.
    from_source = parameter_schema_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"])).model_dump_for_openapi()
    assert from_source["properties"].keys() == schema["properties"].keys()
    for prop in schema["properties"].values():
        assert prop.get("title") and prop.get("description"), prop
    if required is None:
        assert not schema.get("required")
        return
    assert schema["required"] == [required] and schema["properties"][required]["minItems"] == 1
    for model in ("SeparationSettings", "OutputSettings", "Limits"):
        for field, prop in schema["definitions"][model]["properties"].items():
            assert prop.get("title"), f"{model}.{field} has no title"
    settings = schema["definitions"]["SeparationSettings"]["properties"]
    output = schema["definitions"]["OutputSettings"]["properties"]
    assert settings["device"]["enum"] == ["auto", "cpu", "cuda"]
    assert output["format"]["enum"] == ["wav", "flac", "mp3"]
    assert output["bit_depth"]["enum"] == [16, 24, 32]
    assert "htdemucs" in settings["model"]["examples"]
    for field in ("model", "device", "shifts", "gpu_slot_limit", "model_repo"):
        assert settings[field].get("description"), field


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_deployment_parameters_satisfy_the_schema(name: str) -> None:
    deployment = DEPLOYMENTS[name]
    flow = load_flow_from_entrypoint(str(REPO_ROOT / deployment["entrypoint"]))
    schema = parameter_schema(flow).model_dump_for_openapi()
    required = FLOWS[deployment["entrypoint"]][1]
    parameters = {required: ["/srv/music/a.flac"], **resolved(deployment.get("parameters", {}))}
    if required is None:
        parameters = resolved(deployment.get("parameters", {}))
        validate(parameters, schema, raise_on_error=True, ignore_required=False)
        with pytest.raises(Exception, match="-1"):
            validate({**parameters, "retention": {"older_than_days": -1}}, schema, raise_on_error=True)
        return
    validate(parameters, schema, raise_on_error=True, ignore_required=False)
    bad = {**parameters, "output": {"format": "ogg"}}
    with pytest.raises(Exception, match="ogg"):
        validate(bad, schema, raise_on_error=True, ignore_required=False)
