"""The per-sample reader of the GPU loader: one sub-volume's raw arrays, as fixed outputs.

A :class:`RayReader` is the callable that DALI's parallel external source calls in sample
mode (``reader(sample_info) -> tuple``) and that the torch-DataLoader back end calls through
:meth:`RayReader.read`. It is picklable (spawned workers get a copy): it holds the dataset's
:class:`~gpuloader.dataset.view.DatasetView` without its transform (its index and options; the
voxel cache travels empty) and the batch order of
:class:`~gpuloader.plan.sampler.RayBatchSampler`, which is a pure function of ``(seed, epoch)``,
so every worker computes the same batches on its own.

Layout of one epoch: batch ``i`` of the sampler is DALI iteration ``i``; slot ``j`` of it is
the batch's ``j``-th request, and slots past the end of a short batch (the last, partial
batch of a level) are *fillers*: empty arrays with ``meta[0] == -1``, which the loader drops.
Iterations past the last batch raise ``StopIteration``. DALI's epoch counter ``e`` maps to
``epoch = first_epoch + e``; in DALI's first epoch iteration ``i`` is batch ``first_start + i``
(a resumed epoch starts there, nothing before it is read). The sampler's batches are already
this rank's shard, so DALI's ``shard_id``/``num_shards`` are not used.

Outputs of one sample (:data:`OUTPUT_NAMES`, :data:`OUTPUT_DTYPES`)::

    voxels          (D, H, W) uint8   0/1 occupancy (cubic: S = D = H = W)
    origins         (N, 3)    float32
    directions      (N, 3)    float32
    distances       (N,)      float32
    hits            (N,)      uint8
    view_ids        (N,)      int32
    face_ids        (N,)      int32
    view_positions  (V, 3)    float32
    meta            (5,)      int64   (index, epoch, level, side, replaced): index -1 for a
                                      filler; replaced: the bad sample this one replaced
                                      (``on_error='skip'``), -1 for none, BAD (-2) for a bad
                                      sample left empty (``mark_bad``: the store fill)

Only the rows the request needs are read (``DatasetView.read_sample``: the CPU API's own
reading code, so the same rows, drawn with the same key; with the dataset's
``on_error='skip'`` through ``read_sample_checked``, so a bad sample comes back as its
replacement, as in the CPU API).
Custom CPU transforms (the first part of
``transforms.split_for_device``) are applied here, per sample, with the sample's
:class:`~gpuloader.augment.rng.SampleContext`. A failure raises a named error that names the files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gpuloader import schema
from gpuloader.augment.rng import SampleContext
from gpuloader.augment.transforms import apply_transform
from gpuloader.dataset.view import DatasetView, min_ignoring_none
from gpuloader.errors import GPULoaderError, SampleReadError
from gpuloader.format.validate import classify
from gpuloader.plan.sampler import RayRequest, order_only

__all__ = [
    "OUTPUT_NAMES",
    "OUTPUT_DTYPES",
    "OUTPUT_NDIM",
    "BAD",
    "META_LEN",
    "RAY_OUTPUTS",
    "RayReader",
    "SampleReadError",
    "decode_error",
    "encode_error",
]

#: Outputs of the reader, in order.
OUTPUT_NAMES: tuple[str, ...] = ("voxels", *schema.RAY_FIELDS, "view_positions", "meta")
#: Outputs with one row per ray.
RAY_OUTPUTS: tuple[str, ...] = schema.RAY_FIELDS
OUTPUT_DTYPES: dict[str, np.dtype] = {
    **{n: schema.field(n).disk for n in OUTPUT_NAMES if n != "meta"},
    "meta": np.dtype(np.int64),
}
#: entries of ``meta`` (module doc)
META_LEN = 5
#: ``meta[4]`` of a bad sample left empty by a reader with ``mark_bad``
BAD = -2
OUTPUT_NDIM: dict[str, int] = {
    **{n: schema.field(n).ndim for n in OUTPUT_NAMES if n != "meta"},
    "meta": 1,
}


_TAG = "gpuloader-error"


def encode_error(exc: GPULoaderError) -> str:
    """A named error as text that survives DALI's worker channel (which passes only
    ``RuntimeError(str(exc))``): ``<gpuloader-error module.Class>message``."""
    cls = type(exc)
    return f"<{_TAG} {cls.__module__}.{cls.__qualname__}>{exc}"


def decode_error(text: str) -> GPULoaderError | None:
    """The named error encoded by :func:`encode_error`, or None if ``text`` is not one."""
    import importlib

    head = f"<{_TAG} "
    if not text.startswith(head) or ">" not in text:
        return None
    name, message = text[len(head) :].split(">", 1)
    module, _, qualname = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError, ValueError):
        return None
    if not (isinstance(cls, type) and issubclass(cls, GPULoaderError)):
        return None
    try:
        return cls(message)
    except Exception:  # noqa: BLE001 - a constructor with other arguments
        return SampleReadError(message)


def _to_numpy(value: Any) -> np.ndarray:
    """numpy arrays pass; torch tensors (from a custom transform) go to host numpy."""
    if isinstance(value, np.ndarray):
        return value
    detach = getattr(value, "detach", None)
    if detach is not None:  # a torch tensor
        return detach().cpu().numpy()
    return np.asarray(value)


class RayReader:
    """Reads the samples of one epoch's batches, one sample per call.

    Args:
        dataset: a :class:`~gpuloader.dataset.hierarchical.HierarchicalVoxelRayDataset` or
            its :class:`~gpuloader.dataset.view.DatasetView`. Its view without the transform
            is kept (``dataset``, pickled into workers).
        sampler: a :class:`~gpuloader.plan.sampler.RayBatchSampler` over ``dataset``; a copy
            without its dataset is kept (``plan.sampler.order_only``), only
            ``batches(epoch)`` is called.
        first_epoch: the epoch of DALI's epoch 0.
        first_start: the batch of ``first_epoch`` that DALI's iteration 0 reads (resume).
        cpu_transforms: custom callables applied per sample, in order, after reading.
        ray_budget: rows the full transform keeps (``transforms.ray_budget``), or None.
        batch_size: slots per batch (default: ``sampler.subvolumes_per_batch``).
        mark_bad: a bad file (:func:`~gpuloader.format.validate.classify`) gives an empty
            sample with ``meta[4] == BAD`` instead of raising (the store fill under
            ``on_error='skip'``, which records it and leaves its place unused).
    """

    def __init__(
        self,
        dataset: Any,
        sampler: Any,
        first_epoch: int = 0,
        cpu_transforms: Sequence[Callable] = (),
        ray_budget: int | None = None,
        batch_size: int | None = None,
        first_start: int = 0,
        mark_bad: bool = False,
    ) -> None:
        # the budget is passed explicitly; known transforms run later
        self.dataset: DatasetView = DatasetView.of(dataset).with_(transform=None)
        self.sampler = order_only(sampler)
        self.first_epoch = int(first_epoch)
        self.first_start = int(first_start)
        self.cpu_transforms = list(cpu_transforms)
        self.ray_budget = ray_budget
        self.batch_size = int(batch_size or sampler.subvolumes_per_batch)
        self.seed = self.dataset.seed
        self.mark_bad = bool(mark_bad)
        self._batches: dict[int, list[list[RayRequest]]] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_batches"] = {}
        return state

    # -- order -----------------------------------------------------------------------------

    def batches(self, epoch: int) -> list[list[RayRequest]]:
        """The sampler's batches of ``epoch`` (cached: the last two epochs)."""
        epoch = int(epoch)
        got = self._batches.get(epoch)
        if got is None:
            got = self.sampler.batches(epoch)
            if any(len(b) > self.batch_size for b in got):
                raise ValueError(
                    f"a batch of epoch {epoch} holds more than batch_size={self.batch_size} samples"
                )
            self._batches[epoch] = got
            for old in sorted(self._batches)[:-2]:
                del self._batches[old]
        return got

    def request(self, epoch: int, iteration: int, slot: int, start: int = 0) -> RayRequest | None:
        """Request of ``slot`` of batch ``start + iteration`` (None: a filler slot).

        Raises:
            StopIteration: that batch is past the epoch's last batch.
        """
        iteration = int(iteration) + int(start)
        batches = self.batches(epoch)
        if iteration >= len(batches):
            raise StopIteration
        batch = batches[iteration]
        return batch[slot] if slot < len(batch) else None

    # -- reading ---------------------------------------------------------------------------

    def __call__(self, sample_info: Any) -> tuple[np.ndarray, ...]:
        """DALI sample-mode entry: ``sample_info`` has ``iteration``, ``idx_in_batch`` and
        ``epoch_idx``. Returns the outputs of :data:`OUTPUT_NAMES` (fillers past a short
        batch's end); raises ``StopIteration`` past the epoch's end."""
        e = int(sample_info.epoch_idx)
        epoch = self.first_epoch + e
        start = self.first_start if e == 0 else 0
        req = self.request(epoch, int(sample_info.iteration), int(sample_info.idx_in_batch), start)
        if req is None:
            return self.filler(epoch)
        try:
            return self.read(req)
        except GPULoaderError as exc:  # DALI keeps only the text: keep the class in it
            raise RuntimeError(encode_error(exc)) from exc

    @staticmethod
    def filler(epoch: int = 0) -> tuple[np.ndarray, ...]:
        """An empty sample (no voxels, rays or views) with ``meta = (-1, epoch, -1, 0, -1)``."""
        out = []
        for name in OUTPUT_NAMES:
            if name == "meta":
                out.append(np.array([-1, epoch, -1, 0, -1], dtype=np.int64))
            elif name in ("origins", "directions", "view_positions"):
                out.append(np.zeros((0, 3), OUTPUT_DTYPES[name]))
            elif name == "voxels":
                out.append(np.zeros((0, 0, 0), np.uint8))
            else:
                out.append(np.zeros((0,), OUTPUT_DTYPES[name]))
        return tuple(out)

    def _describe(self, index: int) -> str:
        try:
            s = self.dataset.samples[index]
        except Exception:  # noqa: BLE001 - only for the message
            return f"sample {index}"
        return (
            f"sample {index} (level {s.get('level')}, hash {s.get('hash')}; "
            f"ray file {s.get('ray_path')}, voxel file {s.get('voxel_path')})"
        )

    def read(self, request: RayRequest | Sequence[int | None]) -> tuple[np.ndarray, ...]:
        """Read one request ``(index, epoch, num_rays)``: the outputs of :data:`OUTPUT_NAMES`.

        Raises:
            DamagedFileError, DatasetLayoutError: a bad or missing file (named).
            SampleReadError: anything else, with the sample's files named.
        """
        index, epoch, num_rays = request
        index, epoch = int(index), int(epoch)
        try:
            k = min_ignoring_none(num_rays, self.ray_budget)
            checked = self.dataset.on_error == "skip" and not self.mark_bad
            if checked:  # a bad sample comes back as its replacement (dataset doc)
                sample = self.dataset.read_sample_checked(index, epoch, k)
            else:
                try:
                    sample = self.dataset.read_sample(index, epoch, k)
                except Exception as exc:
                    if not self.mark_bad or classify(exc) is None:
                        raise
                    return self._bad(index, epoch)
            index = int(sample.get("index", index))
            ctx = SampleContext(self.seed, epoch, index)
            for t in self.cpu_transforms:
                sample = apply_transform(t, sample, ctx)
                if not isinstance(sample, dict):
                    raise TypeError(f"{t!r} returned {type(sample).__name__}, expected a dict")
            return self._pack(sample, index, epoch, int(sample.get("skipped_from", -1)))
        except GPULoaderError:
            raise
        except StopIteration as exc:  # would end DALI's epoch silently
            raise SampleReadError(f"{self._describe(index)}: StopIteration while reading") from exc
        except Exception as exc:
            raise SampleReadError(
                f"{self._describe(index)}, epoch {epoch}: {type(exc).__name__}: {exc}"
            ) from exc

    def _bad(self, index: int, epoch: int) -> tuple[np.ndarray, ...]:
        """A bad sample left empty: no arrays, ``meta = (index, epoch, level, 0, BAD)``."""
        out = list(self.filler(epoch))
        level = int(self.dataset.samples[index]["level"])
        out[OUTPUT_NAMES.index("meta")] = np.array([index, epoch, level, 0, BAD], dtype=np.int64)
        return tuple(out)

    def _pack(
        self, sample: dict, index: int, epoch: int, replaced: int = -1
    ) -> tuple[np.ndarray, ...]:
        vox = _to_numpy(sample["voxels"])
        if vox.ndim == 4 and vox.shape[0] == 1:
            vox = vox[0]
        if vox.ndim != 3:
            raise ValueError(f"voxels must be (1, D, H, W) or (D, H, W); got {vox.shape}")
        if vox.dtype == np.bool_:
            vox = vox.view(np.uint8)
        elif vox.dtype != np.uint8 or vox.max(initial=0) > 1:
            if not np.all((vox == 0) | (vox == 1)):
                raise ValueError(
                    "voxels must be 0/1 occupancy for the GPU loader (a custom transform "
                    f"made values other than 0 and 1, dtype {vox.dtype})"
                )
            vox = vox.astype(np.uint8)
        out: dict[str, np.ndarray] = {"voxels": np.ascontiguousarray(vox)}
        n = None
        for name in (*RAY_OUTPUTS, "view_positions"):
            arr = np.ascontiguousarray(_to_numpy(sample[name]), dtype=OUTPUT_DTYPES[name])
            want_2d = name in ("origins", "directions", "view_positions")
            if arr.ndim != (2 if want_2d else 1) or (want_2d and arr.shape[1] != 3):
                raise ValueError(f"{name!r} has shape {arr.shape}")
            if name in RAY_OUTPUTS:
                if n is None:
                    n = arr.shape[0]
                elif arr.shape[0] != n:
                    raise ValueError(f"{name!r} has {arr.shape[0]} rows, 'origins' has {n}")
            out[name] = arr
        side = int(max(vox.shape))
        meta = [index, epoch, int(sample["level"]), side, replaced]
        out["meta"] = np.array(meta, dtype=np.int64)
        return tuple(out[name] for name in OUTPUT_NAMES)
