"""The cluster manifests parse with Serve's own schema and point at an import path that builds."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _serve_configs():
    direct = yaml.safe_load((ROOT / "cluster" / "serve-config.yaml").read_text())
    rayservice = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return direct, embedded, rayservice


def test_serve_configs_validate_against_serve_schema_and_agree():
    from ray.serve.schema import ServeDeploySchema

    from tastemaker.app import GRPC_SERVICER_FUNCTIONS

    direct, embedded, _ = _serve_configs()
    for config in (direct, embedded):
        schema = ServeDeploySchema.model_validate(config)
        assert schema.grpc_options.port == 9000
        assert list(schema.grpc_options.grpc_servicer_functions) == GRPC_SERVICER_FUNCTIONS
        (app,) = schema.applications
        assert app.import_path == "tastemaker.app:app_builder"
    assert direct["applications"] == embedded["applications"]


def test_kuberay_ports_are_named_as_kuberay_expects():
    _, _, rayservice = _serve_configs()
    cluster = rayservice["spec"]["rayClusterConfig"]
    containers = [cluster["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]
    ]
    for container in containers:
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000 and ports["serve-grpc"] == 9000


def test_import_path_builds_the_application(tmp_path):
    from ray.serve import Application

    from tastemaker.app import app_builder

    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {tmp_path}\nprofiles:\n  num_shards: 3\n")
    assert isinstance(app_builder({"config": str(config)}), Application)
    try:
        app_builder({"bogus": 1})
    except ValueError as exc:
        assert "bogus" in str(exc)
    else:
        raise AssertionError("unknown args must be rejected")
