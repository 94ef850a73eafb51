"""Training from a dataset on an object store, against a real S3-compatible server on this machine
(moto's, over HTTP): each node's copy in a local cache is the dataset byte for byte, connections
dropped mid-transfer by a real TCP proxy are survived, a damaged object is named, and a run from the
URL trains on the same batches as one from the local folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import threading

import numpy as np
import pytest

from data_pipeline.loader import PackedDataset
from data_pipeline.mixed import MixConfig, MixedDataset
from data_pipeline.remote import cached_dataset
from data_pipeline.shards import read_manifest
from tests.distributed import free_port
from tests.test_parallel import small_config
from training.config import DataConfig
from training.objectives import trainer_for


def upload(s3, data) -> str:
    fs, bucket, _ = s3
    fs.put(str(data) + "/", f"{bucket}/ds/", recursive=True)
    return f"s3://{bucket}/ds"


def same_rows(a, b) -> bool:
    rows = np.arange(len(a))
    return len(a) == len(b) and bool((a.get(rows).tokens == b.get(rows).tokens).all())


@pytest.mark.parametrize("has_store", [True, False])
def test_the_cached_copy_is_the_dataset(s3, small_dataset, tmp_path, has_store):
    """A build's token store, or the packed rows of a dataset without one (post-training data), and
    nothing else: the cached copy reads as the original, and a second open fetches no file again."""
    data = small_dataset
    if not has_store:
        data = tmp_path / "rows"
        shutil.copytree(small_dataset, data)
        manifest = read_manifest(data)
        del manifest["store"]
        (data / "manifest.json").write_text(json.dumps(manifest))
    url = upload(s3, data)
    local = cached_dataset(url, tmp_path / "cache")
    assert local != data
    assert (local / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    for split in ("train", "valid"):
        want = MixedDataset(data, MixConfig(), split) if has_store else PackedDataset(data, split)
        got = MixedDataset(local, MixConfig(), split) if has_store else PackedDataset(local, split)
        assert same_rows(want, got), split
    assert not (local / ("train" if has_store else "store")).exists(), "only what the loader reads is fetched"
    part = next((local / ("store" if has_store else "train")).rglob("*.arrow"))
    inode = part.stat().st_ino
    assert cached_dataset(url, tmp_path / "cache") == local
    assert part.stat().st_ino == inode, "a cached file with the manifest's checksum is not fetched again"


class DroppingProxy:
    """A TCP proxy to `target` that cuts the first `drops` connections once each has passed
    `after` bytes back to the client: a connection lost mid-response, as a real network loses it."""

    def __init__(self, target: tuple[str, int], drops: int, after: int):
        self.target, self.drops, self.after = target, drops, after
        self.listener = socket.create_server(("127.0.0.1", free_port()))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                doomed = self.drops > 0
                self.drops -= doomed
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.after if doomed else None),
                             daemon=True).start()  # fmt: skip

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, cut_after: int | None) -> None:
        passed = 0
        try:
            while data := src.recv(4096):
                if cut_after is not None and passed + len(data) > cut_after:
                    dst.sendall(data[: cut_after - passed])
                    break
                dst.sendall(data)
                passed += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()


def through(monkeypatch, endpoint: str) -> None:
    """Point fsspec's S3 at `endpoint`."""
    import fsspec
    import s3fs

    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()


def test_dropped_connections_are_fetched_again(s3, small_dataset, tmp_path, monkeypatch):
    url = upload(s3, small_dataset)
    port = int(s3[2].rsplit(":", 1)[1])
    proxy = DroppingProxy(("127.0.0.1", port), drops=4, after=3000)
    through(monkeypatch, f"http://127.0.0.1:{proxy.port}")
    try:
        local = cached_dataset(url, tmp_path / "cache", streams=2)
    finally:
        proxy.close()
    assert proxy.drops == 0, "every planned drop happened"
    assert same_rows(MixedDataset(small_dataset, MixConfig()), MixedDataset(local, MixConfig()))


def test_a_damaged_object_is_named_with_its_checksum(s3, small_dataset, tmp_path):
    url = upload(s3, small_dataset)
    fs, bucket, _ = s3
    name = sorted(fs.find(f"{bucket}/ds/store/train"))[0]
    fs.pipe(name, fs.cat(name)[:-10] + b"0123456789")
    with pytest.raises(OSError, match=rf"s3://{name}: could not fetch it whole in 2 tries: its sha256 .* differs"):
        cached_dataset(url, tmp_path / "cache", tries=2)
    assert not list((tmp_path / "cache").rglob("*.tmp")), "no partial file is left in the cache"


@pytest.mark.slow  # two training runs; the copy is checked row for row against the original in the default suite
def test_a_run_from_the_url_trains_on_the_local_runs_batches(s3, small_dataset, tmp_path):
    url = upload(s3, small_dataset)
    base = small_config(small_dataset, tmp_path)
    mix = MixConfig(ratios={"germanic": 0.5, "code": 0.5}, total_tokens=6_000)
    runs = {}
    for name, path in (("local", str(small_dataset)), ("remote", url)):
        data = DataConfig(path=path, cache_dir=str(tmp_path / "cache"), global_batch_size=8, mix=mix)
        config = dataclasses.replace(base, name=name, steps=2, data=data)
        runs[name] = [row["loss"] for row in trainer_for(config).fit()]
    assert runs["remote"] == runs["local"]
