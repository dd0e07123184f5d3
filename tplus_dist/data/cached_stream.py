"""A streaming Stream that reads a prepared split from its source and decompresses each shard into a cache.

mosaicml-streaming (``streaming/base/stream.py:Stream``) decompresses a local dataset in place: with no remote,
``local`` is the source, and ``_decompress_shard_part`` writes ``shard.NNNNN.mds`` (about 5x the ``.zstd``) beside
it, so a read-only or shared dataset cannot be trained from. With a remote it downloads into ``local`` instead, but
then refuses a second live dataset on the same ``local`` (``streaming/base/shared/prefix.py:_check_and_find``,
"Reused local directory"), so two jobs on the same data would each need their own copy, and its temp names
(``raw + '.tmp'``) are shared by all writers.

:class:`CachedStream` is given no remote (concurrent jobs may then share ``local``) and fetches each shard itself on
first use: it reads (or downloads) the compressed file from the source, checks its sha256 against the manifest when
one is given (a remote shard is verified as it arrives), decompresses it, and renames the result into place from a
temp name unique to the process and node, so that two jobs preparing the same shard never read a partial file.
Defined at module level (it subclasses streaming's Stream, so this module imports streaming) so that a dataset
pickles for spawned DataLoader workers.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from tplus_dist.data.prepare import ManifestError, _pid_alive
from tplus_dist.data.streaming_compat import import_streaming

import_streaming()
from streaming.base.compression import decompress  # noqa: E402
from streaming.base.storage.download import CloudDownloader  # noqa: E402
from streaming.base.stream import Stream  # noqa: E402
from streaming.base.util import retry  # noqa: E402

TMP_MARK = ".tmp-"


def host() -> str:
    """This node's name, with '-' made '_' so that temp names split unambiguously."""
    return os.uname().nodename.replace("-", "_")


def temp_name(path: Path) -> Path:
    """A name beside ``path`` that no other process (of this or another node sharing the directory) uses."""
    return path.with_name(f"{path.name}{TMP_MARK}{host()}-{os.getpid()}-{secrets.token_hex(4)}")


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a unique temp name and a rename: readers see the whole file or none, and
    concurrent writers of the same bytes are harmless."""
    tmp = temp_name(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_dead_temp_files(directory: Path) -> list[Path]:
    """Remove the temp files in ``directory`` of processes of this node that are gone (a job killed while it
    decompressed a shard); returns them. Other nodes' temp files (a shared cache_dir) are left to their nodes."""
    mine = f"{TMP_MARK}{host()}-"
    removed = []
    for path in directory.glob(f"*{mine}*"):
        pid = path.name.rsplit(mine, 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class CachedStream(Stream):
    """One split read from ``source`` (a prepared directory's split: a path, or an object-store URI when ``remote``)
    through a decompressed copy in ``local`` (a directory under data.cache_dir that already holds the split's
    index.json). ``sha256``: shard file name -> the manifest's sha256, checked as each shard is fetched."""

    def __init__(self, source: str, local: str, sha256: dict[str, str] | None = None, remote: bool = False) -> None:
        super().__init__(remote=None, local=local, split=None)
        self.source = source.rstrip("/")
        self.source_is_remote = remote
        self.sha256 = dict(sha256 or {})

    def set_up_local(self, shards: list[Any], cache_usage_per_shard: np.ndarray) -> None:
        """Which shards are present: the compressed files live in the source, so they count as present. Streaming
        (no remote, so it "keeps zips": ``streaming/base/format/base/reader.py:Reader.set_up_local``) then never
        deletes a decompressed file for lack of its zip, and asks :meth:`prepare_shard` for a missing one on use."""
        listing = {str(p) for p in Path(self.local).iterdir() if p.is_file()}
        for shard in shards:
            for _, zip_info in shard.file_pairs:
                if zip_info is not None:
                    listing.add(os.path.join(self.local, zip_info.basename))
        for i, shard in enumerate(shards):
            cache_usage_per_shard[i] = shard.set_up_local(listing, self.safe_keep_zip)

    def _fetch(self, basename: str) -> bytes:
        if not self.source_is_remote:
            return Path(self.source, basename).read_bytes()
        tmp = temp_name(Path(self.local) / basename)
        remote = f"{self.source}/{basename}"
        try:
            retry(num_attempts=self.download_retry)(
                lambda: CloudDownloader.direct_download(remote, str(tmp), self.download_timeout)
            )()
            return tmp.read_bytes()
        finally:
            tmp.unlink(missing_ok=True)

    def prepare_shard(self, shard: Any) -> int:
        """Make the shard's decompressed file present in ``local`` (streaming calls this on first use); returns the
        bytes added. Raises ManifestError (a ValueError) naming the source file when it is damaged: its sha256
        differs from the manifest's, it does not decompress, or it holds another size than its index.json says."""
        delta = 0
        for raw_info, zip_info in shard.file_pairs:
            raw_path = Path(self.local) / raw_info.basename
            if raw_path.is_file():
                continue
            info = zip_info or raw_info
            where = f"{self.source}/{info.basename}"
            data = self._fetch(info.basename)
            want = self.sha256.get(info.basename)
            if want is not None:
                got = hashlib.sha256(data).hexdigest()
                if got != want:
                    raise ManifestError(f"{where}: damaged: its sha256 is {got}, the manifest lists {want}")
            if zip_info is not None:
                try:
                    data = decompress(shard.compression, data)
                except Exception as e:  # zstd.Error and kin: name the file instead of a codec traceback
                    raise ManifestError(f"{where}: cannot be decompressed ({shard.compression}: {e})") from None
            if len(data) != raw_info.bytes:
                raise ManifestError(
                    f"{where}: holds {len(data)} bytes of samples, its index.json lists {raw_info.bytes}"
                )
            write_atomically(raw_path, data)
            delta += raw_info.bytes
        return delta
