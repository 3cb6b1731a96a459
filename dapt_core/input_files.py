"""A list of input files kept as columns: what discovery finds and what ingest batches are planned on.

A refresh sees every file of the corpus and reads a few. An `InputFile` model costs about 1.3 KB and 3.5 us to make
(100,000 files: 133 MB, a million notes 1.3 GB in the Prefect worker), so the file list is columns of plain values
(about 250 bytes a file) and models are made only for the files a run ingests.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import overload

from dapt_core.manifest import InputFile

INPUT_FIELDS = tuple(InputFile.model_fields)  # a per-file record's input columns: every field of its InputFile
input_row = operator.attrgetter(*INPUT_FIELDS)
"""An InputFile's fields as a tuple, in INPUT_FIELDS order: what its records and its cache keys are made of."""


@dataclass(frozen=True)
class InputFiles(Sequence[InputFile]):
    """Input files as columns, one list per `InputFile` field (in its order). Indexing or iterating makes models;
    a slice is another `InputFiles`."""

    uri: list[str]
    source: list[str]
    kind: list[str]
    text_field: list[str]
    fingerprint: list[str]
    bytes: list[int]

    @classmethod
    def of(cls, files: Iterable[InputFile]) -> InputFiles:
        rows = [input_row(f) for f in files]
        return cls(*([row[i] for row in rows] for i in range(len(INPUT_FIELDS))))

    @classmethod
    def of_source(cls, found: Iterable[tuple[str, str, int]], source: str, kind: str, text_field: str) -> InputFiles:
        """The files of one source from (uri, fingerprint, bytes) rows, in uri order."""
        rows = sorted(found)
        n = len(rows)
        return cls(
            [r[0] for r in rows], [source] * n, [kind] * n, [text_field] * n, [r[1] for r in rows], [r[2] for r in rows]
        )

    def columns(self) -> tuple[list, ...]:
        return tuple(getattr(self, name) for name in INPUT_FIELDS)

    def rows(self) -> Iterator[tuple]:
        """Each file's fields as a tuple in INPUT_FIELDS order (as `input_row` gives them), without making models."""
        return zip(*self.columns())

    def models(self) -> list[InputFile]:
        return list(self)

    def __len__(self) -> int:
        return len(self.uri)

    @overload
    def __getitem__(self, index: int) -> InputFile: ...

    @overload
    def __getitem__(self, index: slice) -> InputFiles: ...

    def __getitem__(self, index: int | slice) -> InputFile | InputFiles:
        if isinstance(index, slice):
            return InputFiles(*(column[index] for column in self.columns()))
        return InputFile(**{name: column[index] for name, column in zip(INPUT_FIELDS, self.columns())})

    def __iter__(self) -> Iterator[InputFile]:
        for row in self.rows():
            yield InputFile(**dict(zip(INPUT_FIELDS, row)))

    def __add__(self, other: InputFiles) -> InputFiles:
        return InputFiles(*(a + b for a, b in zip(self.columns(), other.columns())))


def input_rows(files: Iterable[InputFile]) -> Iterator[tuple]:
    """Each file's fields as a tuple in INPUT_FIELDS order: from the columns of `InputFiles`, or from the models."""
    return files.rows() if isinstance(files, InputFiles) else map(input_row, files)


if tuple(f.name for f in fields(InputFiles)) != INPUT_FIELDS:
    raise TypeError("InputFiles' columns must be InputFile's fields, in their order")
