"""An avllm_jax model back to Hugging Face; `main` is tools/export_hf.py.

`export(workdir, out)` reads a training workdir (or a converted checkpoint) and writes to OUT:

    config.json, model.safetensors      the LLM as a `LlamaForCausalLM` (shards with an index
                                        past `max_shard_bytes`), in the stored parameter dtype,
                                        with a LoRA run's adapters folded into its weights
    tokenizer files                     with <VIS>, <AUD>, <AUD_VIS>
    avllm_projectors.safetensors        W_t, W_s, W_a under our names (`temporal_proj.kernel`
                                        [D_vision, D_llm], `.bias` [D_llm], ...; y = x @ kernel + bias)
    avllm_config.json                   the encoders' configs, the modality token ids, the
                                        projectors' roles and shapes, and the media settings
    README.md                           a model card: base checkpoints, training stages, data

The LLM alone runs in `transformers` (and any engine that reads LlamaForCausalLM) for text.
The encoders are not exported: they stay frozen in training, so they are the base checkpoints'.
`tools/convert_hf_weights.py --llm OUT` reads the export back and gives the same LLM weights.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import transformers
from flax import nnx
from safetensors.numpy import save_file

from avllm_jax import checkpoint, cli
from avllm_jax.data.conversation import SYSTEM_PROMPT, load_tokenizer
from avllm_jax.errors import AvllmError
from avllm_jax.modality import MODALITY_TOKENS
from avllm_jax.models import llama

logger = logging.getLogger(__name__)
PROJECTORS_FILE = "avllm_projectors.safetensors"
EXTRAS_FILE = "avllm_config.json"
CARD_FILE = "README.md"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PROJECTOR_INPUTS = {
    "temporal_proj": "W_t: each frame's CLS token (vision width) -> one LLM row per frame",
    "spatial_proj": "W_s: each patch token averaged over the frames -> one LLM row per patch",
    "audio_proj": "W_a: each audio segment's pooled HTSAT embedding -> one LLM row per segment",
}


class ExportError(AvllmError, ValueError):
    """A workdir that cannot be exported, or an output directory that cannot take it."""


def hf_llama_tensors(params: dict, config: llama.LlamaConfig):
    """(HF name, array) for every tensor of a LlamaForCausalLM: the inverse of `llama.hf_rules`."""
    c = config
    heads = lambda w: w.reshape(c.hidden_size, -1).T
    yield "model.embed_tokens.weight", params["embed"]
    layer = params["layers"]
    for i in range(c.num_layers):
        prefix = f"model.layers.{i}."
        yield prefix + "input_layernorm.weight", layer["input_norm"]["scale"][i]
        for name in ("q_proj", "k_proj", "v_proj"):
            yield prefix + f"self_attn.{name}.weight", heads(layer[name][i])
        yield prefix + "self_attn.o_proj.weight", layer["o_proj"][i].reshape(-1, c.hidden_size).T
        yield prefix + "post_attention_layernorm.weight", layer["post_attention_norm"]["scale"][i]
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield prefix + f"mlp.{name}.weight", layer[name]["kernel"][i].T
    yield "model.norm.weight", params["final_norm"]["scale"]
    if not c.tie_word_embeddings:
        yield "lm_head.weight", params["lm_head"].T


def hf_llama_config(config: llama.LlamaConfig, tokenizer) -> transformers.LlamaConfig:
    """Our LlamaConfig as transformers writes it (its version decides the rope fields' layout)."""
    # The ignore: transformers 5 declares rope_parameters in their place, yet still takes transformers 4's
    # rope_theta and rope_scaling as keywords and folds them in.
    return transformers.LlamaConfig(  # type: ignore[call-arg]
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=config.param_dtype,
        architectures=["LlamaForCausalLM"],
    )


def write_safetensors(tensors, out: str, max_shard_bytes: int) -> list[str]:
    """Writes (name, array) pairs as model.safetensors, or as shards with HF's index past
    `max_shard_bytes`; returns the file names. Arrays are copied to host one at a time."""
    shards: list[dict[str, np.ndarray]] = []
    current: dict[str, np.ndarray] = {}
    size = 0
    for name, array in tensors:
        array = np.ascontiguousarray(np.asarray(array))
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {tensor: file for file, shard in zip(names, shards) for tensor in shard}
        total = sum(a.nbytes for shard in shards for a in shard.values())
        with open(os.path.join(out, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
    return names


def training_stages(workdir: str) -> list[dict]:
    """The training runs behind `workdir`, first to last, each a training workdir's
    train_config.json (with `workdir`); a converted checkpoint has none."""
    stages: list[dict] = []
    seen: set[str] = set()
    path = workdir
    while (
        path and os.path.exists(os.path.join(path, checkpoint.TRAIN_CONFIG_FILE)) and os.path.abspath(path) not in seen
    ):
        seen.add(os.path.abspath(path))
        with open(os.path.join(path, checkpoint.TRAIN_CONFIG_FILE)) as f:
            stage = json.load(f) | {"workdir": path}
        stages.insert(0, stage)
        path = stage.get("init_checkpoint") or ""
    return stages


def model_card(workdir: str, config, stages: list[dict], base_models: list[str], files: list[str]) -> str:
    first = stages[0] if stages else {}
    if first.get("init_checkpoint"):
        base = f"the converted checkpoint `{first['init_checkpoint']}` (tools/convert_hf_weights.py)"
    elif stages:
        base = f"random weights: trained from scratch with the tokenizer `{first.get('tokenizer', '')}`"
    else:
        base = f"the converted checkpoint `{workdir}` itself (no training run recorded)"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [avllm_jax, llama, audio-visual]",
    ]
    if base_models:
        lines += ["base_model:"] + [f"- {name}" for name in base_models]
    lines += ["---", "", f"# {os.path.basename(os.path.normpath(workdir))}: the LLM of an Audio-Visual LLM", ""]
    lines += [
        f"Exported by avllm_jax (`tools/export_hf.py`) from `{workdir}`. The LLM is a `LlamaForCausalLM` "
        f"({config.llm.num_layers} layers, width {config.llm.hidden_size}, vocabulary {config.llm.vocab_size}, "
        f"{config.llm.param_dtype}); its tokenizer has the modality tokens {', '.join(MODALITY_TOKENS)} "
        f"(ids {', '.join(map(str, config.modality_token_ids))}). Alone it answers text; the modality tokens "
        "stand for encoder rows that only avllm_jax computes (the encoders and the projectors in "
        f"`{PROJECTORS_FILE}` and `{EXTRAS_FILE}`).",
        "",
        f"Prompt format (Vicuna v1.1): `{SYSTEM_PROMPT} USER: <AUD_VIS>\\nWhat makes the sound? ASSISTANT:`",
        "",
        "## Base checkpoints",
        "",
    ]
    lines += [f"- {name}" for name in base_models] or [f"- {base}"]
    if base_models:
        lines.append(f"- converted into avllm_jax as {base}")
    encoders = []
    if config.vision is not None:
        encoders.append("vision encoder (CLIP ViT)")
    if config.audio is not None:
        encoders.append(f"audio encoder ({'Whisper' if config.audio.kind == 'whisper' else 'HTSAT'})")
    lines += [f"- {title}: frozen in training; its config is in `{EXTRAS_FILE}`" for title in encoders]
    lines += ["", "## Training", ""]
    if not stages:
        lines.append("No training run is recorded in this directory.")
    for number, stage in enumerate(stages, 1):
        optim = stage.get("optim", {})
        steps = stage.get("num_steps", -1)
        length = (
            f"{steps} steps" if steps and steps > 0 else f"{stage.get('train_epochs', stage.get('num_epochs'))} epochs"
        )
        lora = stage.get("lora") or {}
        lora_line = (
            [
                f"- LoRA on the LLM: rank {lora['rank']}, alpha {lora['alpha']}, on "
                f"{', '.join(f'`{t}`' for t in lora['targets'])}; "
                "its base weights frozen, the adapters folded into the exported weights"
            ]
            if lora.get("rank")
            else []
        )
        lines += [
            f"### Stage {number}: `{stage['workdir']}`",
            "",
            f"- trains: {', '.join(f'`{p}`' for p in stage.get('trainable', []))}",
            *lora_line,
            f"- starts from: `{stage.get('init_checkpoint') or 'random weights'}`",
            f"- {length}, global batch {stage.get('global_batch_size')}{_batch_unit(stage)}, learning rate "
            f"{optim.get('learning_rate')}, "
            f"AdamW betas ({optim.get('beta1')}, {optim.get('beta2')}), weight decay {optim.get('weight_decay')}",
            "- data:",
        ]
        data = stage.get("data", {})
        lines += [
            f"  - `{s.get('path')}` (weight {s.get('weight')}, media under "
            f"{'`' + s['media_root'] + '`' if s.get('media_root') else 'its directory'})"
            for s in data.get("sources", [])
        ]
        lines += [
            f"- media: {data.get('num_frames')} frames at {data.get('image_size')} px, "
            f"{data.get('num_audio_segments')} audio segments",
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoTokenizer, LlamaForCausalLM",
        "",
        "model = LlamaForCausalLM.from_pretrained(DIR)",
        "tokenizer = AutoTokenizer.from_pretrained(DIR)",
        "```",
        "",
        "`tools/convert_hf_weights.py --llm DIR` reads the LLM back into avllm_jax, weight for weight.",
        "",
    ]
    lines += ["## Files", ""] + [f"- {name}" for name in files]
    return "\n".join(lines) + "\n"


def export(workdir: str, out: str, *, base_models: tuple[str, ...] = (), max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Exports `workdir` (a training workdir or a converted checkpoint) to the new or empty
    directory `out`; returns the files written. Raises ExportError naming the problem."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"{out} is not an empty directory; export into a new one")
    try:
        config = checkpoint.read_model_config(workdir)
    except (FileNotFoundError, ValueError) as error:
        raise ExportError(str(error)) from None
    if config.llm is None:
        raise ExportError(
            f"{workdir} holds no LLM (its {checkpoint.CONFIG_FILE} has only the encoders), so there is nothing to "
            "export"
        )
    model = checkpoint.load_model(workdir)  # a LoRA run's adapters folded into the dense weights
    tokenizer = load_tokenizer(workdir)
    params = nnx.to_pure_dict(nnx.state(model))
    os.makedirs(out, exist_ok=True)
    shards = write_safetensors(hf_llama_tensors(params["llm"], config.llm), out, max_shard_bytes)
    hf_llama_config(config.llm, tokenizer).save_pretrained(out)
    files = shards + [SAFETENSORS_INDEX] if len(shards) > 1 else shards
    files.append("config.json")
    tokenizer.save_pretrained(out)
    projectors = {
        f"{name}.{leaf}": np.asarray(params[name][leaf])
        for name in PROJECTOR_INPUTS
        if name in params
        for leaf in ("kernel", "bias")
    }
    if projectors:
        save_file(projectors, os.path.join(out, PROJECTORS_FILE))
        files.append(PROJECTORS_FILE)
    extras = {
        "format": "avllm_jax export 2",  # 2: the audio encoder in "audio" with its kind (1: a Whisper one in "whisper")
        "vision": None if config.vision is None else config.to_dict()["vision"],
        "audio": None if config.audio is None else config.to_dict()["audio"],  # its kind says which encoder
        "modality_tokens": dict(zip(MODALITY_TOKENS, config.modality_token_ids)),
        "projectors": {
            name: {
                "role": role,
                "kernel": list(projectors[f"{name}.kernel"].shape),
                "bias": list(projectors[f"{name}.bias"].shape),
            }
            for name, role in PROJECTOR_INPUTS.items()
            if f"{name}.kernel" in projectors
        },
        "media": None
        if (data := checkpoint.read_data_config(workdir)) is None
        else {
            k: data.get(k)
            for k in (
                "num_frames",
                "image_size",
                "num_audio_segments",
                "audio_sample_rate",
                "audio_front_end",
                "audio_max_length_s",
                "audio_truncation",
                "whisper_mel_bins",
            )
        },
    }
    with open(os.path.join(out, EXTRAS_FILE), "w") as f:
        json.dump(extras, f, indent=2)
    files += [EXTRAS_FILE, CARD_FILE]
    described = [
        f"`model-*.safetensors`: the LLM in {len(shards)} shards, `{SAFETENSORS_INDEX}`"
        if len(shards) > 1
        else "`model.safetensors`: the LLM",
        "`config.json`: its LlamaConfig",
        "the tokenizer files",
        *([f"`{PROJECTORS_FILE}`: W_t, W_s, W_a (y = x @ kernel + bias)"] if projectors else []),
        f"`{EXTRAS_FILE}`: encoder configs, modality token ids, the projectors' roles, media settings",
    ]
    with open(os.path.join(out, CARD_FILE), "w") as f:
        f.write(model_card(workdir, config, training_stages(workdir), list(base_models), described))
    return files


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("tools/export_hf.py", __doc__)
    parser.add_argument("workdir", help="training workdir or converted checkpoint")
    parser.add_argument("--out", required=True, help="output directory (new or empty)")
    parser.add_argument(
        "--base-model",
        action="append",
        default=[],
        metavar="NAME",
        help="a Hugging Face checkpoint the model was converted from, for the model card (repeat for each)",
    )
    parser.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="largest safetensors file before sharding (default 5)"
    )
    args = parser.parse_args(argv)
    cli.configure_logging(args)
    files = export(
        args.workdir, args.out, base_models=tuple(args.base_model), max_shard_bytes=int(args.max_shard_gb * 2**30)
    )
    logger.info(f"wrote {', '.join(files)} and the tokenizer to {args.out}")


def _batch_unit(stage: dict) -> str:
    """' packs (...)' when the stage packed its samples: then the batch counts packs, not samples."""
    packing = stage.get("data", {}).get("packing", {})
    if not packing.get("enabled"):
        return ""
    return (
        f" packs (each {packing.get('rows')} x {packing.get('row_length')} positions, "
        f"{packing.get('frames')} ViT frames, {packing.get('audio_clips')} audio clips)"
    )
