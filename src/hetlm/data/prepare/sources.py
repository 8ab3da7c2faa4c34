"""Corpus sources beyond text files: Parquet/Arrow columns and Hugging Face ``datasets`` streams.

Both are read in bounded memory: Parquet one row group batch at a time
(``ParquetFile.iter_batches``), Arrow IPC files one record batch at a time (memory-mapped), and a
``datasets`` corpus with ``load_dataset(..., streaming=True)``, which never materialises the
dataset on disk or in memory. Documents from every source then go through the same cleaning and
accounting as text files (:func:`hetlm.data.prepare.corpus.iter_text_documents`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError


def iter_column_batches(path: Path, column: str, batch_rows: int) -> Iterator[list[Any]]:
    """The values of ``column`` in a Parquet or Arrow IPC file, ``batch_rows`` at a time."""
    import pyarrow as pa

    try:
        if path.suffix.lower() == ".parquet":
            yield from _parquet_batches(path, column, batch_rows)
        else:
            yield from _arrow_batches(path, column)
    except (pa.ArrowInvalid, OSError) as exc:
        message = " ".join(str(exc).split())
        raise HetlmError(f"cannot read {path} as {path.suffix[1:]}: {message}") from exc


def _missing_column(path: Path, column: str, names: list[str]) -> HetlmError:
    return HetlmError(
        f"{path} has no column {column!r} (columns: {', '.join(names)}): pass the "
        "text column with --text-field"
    )


def _parquet_batches(path: Path, column: str, batch_rows: int) -> Iterator[list[Any]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        names = parquet.schema_arrow.names
        if column not in names:
            raise _missing_column(path, column, names)
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=[column]):
            yield batch.column(0).to_pylist()


def _arrow_batches(path: Path, column: str) -> Iterator[list[Any]]:
    """Arrow IPC: the stream format (``datasets`` cache files) or the file format (Feather 2)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            reader: Any = pa.ipc.open_stream(source)
            batches = iter(reader)
        except pa.ArrowInvalid:
            source.seek(0)
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        names = reader.schema.names
        if column not in names:
            raise _missing_column(path, column, names)
        index = names.index(column)
        for batch in batches:
            yield batch.column(index).to_pylist()


@dataclass(frozen=True)
class HFSource:
    """A corpus from ``datasets.load_dataset(name, config, split=split, streaming=True)``.

    ``name`` is a hub dataset (``cc100`` with config ``ja``, say) or a packaged builder
    (``parquet``, ``json``, ``arrow``) with ``data_files``; nothing is downloaded up front.
    """

    name: str
    config: str | None = None
    split: str = "train"
    data_files: tuple[str, ...] = field(default_factory=tuple)

    def label(self) -> str:
        """How the source is named in messages and metadata."""
        config = f"/{self.config}" if self.config else ""
        return f"hf:{self.name}{config}[{self.split}]"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "data_files": list(self.data_files)}

    def texts(self, text_field: str) -> Iterator[Any]:
        """The ``text_field`` value of every row, streamed (None where the row lacks it)."""
        dataset = self._load()
        features = getattr(dataset, "features", None)
        if features is not None and text_field not in features:
            raise HetlmError(
                f"{self.label()} has no column {text_field!r} (columns: "
                f"{', '.join(features)}): pass the text column with --text-field"
            )
        for row in dataset:
            yield row.get(text_field)

    def _load(self) -> Any:
        from datasets import load_dataset

        kwargs: dict[str, Any] = {"split": self.split, "streaming": True}
        if self.data_files:
            kwargs["data_files"] = list(self.data_files)
        try:
            return load_dataset(self.name, self.config, **kwargs)
        except Exception as exc:  # many types: not found, offline, bad config
            message = " ".join(str(exc).split())[:300]
            raise HetlmError(
                f"cannot open the dataset {self.label()} with datasets.load_dataset "
                f"(streaming): {message}; check the name, --hf-config and "
                "--hf-split (and the network or HF_DATASETS_OFFLINE)"
            ) from exc
