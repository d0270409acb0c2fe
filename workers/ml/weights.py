"""Loading checkpoints without running code: every `torch.load` is weights-only (tensors and plain containers).

A pickle can name any callable to run while it loads (its `__reduce__`), so a checkpoint file planted in storage, or
a weights file passed on the command line, would otherwise execute whatever it carries in a worker. Our own loads pass
``weights_only=True``; third-party loaders that pass ``weights_only=False`` themselves (torch-fidelity's Inception
weights) are overridden by torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which workers set for their whole process tree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shared.errors import UserError

#: torch reads this on every `torch.load`: when true, weights_only=True whatever the caller passed.
FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def force_weights_only() -> None:
    """Make every later `torch.load` in this process (and its children) weights-only, third-party ones included."""
    os.environ[FORCE_ENV] = "1"


def load_weights(path: str | Path, what: str = "checkpoint") -> Any:
    """`torch.load(path)` onto the CPU, weights only; a file that needs code to load is refused in one line."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise UserError(f"{what} {path} does not exist: pass an existing file") from e
    except Exception as e:  # UnpicklingError for code, RuntimeError/EOFError for a damaged or foreign file
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} was refused: it is not a plain-tensor checkpoint ({first}); "
                        "load only files written by this project's training") from e
