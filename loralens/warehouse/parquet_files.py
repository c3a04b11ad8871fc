"""The one writer of checksummed Parquet files in artifact folders: atomic (temp name, then rename), zstd."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from loralens.hashing import file_sha256
from loralens.warehouse.artifacts import ShardFile, atomic_write_with


def write_parquet_file(root: Path, rel: str, table: pa.Table, *, compression_level: int | None = None) -> ShardFile:
    """Write `table` to `root/rel` atomically (zstd) and return its ShardFile: rows, bytes, sha256.

    A reader never sees half a file, and the checksum is of the file as renamed into place. The caller records
    the ShardFile (`ArtifactDir.record_shard`) once all of a shard's files are written.
    """
    path = root / rel
    atomic_write_with(path, lambda tmp: pq.write_table(table, tmp, compression="zstd",
                                                       compression_level=compression_level))
    return ShardFile(path=rel, rows=table.num_rows, bytes=path.stat().st_size, sha256=file_sha256(path))
