"""lcsc-ops: turn the checkpoints a training run already saves into a better model.

Public API for users' own training loops::

    from lcsc_ops import CheckpointLogger, ModelSpec

and for using a registered merge::

    gen = lcsc_ops.load("models:/<name>@champion")  # gen.model: your nn.Module
    images = gen.sample(16, seed=0)                 # (16, C, H, W) in [-1, 1]
"""
from lcsc_ops.errors import LcscError
from lcsc_ops.spec import ModelSpec

__version__ = "0.1.0"
__all__ = ["CheckpointLogger", "LcscError", "ModelSpec", "__version__", "load"]


def __getattr__(name: str):
    # CheckpointLogger imports mlflow lazily, so the math and evaluation layers import without it.
    if name == "CheckpointLogger":
        from lcsc_ops.store.logger import CheckpointLogger

        return CheckpointLogger
    raise AttributeError(name)


def load(model_uri: str, *, device: str = "cpu", batch_size: int = 64, tracking_uri: str | None = None):
    """A registered lcsc-ops model (``"models:/<name>@champion"``, ``"models:/<name>/3"``, ...) with
    its spec's sampler: ``.model`` is the user's ``nn.Module``, ``.sample(num_samples, seed=0)``
    returns float32 images (N, C, H, W) in [-1, 1] on the CPU, the ones the FID evaluator
    samples for that seed. Imports mlflow only when called."""
    from lcsc_ops.store.pyfunc import load as load_generator

    return load_generator(model_uri, device=device, batch_size=batch_size, tracking_uri=tracking_uri)
