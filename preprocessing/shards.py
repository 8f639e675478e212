"""The Parquet shards: schema, rows, and writing one shard atomically under a fixed name.

Training / validation rows (one per augmented crop)::

    id                  string    "<source stem>#<augmentation index>", unique in a dataset
    source_file         string    the .mat the row came from, relative to the input root
    subset              string    AFW / HELEN / IBUG / LFPW (300W-LP) or AFLW2000
    subject_id          string    the source face; every view, flip and crop of it shares one split
    augmentation_index  int16     0 .. copies - 1 (0 = the plain crop when kept)
    flipped             bool      the crop was mirrored by the augmentation
    image               binary    120x120x3 BGR crop, encoded as the shard's ``image_format``
    label               float32[62]   the 62-d parameter in the crop's frame (not whitened)
    landmarks           float32[204]  the label's 68 landmarks in crop pixels, x[68] y[68] z[68]
    pitch, yaw, roll    float32   radians, from the label

AFLW2000-3D evaluation rows add ``roi_box`` float32[4] (the crop box in the image),
``pt3d_68`` float32[204] (ground truth in image pixels, x y z rows), ``pt2d`` float32[42]
(AFLW's 21 points, x then y, -1 = missing) and ``yaw_bin`` int8 (0: |yaw| <= 30, 1: <= 60, 2).

Plain pyarrow types only (fixed-size lists, binary), so any Parquet reader opens the shards.
The image format is stored in the schema metadata (``image_format``) and in the manifest.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from models.frame import CROP_SIZE
from models.params import NUM_PARAMS

IMAGE_FORMATS = ("jpeg", "png", "raw")
QUARANTINE_SCHEMA = pa.schema([("file", pa.string()), ("stage", pa.string()), ("reason", pa.string())])


def training_schema(image_format: str) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("source_file", pa.string()),
            ("subset", pa.string()),
            ("subject_id", pa.string()),
            ("augmentation_index", pa.int16()),
            ("flipped", pa.bool_()),
            ("image", pa.binary()),
            ("label", pa.list_(pa.float32(), NUM_PARAMS)),
            ("landmarks", pa.list_(pa.float32(), 204)),
            ("pitch", pa.float32()),
            ("yaw", pa.float32()),
            ("roll", pa.float32()),
        ],
        metadata={"image_format": image_format},
    )


def evaluation_schema(image_format: str) -> pa.Schema:
    base = training_schema(image_format)
    extra = [
        ("roi_box", pa.list_(pa.float32(), 4)),
        ("pt3d_68", pa.list_(pa.float32(), 204)),
        ("pt2d", pa.list_(pa.float32(), 42)),
        ("yaw_bin", pa.int8()),
    ]
    return pa.schema(list(base) + [pa.field(name, kind) for name, kind in extra],
                     metadata=base.metadata)


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """A (120, 120, 3) uint8 crop as bytes: JPEG, PNG or the raw array."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    if image_format == "raw":
        return np.ascontiguousarray(image).tobytes()
    extension, params = {"jpeg": (".jpg", [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]),
                         "png": (".png", [])}[image_format]
    ok, encoded = cv2.imencode(extension, image, params)
    if not ok:
        raise ValueError(f"cannot encode a crop as {image_format}")
    return encoded.tobytes()


def decode_image(data: bytes, image_format: str, size: int = CROP_SIZE) -> np.ndarray:
    """Inverse of :func:`encode_image`: (size, size, 3) uint8 BGR."""
    if image_format == "raw":
        return np.frombuffer(data, dtype=np.uint8).reshape(size, size, 3)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"a shard image does not decode as {image_format}")
    return image


def table_from_columns(columns: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """Columns (lists of python / numpy values, or arrays with one row per entry) -> a table of
    exactly ``schema``; every column holds the same number of rows."""
    arrays = {}
    rows = len(columns[schema[0].name])
    for field in schema:
        values = columns[field.name]
        if pa.types.is_fixed_size_list(field.type):
            flat = np.asarray(values, dtype=np.float32).reshape(rows, -1)
            if flat.shape[1] != field.type.list_size:
                raise ValueError(f"column {field.name!r}: {flat.shape[1]} values a row, "
                                 f"expected {field.type.list_size}")
            arrays[field.name] = pa.FixedSizeListArray.from_arrays(
                pa.array(flat.reshape(-1), pa.float32()), field.type.list_size)
        elif pa.types.is_floating(field.type) or pa.types.is_integer(field.type):
            # Through one numpy array: converting numpy scalars one by one is slower.
            arrays[field.name] = pa.array(np.asarray(values, dtype=field.type.to_pandas_dtype()), field.type)
        else:
            arrays[field.name] = pa.array(values, type=field.type)
    return pa.table(arrays, schema=schema)


def table_from_rows(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts of python / numpy values) -> a table of exactly ``schema``."""
    return table_from_columns({field.name: [row[field.name] for row in rows] for field in schema}, schema)


# zstd level for image columns already entropy-coded (JPEG, PNG): what zstd still finds there is
# the header every crop repeats, which its fastest levels find as well (docs/shards.md).
ENCODED_IMAGE_ZSTD_LEVEL = -5
ZSTD_LEVEL = 1


def _zstd_levels(schema: pa.Schema) -> dict[str, int]:
    encoded = (schema.metadata or {}).get(b"image_format") in (b"jpeg", b"png")
    return {field.name: ENCODED_IMAGE_ZSTD_LEVEL if encoded and field.name == "image" else ZSTD_LEVEL
            for field in schema}


class AtomicParquetWriter:
    """Writes a Parquet file row group by row group to ``path + '.part'``, then renames it.

    A run killed half way leaves at most a ``.part`` file, never a partial shard under the final
    name; the next run writes the whole shard again under the same name.
    """

    def __init__(self, filesystem: pafs.FileSystem, path: str, schema: pa.Schema) -> None:
        self.filesystem = filesystem
        self.path = path
        self.partial = path + ".part"
        self.schema = schema
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        self._stream = filesystem.open_output_stream(self.partial)
        # No dictionary pages: the encoded images never repeat, and trying to build a dictionary
        # of them cost four times the rest of the write (and made the files larger).
        self._writer = pq.ParquetWriter(self._stream, schema, compression="zstd", use_dictionary=False,
                                        compression_level=_zstd_levels(schema))
        self.rows = 0

    def write_rows(self, rows: list[dict]) -> None:
        if rows:
            self._write(table_from_rows(rows, self.schema))

    def write_columns(self, columns: dict[str, Any]) -> None:
        """One row group from columns (see :func:`table_from_columns`)."""
        self._write(table_from_columns(columns, self.schema))

    def _write(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        self._writer.close()
        self._stream.close()
        self.filesystem.move(self.partial, self.path)

    def abort(self) -> None:
        try:
            self._writer.close()
            self._stream.close()
        finally:
            self.filesystem.delete_file(self.partial)


def write_bytes_atomic(filesystem: pafs.FileSystem, path: str, data: bytes) -> None:
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path + ".part") as stream:
        stream.write(data)
    filesystem.move(path + ".part", path)


def read_table(paths: Iterable[str], filesystem: pafs.FileSystem | None = None) -> pa.Table:
    """Several shard files as one table (plain pyarrow)."""
    tables = [pq.read_table(p, filesystem=filesystem) for p in paths]
    return pa.concat_tables(tables) if tables else pa.table({})


def table_to_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()
