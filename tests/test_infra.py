"""infra/: the container image, the KubeRay manifests, the scheduled refresh and the cluster-launcher config.

Nothing here needs Kubernetes, Docker or AWS: every manifest is parsed and checked for the fields its controller
needs, cross-checked against the repository (Ray version, pinned packages, paths, config fields), and every command
a manifest runs is run here for real, on the tiny model, with the job config's locations pointed at temp folders.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from vqbatch.config import JobConfig, load_job_config

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "Dockerfile"
REQUIREMENTS = INFRA / "requirements.txt"
JOB_CONFIG = INFRA / "job.yaml"
LAUNCHER_CONFIG = INFRA / "cluster-aws.yaml"
OPERATIONS_GUIDE = REPO / "docs" / "operations.md"
CONFIG_IN_POD = "/config/job.yaml"  # where the manifests mount the ConfigMap made from infra/job.yaml
JOB_CONFIG_MAP = "vqbatch-job"

API_VERSIONS = {
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "CronJob": "batch/v1",
    "ConfigMap": "v1",
    "ServiceAccount": "v1",
    "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
}


# ---------------------------------------------------------------------------------------------------------------
# Reading infra/
# ---------------------------------------------------------------------------------------------------------------

def yaml_files() -> list[Path]:
    return sorted(INFRA.rglob("*.yaml"))


def kubernetes_documents() -> list[tuple[str, dict]]:
    """(where, document) for every Kubernetes object in infra/k8s, and every manifest held in a ConfigMap."""
    documents = []
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            where = f"{path.relative_to(REPO)}#{index}"
            documents.append((where, document))
            documents += manifests_in_config_map(where, document)
    return documents


def manifests_in_config_map(where: str, document: dict) -> list[tuple[str, dict]]:
    if document.get("kind") != "ConfigMap":
        return []
    return [(f"{where}:{key}", yaml.safe_load(text)) for key, text in document.get("data", {}).items()
            if key.endswith(".yaml") and "apiVersion:" in text]


def of_kind(kind: str) -> list[tuple[str, dict]]:
    return [(where, document) for where, document in kubernetes_documents() if document["kind"] == kind]


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """The RayCluster specs: standing clusters and the ones RayJobs create for themselves."""
    specs = [(where, document["spec"]) for where, document in of_kind("RayCluster")]
    specs += [(where, document["spec"]["rayClusterSpec"]) for where, document in of_kind("RayJob")
              if "rayClusterSpec" in document["spec"]]
    return specs


def entrypoints() -> list[tuple[str, str]]:
    """(where, command) for every command a RayJob in infra/ runs."""
    return [(where, document["spec"]["entrypoint"]) for where, document in of_kind("RayJob")]


def pod_specs() -> list[tuple[str, dict]]:
    specs = []
    for where, cluster in ray_cluster_specs():
        specs.append((f"{where} head", cluster["headGroupSpec"]["template"]["spec"]))
        specs += [(f"{where} {group['groupName']}", group["template"]["spec"]) for group in cluster["workerGroupSpecs"]]
    for where, cron in of_kind("CronJob"):
        specs.append((where, cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


def pinned_requirements() -> dict[str, str]:
    """{normalised package name: version} from infra/requirements.txt; every line must be `name[extras]==version`."""
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[a-z,]+\])?==([0-9][0-9A-Za-z.+]*)", line)
            assert match, f"{REQUIREMENTS.name}: {line!r} is not pinned as name==version"
            pins[normalise(match.group(1))] = match.group(3)
    return pins


def normalise(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else ""


def ray_version_of_image(image: str) -> str:
    return image_tag(image).split("-", 1)[0]


# ---------------------------------------------------------------------------------------------------------------
# Every file parses and has the shape its tool needs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", yaml_files(), ids=lambda path: str(path.relative_to(INFRA)))
def test_every_yaml_file_parses_into_mappings(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(document, dict) for document in documents), path


def test_manifests_name_their_kind_api_version_and_name():
    documents = kubernetes_documents()
    kinds = {document["kind"] for _, document in documents}
    assert {"RayCluster", "RayJob", "CronJob"} <= kinds, kinds
    for where, document in documents:
        assert document["apiVersion"] == API_VERSIONS[document["kind"]], where
        metadata = document["metadata"]
        assert metadata.get("name") or metadata.get("generateName"), where


def test_ray_clusters_have_a_head_and_a_gpu_worker_group():
    specs = ray_cluster_specs()
    assert len(specs) >= 2, "a standing RayCluster and a RayJob with its own cluster"
    for where, cluster in specs:
        assert cluster["headGroupSpec"]["template"]["spec"]["containers"], where
        gpu_groups = [group for group in cluster["workerGroupSpecs"] if gpus_per_pod(group) >= 1]
        assert gpu_groups, f"{where}: no worker group asks for nvidia.com/gpu"
        for group in gpu_groups:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
            assert group["maxReplicas"] >= 1, where


def gpus_per_pod(group: dict) -> int:
    containers = group["template"]["spec"]["containers"]
    return sum(int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for container in containers)


def test_the_job_driver_sees_the_config_map_at_the_path_the_commands_read():
    for where, cluster in ray_cluster_specs():
        head = cluster["headGroupSpec"]["template"]["spec"]
        config_volumes = {volume["name"] for volume in head["volumes"]
                          if volume.get("configMap", {}).get("name") == JOB_CONFIG_MAP}
        mounts = [mount["mountPath"] for container in head["containers"] for mount in container.get("volumeMounts", [])
                  if mount["name"] in config_volumes]
        assert str(Path(CONFIG_IN_POD).parent) in mounts, where


def test_ray_jobs_run_a_command_on_a_cluster_defined_here():
    clusters = {document["metadata"]["name"] for _, document in of_kind("RayCluster")}
    jobs = of_kind("RayJob")
    assert jobs
    for where, job in jobs:
        spec = job["spec"]
        assert spec["entrypoint"].strip(), where
        assert CONFIG_IN_POD in shlex.split(spec["entrypoint"]), where
        if "rayClusterSpec" in spec:
            assert spec["shutdownAfterJobFinishes"] is True, f"{where}: its own cluster must go away after the job"
        else:
            assert spec["clusterSelector"]["ray.io/cluster"] in clusters, where


def test_the_scheduled_refresh_never_overlaps_and_creates_a_refresh_rayjob():
    (where, cron), = of_kind("CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid", where
    assert len(spec["schedule"].split()) == 5, spec["schedule"]
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    template_maps = {volume["configMap"]["name"] for volume in pod["volumes"] if "configMap" in volume}
    created = [document for map_where, config_map in of_kind("ConfigMap")
               if config_map["metadata"]["name"] in template_maps
               for _, document in manifests_in_config_map(map_where, config_map)]
    assert [document["kind"] for document in created] == ["RayJob"], created
    assert shlex.split(created[0]["spec"]["entrypoint"])[:2] == ["vqbatch", "refresh"]
    script = " ".join(pod["containers"][0]["command"] + pod["containers"][0]["args"])
    assert "kubectl create -f" in script and "SUCCEEDED" in script, "the pod creates the RayJob and waits for it"
    assert can_create_rayjobs(pod["serviceAccountName"]), pod["serviceAccountName"]


def can_create_rayjobs(service_account: str) -> bool:
    roles = {role["metadata"]["name"]: role for _, role in of_kind("Role")}
    for _, binding in of_kind("RoleBinding"):
        if any(subject["name"] == service_account for subject in binding["subjects"]):
            for rule in roles[binding["roleRef"]["name"]]["rules"]:
                if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"] and "create" in rule["verbs"]:
                    return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# Pinned versions, one Ray everywhere, vqbatch installed from this repository
# ---------------------------------------------------------------------------------------------------------------

def test_every_image_is_pinned_and_no_tag_is_latest():
    bases = [arguments.split()[0] for instruction, arguments in dockerfile_instructions() if instruction == "FROM"]
    images = bases + [yaml.safe_load(LAUNCHER_CONFIG.read_text())["docker"]["image"]]
    images += [container["image"] for _, pod in pod_specs() for container in pod["containers"]]
    assert len(images) >= 4
    for image in images:
        tag = image_tag(image)
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{image} is not pinned to a version"


def test_one_ray_version_in_the_image_the_manifests_and_the_pins():
    (base,) = [arguments.split()[0] for instruction, arguments in dockerfile_instructions() if instruction == "FROM"]
    ray_version = ray_version_of_image(base)
    assert pinned_requirements()["ray"] == ray_version
    assert ray_version_of_image(yaml.safe_load(LAUNCHER_CONFIG.read_text())["docker"]["image"]) == ray_version
    for where, cluster in ray_cluster_specs():
        assert cluster["rayVersion"] == ray_version, where


def test_requirements_pin_every_runtime_dependency_of_the_package():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {normalise(re.match(r"[A-Za-z0-9_.-]+", dependency).group()) for dependency in dependencies}
    missing = names - set(pinned_requirements())
    assert not missing, f"{REQUIREMENTS.name} pins no version of {sorted(missing)}"


def test_the_dockerfile_installs_the_pins_then_vqbatch_from_the_repository():
    instructions = dockerfile_instructions()
    runs = [arguments for instruction, arguments in instructions if instruction == "RUN"]
    assert any(f"pip install -r {REQUIREMENTS.relative_to(REPO)}" in run for run in runs), runs
    assert any(re.search(r"pip install (--no-deps )?\.(\s|$)", run) for run in runs), runs
    copied = [arguments.split()[:-1] for instruction, arguments in instructions if instruction == "COPY"]
    sources = [source for arguments in copied for source in arguments if not source.startswith("--")]
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
    assert "jobs" in sources, "the RayJob entrypoint runs jobs/generate.py from the image's repository copy"


def test_the_cluster_launcher_config_is_valid_for_this_ray_and_has_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER_CONFIG.read_text())
    validate_config(prepare_config(config))
    worker_types = [node for name, node in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(node["resources"].get("GPU", 0) >= 1 for node in worker_types), worker_types
    (remote, local), = config["file_mounts"].items()
    assert (REPO / local).resolve() == REPO, "the repository is what file_mounts copies to the nodes"
    assert any(f"pip install -q --no-deps {remote}" in command for command in config["setup_commands"])


def test_cluster_nodes_keep_small_task_results_out_of_the_drivers_heap_as_a_local_ray_does():
    from vqbatch.engine import LOCAL_RAY_SYSTEM_CONFIG

    (name, value), = LOCAL_RAY_SYSTEM_CONFIG.items()
    setting = f"RAY_{name}={value}"
    environment = " ".join(arguments for instruction, arguments in dockerfile_instructions() if instruction == "ENV")
    assert setting in environment.split(), f"infra/Dockerfile should set {setting}"
    run_options = yaml.safe_load(LAUNCHER_CONFIG.read_text())["docker"]["run_options"]
    assert f"--env {setting}" in run_options, f"infra/cluster-aws.yaml should pass --env {setting} to docker"


# ---------------------------------------------------------------------------------------------------------------
# The job config and the commands the manifests run
# ---------------------------------------------------------------------------------------------------------------

def test_the_example_job_config_is_a_job_config_with_every_field():
    config = load_job_config(JOB_CONFIG)
    written = yaml.safe_load(JOB_CONFIG.read_text())
    assert set(written) == set(JobConfig.model_fields)
    for section, value in config:
        unset = set(type(value).model_fields) - set(written[section])
        if section != "s3":  # unset s3 fields fall back to the AWS environment variables on purpose
            assert not unset, f"infra/job.yaml leaves {section}.{sorted(unset)} to defaults; write them out"


def guide_commands() -> list[list[str]]:
    """Every vqbatch or jobs/ command in the guide's bash blocks, as argv; `ray job submit ... -- CMD` gives CMD."""
    blocks = re.findall(r"```bash\n(.*?)```", OPERATIONS_GUIDE.read_text(), re.S)
    commands = []
    for line in (line for block in blocks for line in block.splitlines()):
        argv = shlex.split(line, comments=True)
        argv = argv[argv.index("--") + 1:] if "--" in argv else argv
        if argv and (argv[0] == "vqbatch" or argv[:2] == ["python", "jobs/generate.py"]):
            commands.append(argv)
    return commands


def test_the_guide_runs_real_commands_with_real_flags():
    from vqbatch.cli import build_parser

    commands = guide_commands()
    assert {"generate", "refresh", "rerun", "verify"} <= {argv[1] for argv in commands if argv[0] == "vqbatch"}
    for argv in commands:
        arguments = ["generate", *argv[2:]] if argv[0] == "python" else argv[1:]  # jobs/generate.py is `generate`
        try:
            build_parser().parse_args(arguments)
        except SystemExit:
            pytest.fail(f"docs/operations.md: {shlex.join(argv)} is not a valid command")


def test_the_guide_names_only_files_that_exist():
    named = set(re.findall(r"\b((?:infra|jobs|docs)/[\w./-]*\w)", OPERATIONS_GUIDE.read_text()))
    assert named
    missing = sorted(path for path in named if not (REPO / path).exists())
    assert not missing, missing


PROMPTS = ["a red circle above a blue square", "a green triangle", "two small yellow stars"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from vqbatch.tiny import write_tiny_checkpoint

    return Path(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "checkpoint"))


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    import pyarrow as pa

    path = tmp_path_factory.mktemp("prompts") / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"p{index}" for index in range(len(PROMPTS))], "prompt": PROMPTS}), path)
    return path


@pytest.fixture(scope="module")
def ray_cluster_address() -> str:
    """The GCS address of a Ray instance this test owns (or the one this process already runs).

    The commands join it through RAY_ADDRESS, as they join their cluster on Kubernetes; without it, the entry
    point's "auto" would join whatever Ray instance happens to run on this machine.
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started_here:
        ray.shutdown()


def local_job_config(folder: Path, prompt_file: Path, checkpoint: Path) -> Path:
    """infra/job.yaml with its locations in temp folders and compute fit for a CPU-only test machine."""
    settings = yaml.safe_load(JOB_CONFIG.read_text())
    settings["input"]["paths"] = [str(prompt_file)]
    settings["model"].update(uri=str(checkpoint), dtype="float32", device="cpu")
    settings["output"]["uri"] = str(folder / "dataset")
    settings["sampling"]["steps"] = 2
    settings["compute"].update(min_actors=1, max_actors=1, gpus_per_actor=0, cpus_per_actor=1, batch_size=2)
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def local_argv(command: str, config: Path) -> list[str]:
    """The manifest's command for this machine: this Python, this vqbatch, the temp config."""
    program, *arguments = [str(config) if word == CONFIG_IN_POD else word for word in shlex.split(command)]
    programs = {"python": [sys.executable], "vqbatch": [str(Path(sys.executable).with_name("vqbatch"))]}
    if program not in programs:
        raise ValueError(f"manifest command {command!r} runs {program!r}; this test runs {sorted(programs)} only")
    return programs[program] + arguments


@pytest.mark.parametrize(("where", "command"), entrypoints(), ids=[command for _, command in entrypoints()])
def test_each_manifest_command_runs_here_on_the_tiny_model(where, command, tmp_path, tiny_checkpoint, prompt_file,
                                                        ray_cluster_address):
    config_path = local_job_config(tmp_path, prompt_file, tiny_checkpoint)
    config = load_job_config(config_path)
    environment = {**os.environ, "RAY_ADDRESS": ray_cluster_address}
    run = subprocess.run(local_argv(command, config_path), cwd=REPO, env=environment, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{where}: {command}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    rows = published_rows(config)
    images = range(config.sampling.images_per_prompt)
    expected = [(f"p{index}", image) for index in range(len(PROMPTS)) for image in images]
    assert sorted(rows) == expected, f"{where}: {command} published {rows}"


def published_rows(config: JobConfig) -> list[tuple[str, int]]:
    """(id, image_index) of every published row, each checked to be ok and to have its image file."""
    from vqbatch.io.dataset import OutputRoot, read_metadata

    rows = read_metadata(OutputRoot.of(config.output, config.s3)).to_pylist()
    for row in rows:
        assert row["status"] == "ok", row["error"]
        assert (Path(config.output.uri) / row["image"]).is_file(), row["image"]
    return [(row["id"], row["image_index"]) for row in rows]
