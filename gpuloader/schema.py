"""The fields of a sample, once: every other table of names, dtypes and shapes derives from here.

A sample has three kinds of field: per **ray** (one row per traced ray), per **view** (one
row per camera position) and the **voxel** grid. For each field::

    name            kind    on disk (npz, pack, store)    in a batch (torch)    trailing shape
    origins         ray     float32                       float32               (3,)
    directions      ray     float32                       float32               (3,)
    distances       ray     float32                       float32               ()
    hits            ray     uint8                         float32               ()
    view_ids        ray     int32                         int64                 ()
    face_ids        ray     int32                         int64                 ()
    view_positions  view    float32                       float32               (3,)
    voxels          voxel   uint8 (0/1), C order z,y,x    float32               (D, H, W)

A store keeps its rays as :data:`RAY_RECORD` records (all fields of one ray together, 40
bytes with alignment; :data:`RAY_BYTES` = 37 bytes of payload), so a gather touches one
cache line per ray. Batch dtypes are named as strings ("float32", "int64") so that this
module needs neither torch nor CuPy: ``getattr(torch, name)`` gives the torch dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "BATCH_DTYPES",
    "DISK_DTYPES",
    "FIELDS",
    "Field",
    "GRID_DTYPE",
    "RAY_BYTES",
    "RAY_FIELDS",
    "RAY_RECORD",
    "RECORD_ORDER",
    "SAMPLE_FIELDS",
    "STORE_KEYS",
    "field",
]

Kind = Literal["ray", "view", "voxel"]


@dataclass(frozen=True)
class Field:
    """One field of a sample: its name, kind, on-disk dtype, batch dtype and trailing shape
    (the shape of one row; a voxel grid's is its (D, H, W), not fixed)."""

    name: str
    kind: Kind
    disk: np.dtype
    batch: str
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        """Rank of the field's array for one sample: rows plus the trailing shape (3 for a
        grid)."""
        return 3 if self.kind == "voxel" else 1 + len(self.shape)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row on disk (one ray, one view; one voxel for the grid)."""
        return int(self.disk.itemsize * int(np.prod(self.shape, dtype=np.int64)))


_F32, _U8, _I32 = np.dtype(np.float32), np.dtype(np.uint8), np.dtype(np.int32)

#: every field of a sample, in the order of a batch's per-ray keys
FIELDS: tuple[Field, ...] = (
    Field("origins", "ray", _F32, "float32", (3,)),
    Field("directions", "ray", _F32, "float32", (3,)),
    Field("distances", "ray", _F32, "float32", ()),
    Field("hits", "ray", _U8, "float32", ()),
    Field("view_ids", "ray", _I32, "int64", ()),
    Field("face_ids", "ray", _I32, "int64", ()),
    Field("view_positions", "view", _F32, "float32", (3,)),
    Field("voxels", "voxel", _U8, "float32", ()),
)
_BY_NAME = {f.name: f for f in FIELDS}


def field(name: str) -> Field:
    """The field called ``name`` (KeyError naming the known fields otherwise)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no sample field {name!r}; fields: {', '.join(_BY_NAME)}") from None


#: names of the per-ray fields, in batch order
RAY_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.kind == "ray")
#: names of the fields a ray file holds with one row per ray or view (npz keys)
SAMPLE_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.kind != "voxel")
#: on-disk dtype of every ray and view field (npz files, packs, stores)
DISK_DTYPES: dict[str, np.dtype] = {n: _BY_NAME[n].disk for n in SAMPLE_FIELDS}
#: batch dtype (torch's name) of every field
BATCH_DTYPES: dict[str, str] = {f.name: f.batch for f in FIELDS}
#: dtype of a stored voxel grid (0/1)
GRID_DTYPE: np.dtype = _BY_NAME["voxels"].disk
#: payload bytes of one ray (37: two float32 vectors, a float32, two int32 and a byte)
RAY_BYTES: int = sum(_BY_NAME[n].row_bytes for n in RAY_FIELDS)

#: field order of a ray record: the 4-byte-aligned fields first, ``hits`` last
RECORD_ORDER: tuple[str, ...] = (
    "origins",
    "directions",
    "distances",
    "view_ids",
    "face_ids",
    "hits",
)
#: one ray as one record (40 bytes aligned)
RAY_RECORD: np.dtype = np.dtype(
    [
        (n, _BY_NAME[n].disk.str, _BY_NAME[n].shape)
        if _BY_NAME[n].shape
        else (n, _BY_NAME[n].disk.str)
        for n in RECORD_ORDER
    ],
    align=True,
)

#: (dtype, trailing shape) of every array of a resident store (``grids``: flat uint8)
STORE_KEYS: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
    **{n: (_BY_NAME[n].disk, _BY_NAME[n].shape) for n in SAMPLE_FIELDS},
    "grids": (GRID_DTYPE, ()),
}
