"""Assembly: a file restored in several units becomes one output file.

Each unit of a multi-unit file is restored into a part under `<output>/_resflow/parts/`;
once its last part is done, an assembly task (a Ray task: it streams bytes and needs
little CPU) streams the parts, row group by row group, into the one output file, which
readers see whole or not at all, with every input row once, in order.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.dataset import PARQUET_COMPRESSION

ASSEMBLY_CPUS = 0.25  # an assembly task streams bytes: it needs little CPU of its own


def assemble(parts: list[str], output: str) -> storage.FileInfo:
    """Stream a file's parts, row group by row group, into its one output file: the output
    appears whole when the last row group is written, or not at all. Returns the output."""
    filesystem = storage.pyarrow_filesystem(parts[0])[0]
    writer = storage.AtomicWriter(output)
    with writer as sink:
        out = None
        for part in parts:
            with filesystem.open_input_file(storage.parse(part).path) as handle:
                parquet = pq.ParquetFile(handle)
                out = out or pq.ParquetWriter(sink, parquet.schema_arrow, compression=PARQUET_COMPRESSION)
                for group in range(parquet.num_row_groups):
                    out.write_table(parquet.read_row_group(group))
        out.close()
    return writer.stored
