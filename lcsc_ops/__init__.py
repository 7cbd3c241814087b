"""lcsc-ops: turn the checkpoints a training run already saves into a better model.

Public API for users' own training loops::

    from lcsc_ops import CheckpointLogger, ModelSpec
"""
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec

__version__ = "0.1.0"
__all__ = ["CheckpointLogger", "LcscError", "ModelSpec", "__version__"]


def __getattr__(name: str):
    # CheckpointLogger imports mlflow lazily, so the math and evaluation layers import without it.
    if name == "CheckpointLogger":
        from lcsc_ops.store.logger import CheckpointLogger

        return CheckpointLogger
    raise AttributeError(name)
