"""One pass of a ``GPURayLoader`` at a time: :class:`LoaderPass`, the iterator ``iter(loader)``
gives.

The rule (every store and back end): a new ``iter(loader)`` ends the pass in progress before
its own starts. Ending a pass closes its chain of generators (the source's, the skip
ledger's), so its workers, threads and pipeline state are released or reset exactly as at
the end of a pass, and the new pass reads its own epoch from its first batch: nothing of the
old pass's read-ahead comes into it. The old iterator's next ``next()`` raises
:class:`~gpuloader.errors.PassEndedError` naming why (``loader.close()`` ends a pass too).
An iterator the caller dropped is simply closed (the loader holds it weakly).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from gpuloader.errors import PassEndedError

__all__ = ["NEW_PASS", "LoaderPass"]

#: why a pass ended when a new one started
NEW_PASS = "a new iter(loader) started; one pass at a time per loader"


class LoaderPass(Iterator[dict[str, Any]]):
    """The batches of one pass, counted (module doc).

    Args:
        it: the pass's batches (a generator chain; closed when the pass ends).
        pos: ``[epoch, batches yielded]``, advanced by one per batch handed out.
        on_done: called once when the epoch's last batch was handed out.
    """

    def __init__(
        self, it: Iterator[dict[str, Any]], pos: list[int], on_done: Callable[[], None]
    ) -> None:
        self.pos = pos
        self._it: Iterator[dict[str, Any]] | None = it
        self._on_done = on_done
        self.ended: str | None = None  #: why the pass was ended (None: not ended)

    def __iter__(self) -> LoaderPass:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.ended is not None:
            raise PassEndedError(
                f"GPURayLoader: this pass (epoch {self.pos[0]}) was ended after "
                f"{self.pos[1]} batches: {self.ended}"
            )
        if self._it is None:
            raise StopIteration
        try:
            batch = next(self._it)
        except StopIteration:
            self._release()
            self._on_done()
            raise
        except BaseException:
            self._release()  # a generator that raised is finished
            raise
        self.pos[1] += 1
        return batch

    def end(self, why: str) -> None:
        """End the pass: its generators closed, the next ``next()`` raises
        :class:`~gpuloader.errors.PassEndedError` naming ``why``. No-op once finished."""
        if self._it is not None:
            self.ended = why
            self._release()

    def close(self) -> None:
        """Close the pass's generators (as a generator's ``close``); later ``next()`` stops."""
        self._release()

    def _release(self) -> None:
        it, self._it = self._it, None
        close = getattr(it, "close", None)
        if close is not None:
            close()

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass
