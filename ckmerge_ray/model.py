"""The model a worker holds: built from a config, checked against a checkpoint, laid out flat.

A trial worker (`trial.py`) and an evaluator actor (`evaluator.py`) each build one causal LM per
run without random init, and merges write every weight. This module knows transformers and
torch, not Ray Tune: it is what both kinds of worker share.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Dict, List, Optional, Tuple

import torch

from ckmerge_ray.errors import CheckpointError
from ckmerge_ray.store import Layout


def dtypes_of(info) -> Dict[str, str]:
    """Tensor name -> dtype name (``"bfloat16"``) of a `CheckpointInfo`."""
    return {n: str(s.dtype).replace("torch.", "") for n, s in info.specs.items()}


def model_dtype(model_config: Dict, dtypes: Dict[str, str]) -> torch.dtype:
    """The dtype `from_pretrained` gives every weight (transformers 5, ``dtype="auto"``): the
    config's ``dtype`` (or ``torch_dtype``), else the first floating tensor's in file order. A
    bf16 checkpoint with fp32 norms so becomes an all-bf16 model, as transformers loads it."""
    name = model_config.get("dtype") or model_config.get("torch_dtype")
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    for d in dtypes.values():
        if getattr(torch, d).is_floating_point:
            return getattr(torch, d)
    return torch.float32


def model_configuration(model_config: Dict, code_dir: Optional[str] = None):
    """The transformers config object: built-in architectures from the dict; a model whose code
    ships with the checkpoint from that directory (only when the user opted in: `code_dir`)."""
    from transformers import AutoConfig

    if code_dir is not None:
        return AutoConfig.from_pretrained(code_dir, trust_remote_code=True)
    config = dict(model_config)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def build_model(model_config: Dict, dtypes: Dict[str, str], device: torch.device | str = "cpu",
                code_dir: Optional[str] = None):
    """A causal LM from its config with uninitialized weights, in the dtype `from_pretrained`
    would give it (`model_dtype`; the merge casts stored tensors of another dtype the same way).
    `code_dir`: the checkpoint directory whose own modeling code may run (trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    cfg = model_configuration(model_config, code_dir)
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(
            cfg, trust_remote_code=code_dir is not None, dtype=model_dtype(model_config, dtypes)
        )
    model.tie_weights()  # skipped by no_init_weights; shared embeddings must be one tensor
    model.eval().requires_grad_(False)
    return model.to(device)


def import_model_code(model_config: Dict, code_dir: Optional[str] = None) -> None:
    """Import the architecture's modeling code (what `build_model` would import first), so that
    memory measured after this counts the model's weights, not transformers' code."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        MODEL_FOR_CAUSAL_LM_MAPPING[type(model_configuration(model_config, code_dir))]
    except (KeyError, ValueError):
        pass  # not a built-in causal LM (or its own code): build_model imports it


def tensor_map(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State-dict names to the model's own tensors; tied weights appear under every name."""
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def check_model_covers(model: torch.nn.Module, names, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Every checkpoint tensor must exist in the model with its shape, and every parameter
    must be written by some checkpoint tensor (directly or through a tied weight)."""
    tensors = tensor_map(model)
    unknown = [n for n in names if n not in tensors]
    if unknown:
        raise CheckpointError(
            f"checkpoint tensors unknown to {type(model).__name__}: {unknown[:3]}"
            f"{' ...' if len(unknown) > 3 else ''}"
        )
    for n in names:
        if tuple(tensors[n].shape) != tuple(shapes[n]):
            raise CheckpointError(
                f"tensor {n!r} has shape {list(shapes[n])} but {type(model).__name__} expects "
                f"{list(tensors[n].shape)}"
            )
    covered = {id(tensors[n]) for n in names}
    # Two names may hold the same Parameter object (tied weights): compare by identity.
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise CheckpointError(f"checkpoint lacks weights for parameters {missing[:3]}")


def trial_device() -> torch.device:
    """CUDA when Ray gave this worker a GPU, else CPU."""
    import ray

    if torch.cuda.is_available() and ray.is_initialized() and ray.get_gpu_ids():
        return torch.device("cuda")
    return torch.device("cpu")


def adopt_flat_layout(tensors: Dict[str, torch.Tensor],
                      layouts: List[Layout]) -> Optional[List[Dict[str, torch.Tensor]]]:
    """Move the model's tensors into one flat buffer per shard and dtype, at the offsets the
    stored shards use, so that a merge is one `torch.lerp` per buffer rather than one per tensor.

    Why: per-tensor ops cost ~5-25 µs each (dispatch, thread-pool wake-up; a kernel launch on a
    GPU), a fifth of the merge time of a 14M-parameter model on 2 CPU cores. Each tensor's old
    storage is freed before its shard's buffer is allocated, so memory does not double; the
    values are not kept (the next merge writes every tensor). Returns None, changing nothing, when
    the layouts cannot be shared: one model tensor under two checkpoint names, or dtypes that
    differ from the model's.
    """
    names = [n for layout in layouts for n in layout]
    if len({tensors[n].data_ptr() for n in names}) != len(names):
        return None
    if any(tensors[n].dtype != getattr(torch, dtype)
           for layout in layouts for n, (dtype, _, _) in layout.items()):
        return None
    flats = []
    with torch.no_grad():
        for layout in layouts:
            device = tensors[next(iter(layout))].device
            sizes: Dict[str, int] = {}
            for n, (dtype, offset, _) in layout.items():
                sizes[dtype] = max(sizes.get(dtype, 0), offset + tensors[n].numel())
                tensors[n].data = torch.empty(0, dtype=tensors[n].dtype, device=device)  # free
            buffers = {d: torch.empty(size, dtype=getattr(torch, d), device=device)
                       for d, size in sizes.items()}
            for n, (dtype, offset, shape) in layout.items():
                count = 1
                for d in shape:
                    count *= d
                tensors[n].data = buffers[dtype][offset:offset + count].view(shape)
            flats.append(buffers)
    return flats


def release_freed_memory() -> None:
    """Hand the memory an evaluation freed back to the OS. glibc keeps freed heap pages in its
    arenas, so without this a worker's footprint between trials grows to the model plus its
    largest evaluation so far (measured: up to 1.7x the model's bytes on a 134M model, 1.0x
    right after the first merge; benchmarks/trial_overhead.py)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            pass


def worker_memory_mb() -> Dict[str, float]:
    """This process's memory: peak RSS so far (counts the object-store pages it has read, which
    are shared, not copied) and USS (private memory only: the model and any temporaries)."""
    import resource

    import psutil

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"rss_peak_mb": peak_kb / 1024, "uss_mb": psutil.Process().memory_full_info().uss / 2**20}


def convert_to_model(infos, code_dir: Optional[str] = None, name_map=None) -> torch.nn.Module:
    """Build the newest checkpoint's model class on the meta device (no memory), rename every
    checkpoint's tensors to the architecture's (`checkpoints/names.py`: training state, wrapper
    prefixes, the user's `name_map`), convert them with transformers' own conversion
    (`naming.py`), and check that the newest then covers the model. Returns the meta model.
    Raises CheckpointError listing the first unexpected and missing names and a rule to fix them.
    """
    from ckmerge_ray.checkpoints.names import plan_renaming
    from ckmerge_ray.naming import known_count, plan_conversion

    with torch.device("meta"):
        model = build_model(infos[-1].config, dtypes_of(infos[-1]), device="meta",
                            code_dir=code_dir)
    for info in infos:
        renaming = plan_renaming(list(info.specs), info.config, name_map,
                                 lambda names: known_count(model, names))
        if not renaming.targets:
            raise CheckpointError(f"{info.path} holds no model weights, only training state: "
                                  f"{renaming.describe()}")
        info.apply_renaming(renaming)
        conversion = plan_conversion(model, {n: (s.shape, s.dtype) for n, s in info.specs.items()})
        if conversion.unexpected:
            raise name_mismatch(info, model, conversion.unexpected, set(conversion.targets))
        info.apply_conversion(conversion)
        info.tied = tied_names(model, info.specs)
    later = infos[-1]
    check_model_covers(model, list(later.specs), {n: s.shape for n, s in later.specs.items()})
    return model


def tied_names(model: torch.nn.Module, names) -> List[List[str]]:
    """Groups of checkpoint tensors that the model holds as one tensor (tied weights, e.g. an
    output head tied to the embedding by ``tie_word_embeddings``): they must be equal in the
    checkpoint, or the model (and `from_pretrained`) would silently keep only one of them."""
    tensors = tensor_map(model)
    groups: Dict[int, List[str]] = {}
    for n in names:
        if n in tensors:
            groups.setdefault(id(tensors[n]), []).append(n)
    return [g for g in groups.values() if len(g) > 1]


def name_mismatch(info, model: torch.nn.Module, unexpected: List[str], loaded) -> CheckpointError:
    """The error for a checkpoint whose names do not match the architecture even after
    renaming: the first unexpected and missing names and the name-map rule that would fix most."""
    from ckmerge_ray.checkpoints.names import TORCHTITAN, suggest_rule
    from ckmerge_ray.naming import first_names

    covered = {id(t) for n, t in tensor_map(model).items() if n in loaded}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    text = (f"tensor names of {info.path} do not match {type(model).__name__}"
            f"{' after ' + info.renaming.describe() if info.renaming.describe() else ''}: "
            f"unexpected {first_names(unexpected)}; missing {first_names(missing)}")
    renaming = info.renaming
    if renaming is not None and renaming.name_map:
        made = [f"{renaming.targets[n][0]!r} -> {n!r}" for n in unexpected[:2]
                if n in renaming.targets and renaming.targets[n][0] != n]
        if made:
            text += f". The name map {renaming.name_map} made {', '.join(made)}: check its 'to'"
    rule = suggest_rule(unexpected, missing)
    if rule:
        text += (f". A name-map rule that would fix most of them (YAML, --name-map FILE):\n"
                 f"rules:\n{rule}")
    elif any(TORCHTITAN.search(n) for n in unexpected):
        text += (". These look like torchtitan's Llama names: try --name-map "
                 "examples/torchtitan_llama.yaml (with --model-config for the Hugging Face "
                 "config)")
    elif renaming is None or not renaming.name_map:
        text += ". Give a name map (--name-map FILE) from these names to the architecture's"
    return CheckpointError(text)


def _no_init_weights():
    """transformers' context that skips random init (weights are overwritten by the merge)."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
