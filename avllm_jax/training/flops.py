"""Analytic FLOPs of one training sample, for TFLOP/s and MFU in the logs.

Conventions (one multiply-add = 2 FLOPs; only matrix products are counted):

- A dense layer with P weights applied to n tokens costs 2·P·n forward. Its backward pass
  costs 2·P·n for the input gradient (needed whenever anything before it trains) and 2·P·n
  for the weight gradient (only when its weights train).
- Causal self-attention over S tokens with width D (all heads) costs 2·2·S²·D / 2 forward
  per layer (scores and weighted sum; half the pairs are masked); backward costs 2x forward.
  Bidirectional attention (encoders) counts all S² pairs.
- The encoders are frozen and run forward only. The LLM always runs its backward pass for
  the input gradients (the projectors below it train), and its weight gradients only in SFT.
- The LM head is counted like any dense layer; embeddings (a gather) are free.

So a sample of S LLM tokens with N LLM matmul weights costs (2 + 2 + 2·trainable)·N·S plus
attention, the usual 6·N·S when the LLM trains.

`hlo_matmul_flops` counts the same thing in a compiled program (the planner's compiled
figure): XLA's own cost analysis counts the body of a loop once, whatever its trip count,
so for a step with scanned layers and micro-batches it reports a small fraction of the work.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from avllm_jax.models.avllm import AVLLMConfig

# Peak dense bf16 FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS_PER_DEVICE = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # what a v5p calls itself (after 'TPU v5 lite', the v5e)
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(device) -> float | None:
    """The peak of a jax device, matched on its device_kind; None when unknown (e.g. CPU)."""
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS_PER_DEVICE.items():
        if kind.startswith(name):
            return flops
    return None


def llm_attention_flops(config, sequence_length: float, *, squared_tokens: float | None = None) -> float:
    """Causal attention, forward and backward (2x forward), of a sequence, or of sequences
    whose lengths' squares sum to `squared_tokens`."""
    c = config
    squared = sequence_length**2 if squared_tokens is None else squared_tokens
    return 3 * c.num_layers * 2 * 2 * squared * c.num_heads * c.head_dim / 2


def llm_flops(config, sequence_length: float, *, weights_train: bool, squared_tokens: float | None = None) -> float:
    """Of `sequence_length` tokens in one sequence, or in several whose lengths' squares sum to
    `squared_tokens`."""
    c = config
    per_layer = (
        c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    )
    matmul_weights = c.num_layers * per_layer + c.hidden_size * c.vocab_size  # + LM head
    passes = 2 + 2 + (2 if weights_train else 0)  # forward, input gradient, weight gradient
    return passes * matmul_weights * sequence_length + llm_attention_flops(
        c, sequence_length, squared_tokens=squared_tokens
    )


def vision_attention_flops(config, num_frames: float) -> float:
    """Bidirectional attention, forward only (the encoder is frozen)."""
    c = config
    return num_frames * c.num_layers * 2 * 2 * (c.num_patches + 1) ** 2 * c.hidden_size


def vision_flops(config, num_frames: float) -> float:
    c = config
    tokens = c.num_patches + 1
    per_layer = 4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size
    patch_embed = c.patch_size**2 * 3 * c.hidden_size * c.num_patches
    return num_frames * 2 * (c.num_layers * per_layer * tokens + patch_embed) + vision_attention_flops(c, num_frames)


def audio_flops(config, num_segments: float) -> float:
    """HTSAT forward: Swin stages on (spec_size/patch)^2 patches shrinking 4x per stage."""
    c = config
    channels = 4 if c.enable_fusion else 1
    total = 2 * c.embed_dim * c.patch_size[0] * c.patch_size[1] * channels * (c.spec_size // c.patch_stride[0]) ** 2
    for stage, (depth, resolution) in enumerate(zip(c.depths, c.resolutions)):
        width = c.embed_dim * 2**stage
        tokens = resolution[0] * resolution[1]
        per_block = (4 + 2 * c.mlp_ratio) * width**2
        window_attention = 2 * 2 * tokens * c.window_size**2 * width
        total += depth * (2 * per_block * tokens + window_attention)
        if stage + 1 < len(c.depths):  # patch merging: 4W -> 2W on tokens/4
            total += 2 * (4 * width) * (2 * width) * tokens / 4
    return num_segments * total


def whisper_flops(config, num_clips: float) -> float:
    """Whisper encoder forward over whole 30 s windows, one a clip: the two convolutions
    (kernel 3) on the mel frames, then the layers and bidirectional attention on 1500 frames."""
    c = config
    frames = c.max_source_positions
    convolutions = 2 * 3 * c.num_mel_bins * c.d_model * c.num_frames + 2 * 3 * c.d_model**2 * frames
    per_layer = 2 * (4 * c.d_model**2 + 2 * c.d_model * c.encoder_ffn_dim) * frames + 2 * 2 * frames**2 * c.d_model
    return num_clips * (convolutions + c.encoder_layers * per_layer)


def work_flops(config: AVLLMConfig, work, *, llm_trains: bool, encoders: bool = True) -> float:
    """FLOPs of a step's work, a vector in packing.WORK's order: samples, LLM positions, the
    sum of their sequences' squared lengths, ViT frames, visual items (each N spatial rows
    through W_s), audio clips, audio segments. `encoders` False: the encoders' outputs come from
    a feature cache, and only the projectors and the LLM compute."""
    if config.llm is None:
        raise ValueError("FLOPs are counted for a model with an LLM")
    _, llm_tokens, squared_tokens, frames, visual_items, audio_clips, audio_segments = (float(x) for x in work)
    total = llm_flops(config.llm, llm_tokens, weights_train=llm_trains, squared_tokens=squared_tokens)
    if config.vision and encoders:
        total += vision_flops(config.vision, frames)
    if config.vision:
        width = config.vision.hidden_size * config.llm.hidden_size
        total += 3 * 2 * width * (frames + visual_items * config.vision.num_patches)  # W_t, W_s: forward + 2 backward
    if config.audio and encoders:  # Whisper encodes each clip's window once, HTSAT each segment
        whisper = config.audio.kind == "whisper"
        total += whisper_flops(config.audio, audio_clips) if whisper else audio_flops(config.audio, audio_segments)
    if config.audio:
        total += 3 * 2 * config.audio.num_features * config.llm.hidden_size * audio_segments  # W_a
    return total


def sample_flops(
    config: AVLLMConfig,
    *,
    sequence_length: int,
    num_frames: int,
    num_audio_segments: int,
    llm_trains: bool,
    encoders: bool = True,
) -> float:
    """FLOPs of one unpacked training sample (every sample has all T+N+K slots, so all pay the same)."""
    work = (1, sequence_length, sequence_length**2, num_frames if config.vision else 0, 1, 1, num_audio_segments)
    return work_flops(config, work, llm_trains=llm_trains, encoders=encoders)


def llm_sequence_length(model_config: AVLLMConfig, data_config) -> int:
    """LLM rows of an unpacked training sample: the text (its modality token replaced) plus T+N+K slots."""
    rows = data_config.max_text_length - 1
    if model_config.vision:
        rows += data_config.num_frames + model_config.vision.num_patches
    if model_config.audio:
        rows += data_config.num_audio_segments
    return rows


def llm_trains(config) -> bool:
    """Whether the LLM's weight gradients are computed: not with LoRA, whose adapters' own
    (rank-sized) matmuls are left out of the count."""
    return config.lora.rank == 0 and any(pattern.startswith("llm") for pattern in config.trainable)


def run_sample_flops(model_config: AVLLMConfig, config) -> float:
    """`sample_flops` for a training run's config (its data settings and trainable patterns)."""
    return sample_flops(
        model_config,
        sequence_length=llm_sequence_length(model_config, config.data),
        num_frames=config.data.num_frames,
        num_audio_segments=config.data.num_audio_segments,
        llm_trains=llm_trains(config),
        encoders=not config.data.feature_cache,
    )


def slot_flops_per_step(model_config: AVLLMConfig, config) -> float:
    """What a step computes, every slot counted as work: all rows at full length, every frame
    and audio slot (the per-slot figure, against which useful_flops shows the padding)."""
    if not config.data.packing.enabled:
        return config.global_batch_size * run_sample_flops(model_config, config)
    p = config.data.packing
    length = p.rows * p.row_length
    work = (
        0,
        length,
        p.rows * p.row_length**2,
        p.frames,
        p.visual_items,
        p.audio_clips,
        p.audio_clips * config.data.num_audio_segments,
    )
    return config.global_batch_size * work_flops(
        model_config, work, llm_trains=llm_trains(config), encoders=not config.data.feature_cache
    )


def step_attention_flops(model_config: AVLLMConfig, config, parts: tuple[str, ...]) -> float:
    """The attention share of `slot_flops_per_step` for the named parts ('llm', 'vision')."""
    packing = config.data.packing
    total = 0.0
    if "llm" in parts:
        if packing.enabled:
            total += packing.rows * llm_attention_flops(model_config.llm, packing.row_length)
        else:
            total += llm_attention_flops(model_config.llm, llm_sequence_length(model_config, config.data))
    if "vision" in parts and model_config.vision:
        total += vision_attention_flops(
            model_config.vision, packing.frames if packing.enabled else config.data.num_frames
        )
    return config.global_batch_size * total


@dataclasses.dataclass
class HloFlops:
    flops: float  # matmul FLOPs of one device's program, loops counted trip-count times
    custom_calls: dict[str, int]  # target -> count of the kernels, whose work the HLO does not show
    unknown_trip_counts: int  # loops counted once because their trip count could not be read


_HEADER = re.compile(r"^(?:ENTRY )?%(?P<name>\S+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s+(?P<root>ROOT )?%(?P<name>\S+) = (?P<rest>.*)$")
_ARRAY = re.compile(r"^\w+\[(?P<dims>[\d,]*)\]")
_CALLED = re.compile(r"\b(?P<kind>calls|body|to_apply)=%(?P<name>[^\s,}]+)")
_CALLED_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{(?P<names>[^}]*)\}")
# Custom calls that are compute kernels (Mosaic on TPU, cuDNN, Triton); the others move data.
_KERNEL_CUSTOM_CALLS = ("tpu_custom_call", "__cudnn$", "__gpu$xla.gpu.triton")


@dataclasses.dataclass
class _Computation:
    instructions: dict[str, str]  # name -> the text after '=': type, op, operands, attributes
    root: str = ""


def hlo_matmul_flops(hlo_text: str) -> HloFlops:
    """Matmul FLOPs (dot and convolution, 2 per multiply-add) of a compiled HLO module, as
    `Compiled.as_text()` prints it, with each loop's body counted as many times as it runs.

    After SPMD partitioning this is one device's program: the shapes are per-device shards.
    """
    computations: dict[str, _Computation] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if header := _HEADER.match(line):
            current = computations.setdefault(header["name"], _Computation({}))
            entry = header["name"] if line.startswith("ENTRY") else entry
        elif current is not None and (instruction := _INSTRUCTION.match(line)):
            current.instructions[instruction["name"]] = instruction["rest"]
            current.root = instruction["name"] if instruction["root"] else current.root
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    result = HloFlops(0.0, {}, 0)
    memo: dict[str, float] = {}

    def computation_flops(name: str) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # a computation that (impossibly) calls itself adds nothing
        computation = computations.get(name, _Computation({}))
        shape = lambda instruction: _dims(computation.instructions[instruction])
        total = 0.0
        for rest in computation.instructions.values():
            op, operands = _op_and_operands(rest)
            if op == "dot":
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                if contracting is None:
                    raise ValueError(f"a dot without lhs_contracting_dims in the HLO text: {rest[:200]}")
                lhs = shape(operands[0])
                total += 2 * math.prod(_dims(rest)) * math.prod(lhs[int(i)] for i in contracting[1].split(",") if i)
            elif op == "convolution":
                total += _convolution_flops(rest, shape(operands[0]), shape(operands[1]))
            elif op == "custom-call":
                target = re.search(r'custom_call_target="([^"]*)"', rest)
                key = target[1] if target else "?"
                if key.startswith(_KERNEL_CUSTOM_CALLS):
                    result.custom_calls[key] = result.custom_calls.get(key, 0) + 1
            for called in _CALLED.finditer(rest):
                times: int | None = 1
                if called["kind"] == "body":
                    times = _trip_count(rest, computation, computations)
                    result.unknown_trip_counts += times is None
                total += (times or 1) * computation_flops(called["name"])
            for called in _CALLED_LISTS.finditer(rest):
                total += sum(computation_flops(n.strip().lstrip("%")) for n in called["names"].split(",") if n.strip())
        memo[name] = total
        return total

    result.flops = computation_flops(entry)
    return result


def _convolution_flops(rest: str, lhs: tuple[int, ...], kernel: tuple[int, ...]) -> float:
    """2 x output batch x output features x kernel input features x the (output position,
    window tap) pairs of each spatial dimension that land on an input element: TPUs write
    matmuls as convolutions, batch dimensions as windows dilated so that one tap is real."""
    dim_labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
    if dim_labels is None:
        raise ValueError(f"a convolution without dim_labels in the HLO text: {rest[:200]}")
    lhs_labels, kernel_labels, out_labels = dim_labels.groups()
    out = _dims(rest)
    size = lambda dims, labels, label: dims[labels.index(label)]
    total = 2.0 * size(out, out_labels, "b") * size(out, out_labels, "f") * size(kernel, kernel_labels, "i")
    window = re.search(r"window=\{([^}]*)\}", rest)
    fields = dict(field.split("=") for field in window[1].split()) if window else {}
    for axis, label in enumerate(sorted(label for label in out_labels if label.isdigit())):

        def value(key, default, part=0):
            return int(fields[key].split("x")[axis].split("_")[part]) if key in fields else default

        lhs_dilate, rhs_dilate, stride = value("lhs_dilate", 1), value("rhs_dilate", 1), value("stride", 1)
        taps = (
            np.arange(value("size", 1))[:, None] * rhs_dilate
            - value("pad", 0)
            + np.arange(size(out, out_labels, label))[None, :] * stride
        )
        extent = (size(lhs, lhs_labels, label) - 1) * lhs_dilate + 1
        total *= int(np.sum((taps >= 0) & (taps < extent) & (taps % lhs_dilate == 0)))
    return total


def _dims(rest: str) -> tuple[int, ...]:
    array = _ARRAY.match(rest)
    return tuple(int(d) for d in array["dims"].split(",") if d) if array else ()


def _balanced(text: str) -> int:
    """Index just past the parenthesised group `text` starts with."""
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return index + 1
    return len(text)


def _op_and_operands(rest: str) -> tuple[str, list[str]]:
    """'f32[8,64]{1,0} dot(%a, %b), ...' -> ('dot', ['a', 'b']); a tuple type is skipped whole."""
    rest = rest[_balanced(rest) :] if rest.startswith("(") else rest.partition(" ")[2]
    op, paren, arguments = rest.strip().partition("(")
    return op, re.findall(r"%([^\s,)]+)", (paren + arguments)[: _balanced(paren + arguments)])


def _constant(computation: _Computation, name: str) -> int | None:
    """The integer constant `name` is, through copies and bitcasts; None if it is not one."""
    rest = computation.instructions.get(name, "")
    op, operands = _op_and_operands(rest)
    if op in ("copy", "bitcast", "convert") and len(operands) == 1:
        return _constant(computation, operands[0])
    found = re.search(r"\bconstant\((-?\d+)\)", rest)
    return int(found[1]) if found else None


def _trip_count(while_rest: str, parent: _Computation, computations: dict[str, _Computation]) -> int | None:
    """A while loop's trip count: XLA's annotation, else read from the loop: its condition
    compares a counter (a tuple element) with a constant bound, its body adds a constant step
    to it, and it starts at the constant its operand tuple holds, or 0 (TPU programs carry no
    annotation, and their windowed matmul loops step by 2). None when it cannot be read."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_rest)
    if known:
        return int(known[1])
    names = dict(re.findall(r"\b(condition|body)=%([^\s,}]+)", while_rest))
    condition, body = computations.get(names.get("condition", "")), computations.get(names.get("body", ""))
    if condition is None or body is None:
        return None
    compare = condition.instructions.get(condition.root, "")
    op, operands = _op_and_operands(compare)
    if op != "compare" or "direction=LT" not in compare or len(operands) != 2:
        return None
    counter = re.search(r"get-tuple-element\(.*index=(\d+)", condition.instructions.get(operands[0], ""))
    bound = _constant(condition, operands[1])
    if counter is None or bound is None:
        return None
    index = int(counter[1])
    _, outputs = _op_and_operands(body.instructions.get(body.root, ""))
    op, increment = _op_and_operands(body.instructions.get(outputs[index], "")) if index < len(outputs) else ("", [])
    steps = [_constant(body, name) for name in increment] if op == "add" else []
    step = next((s for s in steps if s), None)
    _, initial = _op_and_operands(parent.instructions.get(_op_and_operands(while_rest)[1][0], ""))
    start = (_constant(parent, initial[index]) if index < len(initial) else None) or 0
    if step is None or step <= 0:
        return None
    return max(0, -(-(bound - start) // step))
