"""Weight files other tools wrote, read safely: plain data, no tracking library.

Every reader of a foreign checkpoint (a Lightning ``.ckpt``, a ``torch.save`` dict, a
transformers ``model.safetensors``) goes through three steps here:

1. :func:`load_torch_file`: ``torch.load(weights_only=True)`` first; a file that needs full
   unpickling (arbitrary code on load) is refused with one line naming what it would import,
   unless the user passed the pickle/trust option (``allow_pickle``).
2. :func:`weight_states`: the raw and EMA state dicts inside what was loaded (Lightning's
   ``state_dict`` / ``current_model_state`` under ``WeightAveraging``, ema-pytorch's
   ``ema_model.`` / ``online_model.``, timm's ``state_dict_ema``, plain or nested dicts).
3. :func:`apply_key_prefix`: the keys mapped onto the model's, the prefix found by
   :func:`find_key_prefix` against the factory's state dict (built on the meta device by the
   caller, :func:`lcsc_ops.layouts.spec_layout`): exactly one prefix that maps the keys is used;
   several or none is one error line naming the candidates and ``--key-prefix``.
"""
from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch

from lcsc_ops.errors import LcscError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile
_PLAIN_MODULES = ("torch", "collections", "builtins", "copyreg", "_codecs")  # what a pickled state dict needs
# Where a checkpoint dict keeps its weights, by kind, in the order tried (the first holding tensors wins).
# Lightning's WeightAveraging saves the average in ``state_dict`` and the live weights in
# ``current_model_state``; timm keeps its EMA in ``state_dict_ema``.
RAW_KEYS = ("current_model_state", "state_dict", "model_state_dict", "model", "module", "net")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
_AVERAGED = ("current_model_state",)  # present: ``state_dict`` holds the average (Lightning WeightAveraging)
# ema-pytorch's EMA module: its average under ``ema_model.``, a copy of the live model under ``online_model.``.
EMA_PYTORCH = ("ema_model.", "online_model.")
PICKLE_HINT = "--allow-pickle"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_quietly(path: Path, **kwargs: Any) -> Any:
    """``torch.load`` without its warnings (e.g. on the pickle protocol of a plain pickle file): the
    verdict on the file is the one line the user gets."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", **kwargs)


def load_torch_file(path: Path, allow_pickle: bool, *, name: str | None = None, hint: str = PICKLE_HINT) -> Any:
    """What ``torch.save`` wrote to ``path``, loaded with ``weights_only=True``; a file that needs full
    unpickling is an LcscError naming what it would import (``hint``: the option that allows it),
    loaded fully only with ``allow_pickle``. ``name``: the file as the user knows it."""
    name = name or path.name
    mmap = zipfile.is_zipfile(path)  # torch.save's zip format maps lazily: reading a layout reads no weights
    try:
        return _load_quietly(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if not allow_pickle:
            raise _refusal(path, name, exc, zipped=mmap, hint=hint) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise LcscError(f"cannot read {name}: {first_line(exc)}") from None
    try:
        return _load_quietly(path, weights_only=False)
    except Exception as exc:  # whatever a foreign pickle raises, the user gets one line
        raise LcscError(f"cannot read {name}: {type(exc).__name__}: {first_line(exc)}") from None


def _refusal(path: Path, name: str, exc: pickle.UnpicklingError, zipped: bool, hint: str) -> LcscError:
    """Why a file that ``weights_only`` refused is not loaded: what it would import, or that it is
    no pickle at all (then the pickle option would not help)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    named = found.group(1) if found else None
    scanned = None if zipped else _pickled_global(path)  # a plain pickle: torch names no global, or a torch one
    if scanned is None and named is None and not zipped:
        return LcscError(f"cannot read {name}: neither a torch checkpoint nor a pickle")
    if scanned and (named is None or scanned.split(".")[0] not in _PLAIN_MODULES):
        named = scanned
    what = f" (it references {named})" if named else ""
    return LcscError(f"refusing to unpickle {name}: it needs full unpickling{what}; pass {hint} if you trust it")


def _pickled_global(path: Path) -> str | None:
    """What a plain pickle file would import on loading (its first global outside torch and the
    standard containers, else its first global; ``""`` for none), read without running anything;
    None when the file is not a pickle at all."""
    found: list[str] = []
    strings: list[str | None] = []  # the strings pushed so far (memo fetches included), newest last
    memo: dict[int, str | None] = {}
    top: str | None = None  # the value just pushed, when it is a string
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                name, pushed = op.name, None
                if "UNICODE" in name:
                    pushed = arg
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed = memo.get(arg)
                elif name == "MEMOIZE":
                    memo[len(memo)] = top
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = top
                elif name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif name == "STACK_GLOBAL" and len(strings) >= 2 and None not in strings[-2:]:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                if "UNICODE" in name or name.endswith("GET"):
                    strings.append(pushed)
                if name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "FRAME"):
                    top = pushed
                if found and found[-1].split(".")[0] not in _PLAIN_MODULES:
                    return found[-1]
    except Exception:  # pickletools raises ValueError and friends on bytes that are no pickle
        return None
    return found[0] if found else ""


def strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the prefixes every key shares from DDP (``module.``) or ``torch.compile``."""
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def tensors_of(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor entries of a state dict (or of a module's); non-tensors beside the weights dropped."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _first_holding_tensors(obj: Mapping, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for key in keys:
        found = tensors_of(obj.get(key))
        if found:
            return found
    return {}


def _split_ema_pytorch(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """ema-pytorch's ``EMA`` inside a state dict: keys ``<p>ema_model.*`` are the EMA, ``<p>online_model.*``
    a copy of the live model (dropped when the live model is there too)."""
    ema = {k: v for k, v in state.items() if EMA_PYTORCH[0] in k}
    if not ema:
        return {"raw": state}
    online = {k: v for k, v in state.items() if EMA_PYTORCH[1] in k}
    rest = {k: v for k, v in state.items() if k not in ema and k not in online}
    raw = rest or {k.replace(EMA_PYTORCH[1], "", 1): v for k, v in online.items()}
    ema = {k.replace(EMA_PYTORCH[0], "", 1): v for k, v in ema.items()}
    return {"raw": raw, "ema": ema} if raw else {"ema": ema}


def weight_states(obj: Any, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{"raw": state, "ema": state}`` (either may be absent) inside a loaded checkpoint: a state
    dict, a module, or a training script's dict (Lightning, timm, ema-pytorch, ``{"model", "ema"}``).
    Keys keep their prefixes (see :func:`find_key_prefix`), wrappers stripped. LcscError if it
    holds no tensors."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise LcscError(f"{name} holds a {type(obj).__name__}, not a state dict")
    raw = _first_holding_tensors(obj, RAW_KEYS)
    ema = _first_holding_tensors(obj, EMA_KEYS)
    if any(tensors_of(obj.get(k)) for k in _AVERAGED):
        ema = tensors_of(obj.get("state_dict"))  # WeightAveraging: the average replaced the live weights
    if not raw and not ema:
        raw = tensors_of(obj)  # a plain state dict
    states = _split_ema_pytorch(raw) if raw else {}
    if ema:
        states["ema"] = ema
    states = {kind: strip_wrappers(s) for kind, s in states.items() if s}
    if not states:
        raise LcscError(f"{name} holds no tensors")
    return states


def prefix_candidates(keys: list[str] | set[str], model_keys: list[str] | set[str]) -> dict[str, int]:
    """Each prefix ``p`` under which some of the model's keys appear in ``keys`` (``p + key``), with
    how many of the model's keys it maps: a prefix mapping all of them fits."""
    keys, counts = set(keys), {}
    for m in model_keys:
        for k in keys:
            if k.endswith(m) and (len(k) == len(m) or k[len(k) - len(m) - 1] == "."):
                p = k[:len(k) - len(m)]
                counts[p] = counts.get(p, 0) + 1
    return counts


def find_key_prefix(keys: list[str] | set[str], model_keys: list[str] | set[str], given: str | None, name: str,
                    option: str = "--key-prefix") -> str:
    """The prefix that maps a file's ``keys`` onto the model's: ``given`` if the user named one (checked),
    else the one prefix under which every model key is found; several or none is one LcscError listing
    the candidates and ``option``."""
    keys, model_keys = set(keys), set(model_keys)
    if given is not None:
        missing = sorted(k for k in model_keys if given + k not in keys)
        if missing:
            raise LcscError(f"{name}: {option} {given!r} does not map the model's key {missing[0]!r} "
                            f"({len(missing)} of {len(model_keys)} not found)")
        return given
    counts = prefix_candidates(keys, model_keys)
    full = sorted(p for p, n in counts.items() if n == len(model_keys))
    if len(full) == 1:
        return full[0]
    if full:
        listed = ", ".join(repr(p) for p in full)
        raise LcscError(f"{name}: several key prefixes map the model's keys ({listed}); pass {option} to choose")
    best = sorted(counts, key=lambda p: -counts[p])[:3]
    listed = ", ".join(f"{p!r} ({counts[p]} of {len(model_keys)})" for p in best) or "none"
    top = best[0] if best else ""
    strays = sorted(k for k in keys if not (k.startswith(top) and k[len(top):] in model_keys))
    example = f"key {strays[0]!r} is not in the model" if strays else "its keys do not match the model's"
    raise LcscError(f"{name}: {example}, and no key prefix maps its keys onto the model's (candidates: "
                    f"{listed}); check --factory/--factory-kwargs or pass {option}")


def apply_key_prefix(state: Mapping[str, Any], prefix: str, model_keys: list[str] | set[str]) -> dict[str, Any]:
    """The model's keys taken from ``state`` under ``prefix`` (other entries, e.g. a loss's buffers, dropped)."""
    return {k: state[prefix + k] for k in model_keys if prefix + k in state}


def all_finite(t: torch.Tensor) -> bool:
    """Whether floating ``t`` holds no NaN or inf. A sum first (one pass at memory speed, no
    temporary; ``isfinite().all()`` costs 20-40x more): NaN and inf survive a sum, so a finite sum
    proves every element finite; only a sum that overflowed, or a tensor with NaN/inf, is checked
    element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_states(name: str, state: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """LcscError unless ``state`` holds every key of the model (``shapes``: key -> shape), each with
    its shape, all finite."""
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise LcscError(f"{name}: the model's key {missing[0]!r} is missing ({len(missing)} missing keys)")
    for key, shape in shapes.items():
        t = state[key]
        if tuple(t.shape) != tuple(shape):
            raise LcscError(f"{name}: {key!r} has shape {tuple(t.shape)}, the model's is {tuple(shape)}")
        if t.is_floating_point() and not all_finite(t):
            raise LcscError(f"{name}: tensor {key!r} holds NaN or inf")
