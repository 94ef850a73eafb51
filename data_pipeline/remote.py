"""Datasets on an object store (`s3://`, `gs://`, ... through fsspec) for training without a shared
filesystem: every node copies the files its loader reads into a local cache, and reads them there.

The manifest is fetched first; then the tokenizer and the split files the loader reads (the token
store's parts; for post-training data, its packed rows), several at a time, each streamed to a
temporary name, checked against the manifest's sha256 and renamed, so the cache never holds a
partial or stale file. A dropped connection or a file that arrives damaged is fetched again (with
backoff); a file already cached with the manifest's checksum is not fetched at all. Ranks of one
node share the cache: one fetches while the others wait on a lock, then find everything there.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from common.locks import waiting
from data_pipeline.sources import is_url
from data_pipeline.tokenizer import TOKENIZER_FILE

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"  # file -> sha256 of what was fetched and checked
BLOCK = 8 << 20


def cached_dataset(path: str, cache_dir: str | Path, streams: int = 8, tries: int = 5) -> Path:
    """The local folder holding dataset `path`: `path` itself when local, else its copy under
    `cache_dir`, made complete for training first."""
    if not is_url(path):
        return Path(path)
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    local = Path(cache_dir).expanduser() / fs.protocol[0] / root.strip("/")
    local.mkdir(parents=True, exist_ok=True)
    with waiting(local / ".lock"):
        fetch = _Fetcher(fs, root, local, tries)
        fetch.file(MANIFEST, None)
        manifest = json.loads((local / MANIFEST).read_text())
        wanted = {manifest.get("tokenizer_file", TOKENIZER_FILE): None} | split_files(manifest)
        missing = {f: sha for f, sha in wanted.items() if sha is None or fetch.verified.get(f) != sha}
        with tqdm(total=len(missing), desc=f"fetch {path}", unit="file", disable=not missing) as bar:
            with ThreadPoolExecutor(streams) as pool:
                for _ in pool.map(lambda item: fetch.file(*item), missing.items()):
                    bar.update()
        fetch.save()
    return local


def split_files(manifest: dict) -> dict[str, str]:
    """file -> sha256 of every file training reads besides the tokenizer: the token store's parts,
    or a dataset without a store (post-training data), its packed rows."""
    splits = manifest["store"]["splits"] if "store" in manifest else manifest["splits"]
    return {e["file"]: e["sha256"] for entries in splits.values() for e in entries}


class _Fetcher:
    def __init__(self, fs, root: str, local: Path, tries: int):
        self.fs, self.root, self.local, self.tries = fs, root, local, tries
        record = local / VERIFIED
        self.verified: dict[str, str] = json.loads(record.read_text()) if record.is_file() else {}
        self.verified = {f: sha for f, sha in self.verified.items() if (local / f).is_file()}

    def file(self, name: str, sha256: str | None) -> None:
        """Copy `name` into the cache, whole and (given `sha256`) checked, trying again on failure."""
        remote, target = f"{self.root}/{name}", self.local / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        for attempt in range(1, self.tries + 1):
            try:
                digest = self._copy(remote, tmp)
                if sha256 is not None and digest != sha256:
                    raise OSError(f"its sha256 {digest} differs from the manifest's {sha256}")
                os.replace(tmp, target)
                if sha256 is not None:
                    self.verified[name] = sha256
                return
            except (FileNotFoundError, PermissionError) as err:
                tmp.unlink(missing_ok=True)
                raise FileNotFoundError(f"{self.fs.protocol[0]}://{remote}: {err}") from err
            except Exception as err:  # noqa: BLE001 (a dropped connection surfaces as many types)
                tmp.unlink(missing_ok=True)
                if attempt == self.tries:
                    raise OSError(
                        f"{self.fs.protocol[0]}://{remote}: could not fetch it whole in {self.tries} tries: {err}"
                    ) from err
                time.sleep(min(30.0, 0.25 * 2**attempt))

    def _copy(self, remote: str, tmp: Path) -> str:
        digest = hashlib.sha256()
        with self.fs.open(remote, "rb", block_size=BLOCK) as src, open(tmp, "wb") as dst:
            while chunk := src.read(BLOCK):
                digest.update(chunk)
                dst.write(chunk)
        return digest.hexdigest()

    def save(self) -> None:
        tmp = self.local / f"{VERIFIED}.tmp"
        tmp.write_text(json.dumps(self.verified, sort_keys=True))
        os.replace(tmp, self.local / VERIFIED)
