"""Hugging Face checkpoints -> one avllm_jax model directory; `main` is tools/convert_hf_weights.py.

`convert(clip=DIR, clap=DIR, llm=DIR, out=OUT)` (whisper=DIR in place of clap: the part 'audio'
is then Whisper's encoder) reads each part's safetensors (PyTorch pickles only with
`allow_pickle`), maps the tensor names with each network's rules (models/*.py, `hf_rules`), adds
the modality tokens to the LLM's tokenizer and grows its embedding to match, initialises the
projectors at random, and writes `config.json`, the tokenizer and `params/` to OUT (see
avllm_jax/checkpoint.py).
"""

from __future__ import annotations

import logging
import os

import ml_dtypes
import numpy as np
import tqdm
import transformers
from flax import nnx

from avllm_jax import checkpoint, cli
from avllm_jax.data.conversation import add_modality_tokens
from avllm_jax.models import avllm, clip_vision, conversion, htsat, llama
from avllm_jax.models import whisper as whisper_encoder  # not `whisper`: convert() takes a whisper=DIR argument

USAGE = """\
Convert Hugging Face checkpoints into one avllm_jax model directory.

    python tools/convert_hf_weights.py --clip DIR --clap DIR --llm DIR --out OUT
    python tools/convert_hf_weights.py --clip DIR --whisper DIR --llm DIR --out OUT

Each part is optional. DIR is a local Hugging Face model directory (config.json plus
model.safetensors, or sharded safetensors with an index; PyTorch .bin files only with
--allow-pickle). OUT receives `config.json`, the tokenizer (with <VIS>, <AUD>, <AUD_VIS>
added) and `params/` (orbax). Load it with `avllm_jax.load_model(OUT)`.

  --clip   CLIPVisionModel or CLIPModel (e.g. openai/clip-vit-large-patch14)
  --clap   ClapModel or ClapAudioModel (e.g. laion/clap-htsat-unfused); the audio tower only
  --whisper  WhisperModel or WhisperForConditionalGeneration (e.g. openai/whisper-small); the
           encoder only. The model has one audio encoder: --clap or --whisper, not both.
  --llm    LlamaForCausalLM (e.g. lmsys/vicuna-7b-v1.5)

The projectors W_t, W_s, W_a are initialised at random (seed --seed): pretraining learns them.
"""
logger = logging.getLogger(__name__)
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def convert_part(
    directory: str, rules, module_factory, *, dtype, allow_pickle: bool, name: str
) -> dict[str, np.ndarray]:
    """{our dotted path: array} for one network, read from an HF directory."""
    paths = conversion.checkpoint_files(directory, allow_pickle=allow_pickle)
    shapes = conversion.tensor_shapes(paths)
    expected = conversion.flat_shapes(nnx.state(nnx.eval_shape(module_factory)))
    tensors = tqdm.tqdm(conversion.iterate_tensors(paths), total=len(shapes), desc=f"converting {name}", unit="tensor")
    return conversion.convert_tensors(tensors, rules, expected, dtype=DTYPES[dtype], source=directory)


def extend_vocabulary(flat: dict[str, np.ndarray], vocab_size: int) -> None:
    """Grows the embedding (and untied output) matrix to `vocab_size` rows; new rows are the
    mean of the existing ones, so new tokens start from an average word."""
    embed = flat["embed"]
    extra = vocab_size - embed.shape[0]
    if extra <= 0:
        return
    mean_row = embed.astype(np.float32).mean(axis=0, keepdims=True)
    flat["embed"] = np.concatenate([embed, np.repeat(mean_row, extra, 0).astype(embed.dtype)], axis=0)
    if "lm_head" in flat:  # [D, V]: new columns
        head = flat["lm_head"]
        mean_column = head.astype(np.float32).mean(axis=1, keepdims=True)
        flat["lm_head"] = np.concatenate([head, np.repeat(mean_column, extra, 1).astype(head.dtype)], axis=1)


def convert_whisper(
    directory: str, *, dtype: str = "float32", allow_pickle: bool = False
) -> tuple[whisper_encoder.WhisperEncoderConfig, dict[str, np.ndarray]]:
    """The encoder of a WhisperModel / WhisperForConditionalGeneration directory: its config and
    {our dotted path: array} (the decoder is dropped on purpose)."""
    config = whisper_encoder.WhisperEncoderConfig.from_hf(conversion.read_hf_config(directory), param_dtype=dtype)
    make_encoder = lambda: whisper_encoder.WhisperEncoder(config, rngs=nnx.Rngs(0))
    part = convert_part(
        directory,
        whisper_encoder.hf_rules(config),
        make_encoder,
        dtype=dtype,
        allow_pickle=allow_pickle,
        name="whisper",
    )
    return config, part


def convert(
    *, clip=None, clap=None, whisper=None, llm=None, out, tokenizer=None, dtype="float32", allow_pickle=False, seed=0
) -> avllm.AVLLMConfig:
    """Converts the given parts into the model directory `out`; returns its config.

    Raises ConversionError naming the tensor or directory that does not fit."""
    if not (clip or clap or whisper or llm):
        raise conversion.ConversionError("nothing to convert: give at least one of clip, clap, whisper, llm")
    if clap and whisper:
        raise conversion.ConversionError("--clap and --whisper are mutually exclusive: the model has one audio encoder")
    flat: dict[str, np.ndarray] = {}
    vision_config = llm_config = None
    audio_config: avllm.AudioConfig | None = None  # CLAP's HTSAT or Whisper's encoder: the part 'audio'
    modality_token_ids = (-1, -1, -1)
    if clip:
        vision_config = clip_vision.CLIPVisionConfig.from_hf(conversion.read_hf_config(clip), param_dtype=dtype)
        part = convert_part(
            clip,
            clip_vision.hf_rules(vision_config),
            lambda: clip_vision.CLIPVision(vision_config, rngs=nnx.Rngs(0)),
            dtype=dtype,
            allow_pickle=allow_pickle,
            name="vision",
        )
        flat |= {f"vision.{k}": v for k, v in part.items()}
    if clap:
        audio_config = htsat.HTSATConfig.from_hf(conversion.read_hf_config(clap), param_dtype=dtype)
        part = convert_part(
            clap,
            htsat.hf_rules(audio_config),
            lambda: htsat.HTSAT(audio_config, rngs=nnx.Rngs(0)),
            dtype=dtype,
            allow_pickle=allow_pickle,
            name="audio",
        )
        flat |= {f"audio.{k}": v for k, v in part.items()}
    if whisper:
        audio_config, part = convert_whisper(whisper, dtype=dtype, allow_pickle=allow_pickle)
        flat |= {f"audio.{k}": v for k, v in part.items()}
    if llm:
        hf_config = conversion.read_hf_config(llm)
        tokenizer_dir = tokenizer or llm
        try:
            text_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        except (OSError, ValueError) as error:
            raise conversion.ConversionError(
                f"no usable tokenizer in {tokenizer_dir} ({error}); pass --tokenizer DIR"
            ) from error
        visual_id, audio_id, audio_visual_id = add_modality_tokens(text_tokenizer)  # in MODALITY_TOKENS' order
        modality_token_ids = (visual_id, audio_id, audio_visual_id)
        # The embedding matrix, not config.json, says how many rows the checkpoint has
        # (Vicuna v0/v1.1 configs and matrices disagree).
        paths = conversion.checkpoint_files(llm, allow_pickle=allow_pickle)
        embed_shape = conversion.tensor_shapes(paths).get("model.embed_tokens.weight")
        if embed_shape is None:
            raise conversion.ConversionError(f"{llm} has no tensor 'model.embed_tokens.weight'")
        checkpoint_config = llama.LlamaConfig.from_hf(hf_config, vocab_size=embed_shape[0], param_dtype=dtype)
        part = convert_part(
            llm,
            llama.hf_rules(checkpoint_config),
            lambda: llama.Llama(checkpoint_config, rngs=nnx.Rngs(0)),
            dtype=dtype,
            allow_pickle=allow_pickle,
            name="llm",
        )
        vocab_size = max(embed_shape[0], len(text_tokenizer))
        extend_vocabulary(part, vocab_size)
        llm_config = llama.LlamaConfig.from_hf(hf_config, vocab_size=vocab_size, param_dtype=dtype)
        flat |= {f"llm.{k}": v for k, v in part.items()}

    config = avllm.AVLLMConfig(
        vision=vision_config,
        audio=audio_config,
        llm=llm_config,
        modality_token_ids=modality_token_ids,
    )
    # The projectors come from no checkpoint: they start from the model's own initialisation.
    for name, projector in avllm.make_projectors(config, rngs=nnx.Rngs(seed)).items():
        for path, leaf in nnx.to_flat_state(nnx.state(projector)):
            flat[".".join((name, *map(str, path)))] = np.asarray(leaf.get_value()).astype(DTYPES[dtype])

    os.makedirs(out, exist_ok=True)
    logger.info(f"writing {len(flat)} tensors to {out}")
    checkpoint.save_params(os.path.join(out, checkpoint.PARAMS_DIR), checkpoint.unflatten(flat))
    checkpoint.write_model_config(out, config)
    if llm:
        text_tokenizer.save_pretrained(out)
    return config


@cli.entry_point
def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("tools/convert_hf_weights.py", USAGE)
    parser.add_argument("--clip", metavar="DIR", help="HF CLIPVisionModel/CLIPModel directory (the vision encoder)")
    audio = parser.add_mutually_exclusive_group()  # the model has one audio encoder
    audio.add_argument("--clap", metavar="DIR", help="HF ClapModel/ClapAudioModel directory (the HTSAT audio encoder)")
    audio.add_argument(
        "--whisper",
        metavar="DIR",
        help="HF WhisperModel/WhisperForConditionalGeneration directory (its encoder as the audio encoder)",
    )
    parser.add_argument(
        "--llm", metavar="DIR", help="HF LlamaForCausalLM directory (Vicuna/LLaMA decoder and its tokenizer)"
    )
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory, if not the --llm one")
    parser.add_argument(
        "--out", metavar="OUT", required=True, help="output directory (created; existing params are overwritten)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="parameter dtype written to OUT (default float32)"
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help=(
            "read PyTorch .bin checkpoints with torch.load(weights_only=True); needs torch. "
            "Off by default: pickles can run code"
        ),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the projectors' random initialisation (default 0)")
    args = parser.parse_args(argv)
    cli.configure_logging(args)
    for flag in ("clip", "clap", "whisper", "llm", "tokenizer"):
        if getattr(args, flag) is not None:
            cli.require_directory(getattr(args, flag), f"--{flag}", "Hugging Face model directory")
    convert(
        clip=args.clip,
        clap=args.clap,
        whisper=args.whisper,
        llm=args.llm,
        out=args.out,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        seed=args.seed,
    )
    logger.info(f"done: load it with avllm_jax.load_model({args.out!r})")
