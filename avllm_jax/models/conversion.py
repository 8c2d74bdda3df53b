"""Hugging Face checkpoints into our parameter trees: reading tensors and configs, mapping names.

Each model file defines a table of `Rule`s. A rule's regex full-matches an HF tensor name;
its target is the dotted path of our parameter, and may use the regex's named groups
(`{stage}`). A regex with a named group `layer` stacks the matching tensors along a
leading axis, in the order of that index, for our scanned layers. A target of None drops
the tensor on purpose (e.g. the text tower of a CLAP checkpoint).

Every tensor must match a rule, every parameter of ours must be filled, and every shape
must agree, else `ConversionError` names the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

from avllm_jax.errors import AvllmError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_INDEX = "pytorch_model.bin.index.json"


class ConversionError(AvllmError, ValueError):
    """A checkpoint that does not fit the model: the message names the tensor."""


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    target: str | None
    transform: Callable[[np.ndarray], np.ndarray] = lambda x: x


def transpose(x: np.ndarray) -> np.ndarray:
    """torch Linear [out, in] -> our kernel [in, out]."""
    return x.T


def config_from_hf(cls, fields: dict, overrides: dict):
    """`cls(**fields)` with `overrides` winning: `fields` are read from an HF config, and an
    override may name any field of the dataclass `cls`, read from the config or not."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(unknown)}; it has {', '.join(sorted(known))}")
    return cls(**(fields | overrides))


def checkpoint_files(directory: str | os.PathLike, *, allow_pickle: bool = False) -> list[str]:
    """The weight files of an HF checkpoint directory: safetensors (single or sharded) first."""
    directory = os.fspath(directory)
    for index_name, single_name, is_pickle in (
        (SAFETENSORS_INDEX, "model.safetensors", False),
        (PYTORCH_INDEX, "pytorch_model.bin", True),
    ):
        index_path = os.path.join(directory, index_name)
        single_path = os.path.join(directory, single_name)
        if os.path.exists(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            paths = [os.path.join(directory, name) for name in files]
        elif os.path.exists(single_path):
            paths = [single_path]
        else:
            continue
        if is_pickle and not allow_pickle:
            raise ConversionError(
                f"{directory} holds only PyTorch pickle weights ({os.path.basename(paths[0])}); "
                "pickles can run code when loaded. Pass --allow-pickle to read them with "
                "torch.load(weights_only=True), or convert them to safetensors first."
            )
        for path in paths:
            if not os.path.exists(path):
                raise ConversionError(f"{path} is listed in the index of {directory} but does not exist")
        return paths
    raise ConversionError(
        f"no model.safetensors, {SAFETENSORS_INDEX}, pytorch_model.bin or {PYTORCH_INDEX} in {directory}"
    )


def iterate_tensors(paths: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32/int numpy array) for every tensor in the files, one at a time."""
    for path in paths:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="numpy") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            import torch  # only for --allow-pickle checkpoints

            state = torch.load(path, map_location="cpu", weights_only=True)
            for name, tensor in state.items():
                if tensor.dtype == torch.bfloat16:
                    tensor = tensor.float()
                yield name, tensor.numpy()


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{directory} has no config.json")
    with open(path) as f:
        return json.load(f)


def convert_tensors(
    tensors: Iterable[tuple[str, np.ndarray]],
    rules: list[Rule],
    expected_shapes: Mapping[str, tuple[int, ...]],
    *,
    dtype=np.float32,
    source: str = "checkpoint",
) -> dict[str, np.ndarray]:
    """Maps HF tensors to a flat {our dotted path: array} dict with the expected shapes.

    `expected_shapes` is our model's flat {path: shape}, e.g. from `flat_shapes(abstract_state)`.
    """
    compiled = [(re.compile(rule.pattern), rule) for rule in rules]
    single: dict[str, np.ndarray] = {}
    stacked: dict[str, dict[int, np.ndarray]] = {}
    hf_name_of: dict[str, str] = {}
    for name, array in tensors:
        for regex, rule in compiled:  # noqa: B007 (the matching rule is read after the loop)
            match = regex.fullmatch(name)
            if match:
                break
        else:
            raise ConversionError(f"unexpected tensor {name!r} in {source}: no rule maps it")
        if rule.target is None:
            continue
        groups = match.groupdict()
        target = rule.target.format(**groups)
        if target not in expected_shapes:
            raise ConversionError(f"tensor {name!r} in {source} maps to {target!r}, which the model does not have")
        value = np.asarray(rule.transform(array)).astype(dtype)
        hf_name_of.setdefault(target, rule.pattern)
        if "layer" in groups:
            layers = stacked.setdefault(target, {})
            layers[int(groups["layer"])] = value
        else:
            single[target] = value
        _check_shape(name, value.shape, expected_shapes[target], "layer" in groups, source)
    for target, layers in stacked.items():
        num_layers = expected_shapes[target][0]
        missing = sorted(set(range(num_layers)) - set(layers))
        extra = sorted(set(layers) - set(range(num_layers)))
        if missing or extra:
            what = f"missing layers {missing}" if missing else f"unexpected layers {extra}"
            raise ConversionError(f"{source}: {what} for tensors matching {hf_name_of[target]!r} ({target})")
        single[target] = np.stack([layers[i] for i in range(num_layers)])
    missing_targets = sorted(set(expected_shapes) - set(single))
    if missing_targets:
        raise ConversionError(
            f"{source} is missing tensors for {len(missing_targets)} parameter(s): "
            + ", ".join(f"{t} (HF name like {_pattern_for(t, rules)!r})" for t in missing_targets[:10])
        )
    return single


def _pattern_for(target: str, rules: list[Rule]) -> str:
    for rule in rules:
        if rule.target is not None and re.sub(r"\{\w+\}", "*", rule.target) == re.sub(r"\d+", "*", target):
            return rule.pattern
        if rule.target == target:
            return rule.pattern
    return "?"


def _check_shape(name, shape, expected, stacked, source):
    expected = tuple(expected[1:]) if stacked else tuple(expected)
    if tuple(shape) != expected:
        raise ConversionError(
            f"tensor {name!r} in {source} has shape {tuple(shape)} (after conversion), expected {expected}"
        )


def flat_shapes(state) -> dict[str, tuple[int, ...]]:
    """{dotted path: shape} of an nnx.State (abstract or concrete)."""
    from flax import nnx

    return {".".join(map(str, path)): tuple(leaf.shape) for path, leaf in nnx.to_flat_state(state)}


def load_into(model, flat_arrays: Mapping[str, np.ndarray]) -> None:
    """Writes {dotted path: array} into an nnx module's parameters in place."""
    import jax.numpy as jnp
    from flax import nnx

    state = nnx.state(model)
    flat = {".".join(map(str, path)): (path, leaf) for path, leaf in nnx.to_flat_state(state)}
    for name, array in flat_arrays.items():
        _, variable = flat[name]
        variable.set_value(jnp.asarray(array, dtype=variable.get_value().dtype))
    nnx.update(model, state)


def tensor_shapes(paths: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor in the files, without reading the data."""
    shapes = {}
    for path in paths:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="numpy") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            shapes.update({name: tuple(tensor.shape) for name, tensor in state.items()})
    return shapes
