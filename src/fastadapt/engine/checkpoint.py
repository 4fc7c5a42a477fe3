"""Checkpoint I/O for the engine; the atomic, ``weights_only`` implementation lives in
:mod:`fastadapt.io` so that the data layer can share it."""

from ..io import (atomic_write_bytes, atomic_write_text, load_checkpoint, load_checkpoint_with_fallback,
                  previous_checkpoint, save_checkpoint)

__all__ = ["atomic_write_bytes", "atomic_write_text", "load_checkpoint", "load_checkpoint_with_fallback",
           "previous_checkpoint", "save_checkpoint"]
