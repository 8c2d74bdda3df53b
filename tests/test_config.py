"""The training config: misspelt fields are errors naming them, model parts are explicit, and any
model field can be overridden, from a config file or the command line, with or without a
starting checkpoint."""

import dataclasses
import importlib.util
import pathlib
import re

import ml_collections
import pytest
import transformers
from absl import flags
from ml_collections import config_flags

from avllm_jax import checkpoint, cli
from avllm_jax.data import conversation, synthetic
from avllm_jax.models import avllm, clip_vision, htsat, llama, whisper
from avllm_jax.train import SetupError, resolve_model
from avllm_jax.training import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config_file(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def check_error(config) -> str:
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.check_config(config)
    return str(error.value)


def config_parser():
    parser = cli.Parser("prog")
    parser.add_config_flag("config", config_lib.unknown_field)
    return parser


@pytest.mark.parametrize("name", ["demo", "pretrain", "sft"])
def test_config_files_pass_the_check(name):
    config_lib.check_config(load_config_file(name))


def test_model_blocks_declare_every_dataclass_field():
    model = config_lib.base_config().model
    assert model.parts == ("vision", "audio", "llm") and model.audio_kind == "htsat"
    fields = lambda *classes: {f.name for cls in classes for f in dataclasses.fields(cls)}
    assert set(model.vision.keys()) == fields(clip_vision.CLIPVisionConfig)
    assert set(model.llm.keys()) == fields(llama.LlamaConfig)
    assert set(model.audio.keys()) == fields(htsat.HTSATConfig, whisper.WhisperEncoderConfig)  # either kind's
    for part in avllm.PARTS:
        assert all(value is None for value in model[part].values())  # None: not set


def test_misspelt_fields_are_named_with_the_nearest():
    config = config_lib.base_config()
    config.optim.learnin_rate = 1e-4
    config.data.num_frame = 8
    config.model.llm.hiden_size = 32
    message = check_error(config)
    assert "config.optim.learnin_rate is not a field (did you mean 'learning_rate'?)" in message
    assert "config.data.num_frame is not a field (did you mean 'num_frames'?)" in message
    assert "config.model.llm.hiden_size is not a field (did you mean 'hidden_size'?)" in message

    config = config_lib.base_config()
    config.zzz = 1
    assert "config.zzz is not a field (choose from " in check_error(config)


def test_a_replaced_block_is_reported():
    config = config_lib.base_config()
    config.model.vision = ml_collections.ConfigDict(dict(image_size=64))
    message = check_error(config)
    assert "config.model.vision lacks apply_post_layernorm, attention_implementation, dtype" in message
    assert "rather than replacing config.model.vision" in message
    config = config_lib.base_config()
    config.model.llm = None
    assert "config.model.llm must be a block of fields (attention_implementation, dtype, head_dim" in check_error(
        config
    )


def test_model_parts_are_checked():
    config = config_lib.base_config()
    config.model.parts = ("vison", "llm")
    assert "config.model.parts names 'vison', not a part (did you mean 'vision'?)" in check_error(config)
    config.model.parts = ("audio", "audio")
    message = check_error(config)
    assert "names a part twice" in message and "lacks 'llm'" in message


def test_the_whisper_part_of_old_configs_names_the_new_way():
    """A Whisper encoder is the part 'audio' with config.model.audio_kind='whisper' now."""
    config = config_lib.base_config()
    config.model.parts = ("vision", "whisper", "llm")
    assert (
        "config.model.parts names 'whisper', which is now 'audio' with config.model.audio_kind='whisper'"
        in check_error(config)
    )
    config = config_lib.base_config()
    config.model.whisper = ml_collections.ConfigDict(dict(d_model=384))
    assert "config.model.whisper was renamed config.model.audio, with config.model.audio_kind='whisper'" in check_error(
        config
    )
    with pytest.raises(cli.UsageError, match=r"^--config\.model\.whisper\.d_model: config\.model\.whisper was renamed"):
        config_parser().parse_args(["--config", str(REPO / "configs/demo.py"), "--config.model.whisper.d_model=384"])


def test_audio_fields_must_be_of_the_audio_kind():
    config = config_lib.base_config()
    config.model.audio.d_model = 384
    config.model.audio.dtype = "bfloat16"  # both kinds have it
    assert check_error(config) == (
        "bad config:\n  config.model.audio.d_model is a field of the 'whisper' audio encoder, not of "
        "config.model.audio_kind='htsat': set the kind, or leave the field unset"
    )
    config.model.audio_kind = "whisper"
    config_lib.check_config(config)
    config.model.audio.enable_fusion = True
    assert "config.model.audio.enable_fusion is a field of the 'htsat' audio encoder, not of" in check_error(config)
    config.model.audio_kind = "whispr"
    assert "config.model.audio_kind='whispr' is not an audio encoder (did you mean 'whisper'?)" in check_error(config)


def parse_command_line(*args):
    argv = ["train", f"--config={REPO / 'configs/demo.py'}", *args]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return holder.value


def test_command_line_overrides_any_model_field():
    config = parse_command_line(
        "--config.model.audio.enable_fusion=True",
        "--config.model.audio.depths=(2, 2)",
        "--config.model.llm.rope_scaling={'rope_type': 'linear', 'factor': 2.0}",
        "--config.model.parts=('audio', 'llm')",
    )
    config_lib.check_config(config)
    overrides = config_lib.model_overrides(config)
    assert overrides["audio"]["enable_fusion"] is True and overrides["audio"]["depths"] == (2, 2)
    assert overrides["llm"]["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(
        AttributeError, match='Did you mean "hidden_size" instead of "hiden_size"'
    ):  # config_flags' check
        parse_command_line("--config.model.llm.hiden_size=3")


def test_a_whisper_audio_part_is_set_on_the_command_line(tmp_path, tokenizer_dir):
    """audio_kind picks the dataclass; Whisper's own fields parse with their types."""
    config_file = tmp_path / "base.py"
    config_file.write_text("from avllm_jax.training.config import base_config as get_config\n")
    args = config_parser().parse_args(
        [
            f"--config={config_file}",
            f"--config.tokenizer={tokenizer_dir}",
            "--config.model.audio_kind=whisper",
            "--config.model.audio.d_model=36",
            "--config.model.audio.encoder_attention_heads=3",
            "--config.model.audio.num_mel_bins=128",
        ]
    )
    config_lib.check_config(args.config)
    model_config, _, _ = resolve_model(args.config)
    assert model_config.audio == whisper.WhisperEncoderConfig(d_model=36, encoder_attention_heads=3, num_mel_bins=128)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    conversation.train_tokenizer(synthetic.demo_tokenizer_corpus(), vocab_size=400).save_pretrained(path)
    return path


def test_without_init_checkpoint_each_named_part_is_defaults_plus_overrides(tokenizer_dir, caplog):
    config = load_config_file("demo")
    config.tokenizer = str(tokenizer_dir)
    config.model.audio.enable_fusion = True
    model_config, tokenizer, init_dir = resolve_model(config)
    assert init_dir is None
    assert model_config.audio == htsat.HTSATConfig(**config_lib.model_overrides(config)["audio"])
    assert model_config.audio.enable_fusion and model_config.audio.depths == (1, 1)
    assert model_config.llm.vocab_size == len(tokenizer) and model_config.llm.hidden_size == 128
    assert model_config.llm.rms_norm_eps == llama.LlamaConfig().rms_norm_eps  # not set: the default

    config.model.parts = ("vision", "llm")
    config_lib.check_config(config)
    model_config, _, _ = resolve_model(config)
    assert model_config.audio is None and model_config.vision.image_size == 64 and model_config.llm is not None
    assert (
        "config.model.audio sets depths, embed_dim, enable_fusion, num_heads, patch_size, patch_stride, spec_size, "
        "window_size: unused, as config.model.parts does not name 'audio'" in caplog.text
    )

    config.model.llm.vocab_size = 5
    with pytest.raises(
        SetupError, match=f"config.model.llm.vocab_size=5 but the tokenizer .* has {len(tokenizer)} tokens"
    ):
        resolve_model(config)


def test_a_local_tokenizer_path_that_is_no_tokenizer_fails_at_once(tmp_path, monkeypatch):
    """A path that looks local is never looked up on the hub (which retried for 47 s before)."""
    config = load_config_file("demo")
    missing = tmp_path / "demo_out" / "tokenizer"
    config.tokenizer = str(missing)
    with pytest.raises(conversation.TokenizerError, match=rf"^config.tokenizer {missing}: no such directory$"):
        resolve_model(config)
    missing.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    config.tokenizer = "demo_out/tokenizer"  # relative, under a directory that exists
    with pytest.raises(
        conversation.TokenizerError,
        match=r"^config.tokenizer demo_out/tokenizer: not a tokenizer directory \(none of tokenizer.json, ",
    ):
        resolve_model(config)
    assert [
        conversation.looks_local(name) for name in ("./tok", "../tok", "/abs/tok", "demo_out/x", "lmsys/vicuna")
    ] == [
        True,
        True,
        True,
        True,
        False,
    ]


@pytest.fixture
def init_checkpoint(tmp_path, tokenizer_dir):
    """A converted checkpoint's config and tokenizer, with vision and LLM but no audio encoder."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    token_ids = tuple(conversation.add_modality_tokens(tokenizer))
    stored = avllm.AVLLMConfig(
        vision=clip_vision.CLIPVisionConfig(image_size=64, patch_size=16),
        llm=llama.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64),
        modality_token_ids=token_ids,
    )
    checkpoint.write_model_config(tmp_path, stored)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_with_init_checkpoint_the_parts_must_match_it(init_checkpoint):
    config = load_config_file("sft")
    config.init_checkpoint = str(init_checkpoint)
    with pytest.raises(SetupError) as error:
        resolve_model(config)
    assert "config.model.parts=('vision', 'audio', 'llm') but init_checkpoint" in str(error.value)
    assert "holds ('vision', 'llm')" in str(error.value)
    config.model.parts = ("llm",)  # the checkpoint's vision encoder is not named
    with pytest.raises(
        SetupError, match=r"config.model.parts=\('llm',\) but init_checkpoint .* holds \('vision', 'llm'\)"
    ):
        resolve_model(config)

    config.model.parts = ("vision", "llm")  # sft.py's audio dtype is then unused
    config.model.llm.rms_norm_eps = 1e-6
    config_lib.check_config(config)
    model_config, _, init_dir = resolve_model(config)
    assert init_dir == str(init_checkpoint) and model_config.audio is None
    assert model_config.llm.hidden_size == 64  # the checkpoint's
    assert model_config.llm.rms_norm_eps == 1e-6 and model_config.llm.dtype == "bfloat16"  # overridden
    assert model_config.vision.attention_implementation == "auto"


def test_with_init_checkpoint_the_audio_kind_must_match_it(init_checkpoint):
    stored = checkpoint.read_model_config(str(init_checkpoint))
    checkpoint.write_model_config(str(init_checkpoint), dataclasses.replace(stored, audio=whisper.PRESETS["tiny"]))
    config = config_lib.base_config()
    config.init_checkpoint = str(init_checkpoint)
    with pytest.raises(
        SetupError,
        match=r"config.model.audio_kind='htsat' but init_checkpoint .* holds a 'whisper' audio encoder: "
        r"use --config.model.audio_kind=whisper$",
    ):
        resolve_model(config)
    config.model.audio_kind = "whisper"
    config.model.audio.dtype = "bfloat16"
    model_config, _, _ = resolve_model(config)
    assert model_config.audio == dataclasses.replace(whisper.PRESETS["tiny"], dtype="bfloat16")


def test_with_init_checkpoint_overrides_must_keep_the_weight_shapes(init_checkpoint):
    config = load_config_file("sft")
    config.init_checkpoint = str(init_checkpoint)
    config.model.parts = ("vision", "llm")
    config.model.llm.hidden_size = 32
    with pytest.raises(SetupError) as error:
        resolve_model(config)
    message = str(error.value)
    assert "model.llm.hidden_size" in message and "change the shapes of its weights" in message
    assert re.search(r"e\.g\. llm\.embed \(\d+, 64\) -> \(\d+, 32\)", message)


def test_missing_init_checkpoint_says_how_to_make_it(tmp_path):
    config = load_config_file("sft")
    config.init_checkpoint = str(tmp_path / "nowhere")
    with pytest.raises(SetupError) as error:
        resolve_model(config)
    message = str(error.value)
    assert "does not exist" in message and "tools/convert_hf_weights.py" in message
    assert "configs/sft.py starts from the workdir of configs/pretrain.py" in message


def test_the_data_settings_must_suit_the_encoders():
    """Checked before any data is read: the truncation the HTSAT takes, and an audio window its
    spectrogram image holds (a 64-pixel HTSAT: 64 frames, 0.63 s; CLAP's 10 s is 1001)."""
    from avllm_jax.data import pipeline
    from avllm_jax.train import check_data_matches_model

    small = htsat.HTSATConfig(spec_size=64, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=16, mlp_ratio=2.0)
    model_config = avllm.AVLLMConfig(audio=small)
    data = pipeline.default_data_config()
    data.audio_truncation = "rand_trunc"
    with pytest.raises(
        SetupError,
        match=r"^data.audio_max_length_s=10 gives 1001 spectrogram frames and the audio encoder takes "
        r"at most 64: use a window of 0.63 s or less$",
    ):
        check_data_matches_model(data, model_config)
    data.audio_max_length_s = 0.63
    check_data_matches_model(data, model_config)
    data.audio_truncation = "fusion"
    with pytest.raises(
        SetupError, match=r"data.audio_truncation='fusion' but the audio encoder is unfused; use 'rand_trunc'"
    ):
        check_data_matches_model(data, model_config)
