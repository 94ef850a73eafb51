"""The Ray engine on a real two-node Ray cluster on this machine: a head and a worker node, each
started by `ray start` as its own process group with its own temp folder. Its builds must equal the
local engine's byte for byte, also when the worker node is killed mid-build (its tasks run again on
the head) and when the driver is killed and the build is started again (it resumes)."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.distributed import free_port

ray = pytest.importorskip("ray", reason="the Ray engine needs the ray extra")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
RAY = str(Path(sys.executable).with_name("ray"))


class Cluster:
    """`ray start --block` processes, each in its own session so that it can be killed whole. Ray
    clusters authenticate by token (Ray >= 2.5x): every node and driver gets this cluster's."""

    def __init__(self):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        self.env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def alive_nodes(self) -> int:
        probe = "import ray; ray.init(address=%r, log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
        run = subprocess.run([sys.executable, "-c", probe % self.address], env=self.env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        return int(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else 0

    def start_node(self, head: bool) -> subprocess.Popen:
        temp = tempfile.mkdtemp(prefix="rayh" if head else "rayw")  # short: Ray's socket paths must fit
        args = ["--head", f"--port={self.port}", "--include-dashboard=false"] if head else [f"--address={self.address}"]
        command = [RAY, "start", *args, "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats", "--block"]
        node = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        self.nodes.append(node)
        return node

    def wait_for(self, nodes: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.alive_nodes() != nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray cluster at {self.address} did not reach {nodes} live nodes")
            time.sleep(1)

    @staticmethod
    def kill(node: subprocess.Popen) -> None:
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)


@pytest.fixture(scope="module")
def running_cluster():
    cluster = Cluster()
    try:
        cluster.start_node(head=True)
        cluster.wait_for(1)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster(running_cluster):
    """The module's cluster with its worker node up (started again after a test killed it)."""
    if not any(node.poll() is None for node in running_cluster.nodes[1:]):
        running_cluster.start_node(head=False)
        running_cluster.wait_for(2)
    return running_cluster


def write_config(tmp_path: Path, name: str, corpus: Path) -> Path:
    config = {
        "output_dir": name,  # relative, in the folder the build runs in: the same manifest for every run
        "sources": [{"paths": [str(corpus / "*.jsonl")], "text_field": "text", "lang_field": "lang"}],
        "seq_len": 64,
        "total_tokens": 150_000,
        "valid_docs_per_family": 4,
        "sequences_per_shard": 64,
        "tokenizer": {"vocab_size": 600, "sample_chars_per_language": 20_000},
        "near_dedup": {"threshold": 0.7, "num_perm": 32},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def build_command(config: Path, *extra: str) -> list[str]:
    """The CLI, run from the config's folder."""
    return [sys.executable, "-m", "data_pipeline", "build", str(config), *extra]


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of a built dataset, bytes as written (the manifest, the tokenizer, every shard)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from data_pipeline.corpus import write_default_corpus

    folder = tmp_path_factory.mktemp("corpus")
    write_default_corpus(folder, docs_per_language=120)
    (folder / "repeat.jsonl").write_text((folder / "en.jsonl").read_text())  # exact duplicates to remove
    return folder


@pytest.fixture(scope="module")
def local_build(corpus, tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("local")
    subprocess.run(
        build_command(write_config(tmp, "out", corpus), "workers=2"), cwd=tmp, env=ENV, check=True, timeout=600
    )
    files = output_files(tmp / "out")
    manifest = json.loads(files["manifest.json"])
    assert manifest["duplicates_removed"] >= 120 and manifest["near_duplicates_removed"] >= 0
    return files


def test_two_node_cluster_builds_what_the_local_engine_builds(cluster, corpus, local_build, tmp_path):
    config = write_config(tmp_path, "out", corpus)
    command = build_command(config, "--engine", "ray", "--address", cluster.address)
    subprocess.run(command, cwd=tmp_path, env=cluster.env, check=True, timeout=600)
    assert output_files(tmp_path / "out") == local_build


def test_a_worker_node_killed_mid_build_changes_nothing(cluster, corpus, local_build, tmp_path):
    config = write_config(tmp_path, "out", corpus)
    tokenized = tmp_path / "out.building" / "tokenized"
    driver = subprocess.Popen(build_command(config, "--engine", "ray", "--address", cluster.address), cwd=tmp_path,
                              env=cluster.env)  # fmt: skip
    while len(list(tokenized.glob("unit_*.arrow"))) < 2 and driver.poll() is None:
        time.sleep(0.02)
    assert driver.poll() is None, "the build ended before the worker node could be killed"
    cluster.kill(cluster.nodes[-1])  # the worker node: raylet, object store and its task workers
    assert driver.wait(timeout=600) == 0
    assert output_files(tmp_path / "out") == local_build


def test_a_killed_driver_resumes_where_it_stopped(cluster, corpus, local_build, tmp_path):
    config = write_config(tmp_path, "out", corpus)
    tokenized = tmp_path / "out.building" / "tokenized"
    command = build_command(config, "--engine", "ray", "--address", cluster.address)
    driver = subprocess.Popen(command, cwd=tmp_path, env=cluster.env)
    while len(list(tokenized.glob("unit_*.arrow"))) < 4 and driver.poll() is None:
        time.sleep(0.02)
    driver.kill()
    driver.wait()
    done = len(list(tokenized.glob("unit_*.arrow")))
    assert 4 <= done < len(list(corpus.glob("*.jsonl"))), "the driver was not killed mid-build"
    resumed = subprocess.run(command, cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reused = re.search(r"resuming: (\d+) of", resumed.stdout + resumed.stderr)
    assert reused and int(reused.group(1)) >= done, "finished source files are not tokenized again"
    assert output_files(tmp_path / "out") == local_build


def test_bad_input_on_a_worker_is_reported_as_on_this_machine(cluster, corpus, tmp_path):
    """A unit's error reaches the user as the local engine reports it: file, line, what is wrong."""
    broken = tmp_path / "corpus"
    broken.mkdir()
    (broken / "en.jsonl").write_text((corpus / "en.jsonl").read_text())
    good = (corpus / "de.jsonl").read_text().splitlines()[:100]  # past the tokenizer's sample: a worker reads it
    (broken / "zz.jsonl").write_text("\n".join([*good, "{not json"]) + "\n")
    config = write_config(tmp_path, "out", broken)
    command = build_command(config, "--engine", "ray", "--address", cluster.address)
    run = subprocess.run(command, cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert "error: " in run.stderr and "zz.jsonl:101: not valid JSON" in run.stderr.split("error: ")[-1]
    assert not (tmp_path / "out.building").exists() and not (tmp_path / "out").exists()
