"""More than one node: a real two-node Ray cluster (two raylets on loopback, `ray.cluster_utils.Cluster`) whose head
has no CPU, so every read task, actor and writer runs on the second node; output to moto's S3 server. A local
output on that cluster is refused unless `output.shared_filesystem` says every node mounts it."""

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from vqbatch import read_dataset
from vqbatch.config import load_job_config
from vqbatch.engine import run_job

PROMPTS = 40


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                             "object_store_memory": 128 * 2**20})
    worker = cluster.add_node(num_cpus=2, object_store_memory=128 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield cluster.head_node.node_id, worker.node_id
    ray.shutdown()
    cluster.shutdown()


def job(prompts, output, **overrides):
    return load_job_config(None, {"input.paths": [str(prompts)], "output.uri": output, "model.uri": "noop",
                                  "output.format": "webdataset", "output.rows_per_file": 7,
                                  "compute.batch_size": 4, "compute.max_actors": 1, "compute.cpus_per_actor": 0.5,
                                  **overrides})


def test_actors_and_writers_on_a_second_node_write_every_row_once_to_s3(two_nodes, s3_endpoint, tmp_path):
    prompts = tmp_path / "prompts.parquet"
    ids = [f"p{i}" for i in range(PROMPTS)]
    pq.write_table(pa.table({"id": ids, "prompt": [f"prompt {i}" for i in range(PROMPTS)]}), prompts)
    boto3.client("s3").create_bucket(Bucket="nodes")
    s3 = {"s3.endpoint_url": s3_endpoint, "s3.access_key_id": "testing", "s3.secret_access_key": "testing"}

    head, second = two_nodes
    cpus = {node["NodeID"]: node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]}
    assert cpus == {head: 0, second: 2}  # every read task, actor and writer (each needs a CPU share) runs on `second`

    summary = run_job(job(prompts, "s3://nodes/out", **s3))

    assert (summary.rows, summary.ok) == (PROMPTS, PROMPTS)
    rows = read_dataset("s3://nodes/out", images=True)
    assert sorted(rows.column("id").to_pylist()) == sorted(f"p{i}" for i in range(PROMPTS))  # every row once
    assert all(image["bytes"] for image in rows.column("image").to_pylist())


def test_a_local_output_on_two_nodes_needs_a_shared_filesystem(two_nodes, tmp_path):
    prompts = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["one", "two"]}), prompts)
    with pytest.raises(ValueError, match="Ray cluster has 2 nodes.*output.shared_filesystem: true"):
        run_job(job(prompts, str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()  # refused before anything was written

    summary = run_job(job(prompts, str(tmp_path / "out"), **{"output.shared_filesystem": True}))
    assert summary.rows == 2 and read_dataset(str(tmp_path / "out")).num_rows == 2
