"""The loader's setup as one value: device, back end, store, source, and why.

``GPURayLoader`` reduces its arguments to a :class:`LoaderSetup` (as ``DataLoader`` reduces
its own to a sampler and a collate):

* the transform split (:func:`known_segments`): custom CPU callables first (run per sample
  in the reader), then the known transforms, as the runs that ``Compose`` fuses;
* the device (:func:`resolve_device`): ``"auto"`` is ToDevice's target if the transform has
  one, else CUDA when torch and CuPy can use it (:func:`cuda_usable`), else the CPU;
* the back end (:func:`choose_backend`): DALI when it is installed, there are workers and the
  reader can be pickled for spawned workers, else the torch DataLoader (with a warning where
  the caller asked for ``"auto"``);
* the store and why (:func:`choose_store`): a store the caller filled, ``"gpu"``/``"host"``
  when the split fits the budget (``gpuloader.stores.budget.choose_store``), else
  ``"striped"`` over a striped pack, else ``"stream"``; a transform a resident store cannot
  take (custom callables, several fused runs) streams; ``"striped"`` asked for over anything
  but a striped pack is refused;
* the source that follows: ``"resident"`` (a store), ``"pack"`` (whole batches from a pack:
  ``store="stream"`` over a PackedRayStore with one fused run), ``"striped"`` (each epoch's
  stripes of a striped pack resident: :mod:`gpuloader.loading.sources.striped`) or
  ``"samples"`` (the per-sample reader).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpuloader.augment.transforms import Compose, Transform, split_for_device
from gpuloader.dataset.view import DatasetView
from gpuloader.errors import UnsupportedTransformError
from gpuloader.reading.headers import estimate_layout
from gpuloader.reading.pipeline import dali_available
from gpuloader.reading.reader import RayReader
from gpuloader.stores.budget import choose_store as choose_by_budget
from gpuloader.stores.layout import StoreLayout, store_bytes, take_layout
from gpuloader.stores.pack import PackedRayStore
from gpuloader.stores.resident import ResidentStore

__all__ = [
    "LoaderSetup",
    "choose_backend",
    "choose_setup",
    "choose_store",
    "cuda_usable",
    "known_segments",
    "resolve_device",
]

_warned_no_dali = False


@dataclass(frozen=True)
class LoaderSetup:
    """What a loader was set up to do (module doc).

    Attributes:
        device: the torch device of the batches.
        backend: "dali" or "torch".
        store: "gpu", "host", "striped" or "stream"; reason: why
            (``GPURayLoader.store_reason``).
        source: "resident", "pack", "striped" or "samples".
        layout: the split's layout estimated from headers while choosing (None when not).
        fusable: the transform is one fused run of known transforms (a store can take it).
        segments: the known segments (one tuple of transforms per fused run).
        cpu_transforms: the custom callables, run per sample in the reader.
    """

    device: torch.device
    backend: str
    store: str
    reason: str
    source: str
    layout: StoreLayout | None
    fusable: bool
    segments: tuple[tuple[Transform, ...], ...]
    cpu_transforms: tuple[Callable, ...]


def known_segments(transform: Callable | None) -> tuple[list[Callable], list[list[Transform]], Any]:
    """Split a transform for the loader: (custom CPU callables, known segments, ToDevice target).

    Known segments are the runs of known transforms that ``Compose`` fuses (segment ``j``
    draws with ``segment=j``), so the loader draws exactly what the CPU API draws.

    Raises:
        UnsupportedTransformError: a custom callable after a known transform.
    """
    cpu, known, target = split_for_device(transform)
    if not known:
        return cpu, [], target
    if isinstance(transform, Compose):
        segments = [list(seg) for seg in transform.segments if isinstance(seg, list)]
    else:
        segments = [list(known)]
    return cpu, segments, target


def cuda_usable() -> bool:
    """True when torch sees a CUDA device and CuPy can use one."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no working CuPy means no GPU augmentation
        return False


def resolve_device(device: Any, target: Any, owner: str = "GPURayLoader") -> torch.device:
    """The torch device of ``device`` ("auto", "cpu", "cuda" or "cuda:N"; ``target``: the
    transform's ToDevice target, which "auto" takes); a bare "cuda" gets torch's current one.

    Raises:
        ValueError: a malformed device, not a CPU or CUDA device, or a CUDA device this
            machine does not have; the first line names ``owner``, the argument and value.
        TypeError: not a string, int or torch.device.
    """
    what = f"device={device!r}"
    fix = "use device='cpu' or 'auto'"
    if isinstance(device, str) and device == "auto":
        if target is not None:
            what = f"device='auto' (the transform's ToDevice({target!r}))"
            device, fix = target, "change the ToDevice target, or pass device='cpu'"
        else:
            device = "cuda" if cuda_usable() else "cpu"
    allowed = "'auto', 'cpu', 'cuda' or 'cuda:N'"
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{owner}: {what} is not a device; use {allowed}")
    if isinstance(device, int):
        device = f"cuda:{device}"  # torch's meaning of a bare index
    if isinstance(device, str) and device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"{owner}: {what} is not a CPU or CUDA device; use {allowed}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{owner}: {what} is a malformed device ({exc}); use {allowed}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{owner}: {what} is not a CPU or CUDA device; use {allowed}")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"{owner}: {what} needs CUDA, but this machine has none (torch "
                f"{torch.__version__}: torch.cuda.is_available() is False); {fix}"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"{owner}: {what}: this machine has {count} CUDA device(s), cuda:0 to "
                f"cuda:{count - 1}; use one of them, 'cuda' or 'auto'"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def dali_picklable(reader: RayReader) -> bool:
    """True when DALI's pickler can send ``reader`` to spawned workers."""
    try:
        from nvidia.dali import pickling

        pickling._DaliPickle.dumps(reader)
    except Exception:  # noqa: BLE001 - any failure: the reader cannot go to spawned workers
        return False
    return True


def choose_backend(
    backend: str,
    num_workers: int,
    start_method: str,
    reader: Callable[[], RayReader],
    stacklevel: int = 2,
) -> str:
    """The back end for ``backend`` ("auto", "dali" or "torch"): "dali" or "torch" (module doc).

    Args:
        reader: makes the per-sample reader (only to check that it pickles).
        stacklevel: of the warnings (``warnings.warn``'s: 2 is this function's caller).

    Raises:
        ImportError: "dali" without DALI. ValueError: "dali" without workers.
        UnsupportedTransformError: "dali" with a reader that cannot be pickled.
    """
    global _warned_no_dali
    if backend == "torch":
        return "torch"
    if not dali_available():
        if backend == "dali":
            raise ImportError(
                "backend='dali' needs NVIDIA DALI (pip install nvidia-dali-cuda120); "
                "or use backend='torch'"
            )
        if not _warned_no_dali:
            _warned_no_dali = True
            warnings.warn(
                "GPURayLoader: NVIDIA DALI is not installed; reading with a torch "
                "DataLoader instead (pip install nvidia-dali-cuda120 for the DALI reader)",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
        return "torch"
    if num_workers < 1:
        if backend == "dali":
            raise ValueError("backend='dali' needs num_workers >= 1")
        return "torch"
    if start_method == "spawn" and not dali_picklable(reader()):
        msg = (
            "GPURayLoader: the reader (dataset or a custom CPU transform) cannot be "
            "pickled for DALI's spawned workers"
        )
        if backend == "dali":
            raise UnsupportedTransformError(
                msg + "; define custom transforms at module level, or use backend='torch'"
            )
        warnings.warn(msg + "; reading with a torch DataLoader instead", stacklevel=stacklevel)
        return "torch"
    return "dali"


def choose_store(
    store: Any,
    dataset: Any,
    sampler: Any,
    device: torch.device,
    cpu: list,
    segments: list,
    on_error: str,
    held: np.ndarray | None = None,
    gpu_budget: float | int | None = None,
    host_budget: float | int | None = None,
) -> tuple[str, str, StoreLayout | None, bool]:
    """Where the split lives and why (module doc): ``(store, reason, layout, fusable)``.

    Args:
        store: the loader's ``store`` argument ("auto", "gpu", "host", "striped", "stream"
            or a ResidentStore).
        dataset: the dataset (sized from its headers when a budget decides).
        sampler: the loader's sampler (the samples its rank uses).
        cpu, segments: :func:`known_segments`' custom callables and known segments.
        held: the samples this rank's store holds (``shard_store``), or None for all.

    Raises:
        UnsupportedTransformError: a resident store asked for with a transform it cannot take.
        ValueError: a bad ``store``; a GPU store without CUDA; a caller's store that lacks
            samples this rank uses; "striped" over anything but a striped pack.
    """
    fusable = not cpu and len(segments) <= 1
    why_not = (
        "custom callables in the transform run per sample"
        if cpu
        else "the transform has several fused runs"
    )
    if isinstance(store, ResidentStore):
        if not fusable:
            raise UnsupportedTransformError(
                f"a resident store needs a transform of known transforms only ({why_not}); "
                "use store='stream'"
            )
        if store.location == "gpu" and device.type != "cuda":
            raise ValueError("a GPU-resident store needs device='cuda'")
        need = sampler.shard_indices()
        if store.held is not None and not np.isin(need, store.held).all():
            raise ValueError(
                "the store holds only part of the split (fill_store(indices=...)), not "
                f"every sample this rank's batches use ({len(need)} samples); fill it with "
                "indices=loader.sampler.shard_indices() of the same rank and world size"
            )
        return store.location, "a store filled by the caller", None, fusable
    if store not in ("auto", "gpu", "host", "stream", "striped"):
        raise ValueError(
            "store must be 'auto', 'gpu', 'host', 'stream', 'striped' or a ResidentStore; "
            f"got {store!r}"
        )
    if store == "stream":
        return "stream", "asked for", None, fusable
    striped = _striped_pack(DatasetView.of(dataset).ray_store)
    if store == "striped":
        if not striped:
            raise ValueError(
                "store='striped' needs a striped ray pack as the dataset's ray_store; build "
                "one with `gpuloader pack RAY_DIR OUT --layout striped` and pass "
                "ray_store=PackedRayStore(OUT) (or use store='stream')"
            )
        if not fusable:
            raise UnsupportedTransformError(
                f"store='striped' builds whole batches from known transforms, but {why_not}"
                "; use store='stream', or move the custom step out"
            )
        return "striped", "asked for", None, fusable
    if not fusable:
        if store != "auto":
            raise UnsupportedTransformError(
                f"store={store!r} builds whole batches from known transforms, but {why_not}"
                "; use store='stream' (or 'auto'), or move the custom step out"
            )
        return "stream", why_not, None, fusable
    if store == "gpu" and device.type != "cuda":
        raise ValueError(f"store='gpu' needs a CUDA device; the loader's device is {device}")
    layout = estimate_layout(dataset, on_error)
    nbytes = store_bytes(layout if held is None else take_layout(layout, held))
    if store != "auto":
        return store, f"asked for ({nbytes / 2**20:.1f} MiB)", layout, fusable
    name, reason = choose_by_budget(nbytes, device, gpu_budget, host_budget)
    if name == "stream" and striped:
        more = ": streaming the striped pack's stripes (one sequential read per level and epoch)"
        name, reason = "striped", reason.replace(": streaming", more)
    return name, reason, layout, fusable


def choose_setup(
    *,
    dataset: Any,
    sampler: Any,
    device: torch.device,
    cpu: list,
    segments: list,
    backend: str,
    store: Any,
    num_workers: int,
    start_method: str,
    on_error: str,
    ray_budget: int | None,
    held: np.ndarray | None = None,
    gpu_budget: float | int | None = None,
    host_budget: float | int | None = None,
) -> LoaderSetup:
    """The back end, store and source of a loader (module doc), with the resolved
    ``device`` and the transform split (:func:`known_segments`) as one value.

    ``dataset`` is the caller's dataset (sized from its headers); the reader is built over
    ``sampler.dataset`` (the loader's view) to check that it pickles. Warnings point at the
    caller of the caller (``GPURayLoader(...)``). Raises what :func:`choose_backend` and
    :func:`choose_store` raise.
    """

    def reader() -> RayReader:
        return RayReader(
            sampler.dataset,
            sampler,
            cpu_transforms=cpu,
            ray_budget=ray_budget,
            batch_size=sampler.subvolumes_per_batch,
        )

    backend = choose_backend(backend, num_workers, start_method, reader, stacklevel=4)
    name, reason, layout, fusable = choose_store(
        store, dataset, sampler, device, cpu, segments, on_error, held, gpu_budget, host_budget
    )
    if name in ("host", "gpu"):
        source = "resident"
    elif name == "striped":
        source = "striped"
    elif fusable and _rows_pack(DatasetView.of(dataset).ray_store):
        source = "pack"
        reason += "; whole batches from the pack"
    else:
        source = "samples"
    return LoaderSetup(
        device=device,
        backend=backend,
        store=name,
        reason=reason,
        source=source,
        layout=layout,
        fusable=fusable,
        segments=tuple(tuple(s) for s in segments),
        cpu_transforms=tuple(cpu),
    )


def _striped_pack(store: object) -> bool:
    """A pack of the striped layout (``store="striped"`` streams its stripes)."""
    return isinstance(store, PackedRayStore) and store.layout == "striped"


def _rows_pack(store: object) -> bool:
    """A pack of the ordinary (rows) layout: the pack stream gathers whole batches from it. A
    striped pack is read per sample here (its streaming store is its own source)."""
    return isinstance(store, PackedRayStore) and store.layout == "rows"
