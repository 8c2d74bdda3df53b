"""The command-line convention (avllm_jax/cli.py, docs/cli.md): every entry point turns a user
error into one line with a documented exit status, before any model loads, and takes --debug.

The subprocess tests drive each entry point's bad inputs as a user would; they fail before any
weights load, so each takes the seconds that importing JAX takes."""

import importlib
import json
import logging
import subprocess
import sys

import pytest
from tiny_models import tiny_config, tiny_tokenizer
from training_runs import REPO, environment

from avllm_jax import checkpoint, cli
from avllm_jax.errors import EXIT_ERROR, EXIT_USAGE, AvllmError, UsageError
from avllm_jax.training import config as config_lib

DEMO_CONFIG = str(REPO / "configs/demo.py")


def run(*argv, cwd=None):
    """`python ARGV...` (a module with -m, or a tool's path) as a user runs it."""
    return subprocess.run(
        [sys.executable, *argv], check=False, env=environment(), capture_output=True, text=True, timeout=120, cwd=cwd
    )


def assert_one_line_error(result, *needles, code=EXIT_ERROR):
    """Exit `code`, and stderr's last line is the only error line: `error: ...` holding every needle."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and lines, result.stderr[-3000:]
    assert lines[-1].startswith("error: ") and [line for line in lines if line.startswith("error:")] == lines[-1:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    assert "PyTorch was not found" not in result.stderr + result.stdout
    assert "loading " not in result.stderr  # no model started loading


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A model directory holding only its config (no weights: nothing may load them), a
    tokenizer, a media file that is not media, and an instruction file."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = tiny_tokenizer()
    checkpoint.write_model_config(str(root / "model"), tiny_config(tokenizer))
    tokenizer.save_pretrained(root / "tokenizer")
    (root / "not_media.mp4").write_bytes(b"not a video")
    (root / "data.jsonl").write_text(json.dumps({"video": "a.mp4", "conversations": []}) + "\n")
    return root


@pytest.fixture(autouse=True)
def _restore_logging():
    """The commands run in-process here set up logging; later tests get the root logger back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in set(root.handlers) - set(handlers):
        root.removeHandler(handler)
    root.setLevel(level)
    cli._handlers.clear()


def in_process(main, argv, capsys):
    """(exit status, stderr lines) of a command's main run here: the path the subprocess takes,
    without starting Python and JAX again."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err.strip().splitlines()


def assert_in_process_error(main, argv, capsys, *needles, code=EXIT_ERROR):
    status, lines = in_process(main, argv, capsys)
    assert status == code and lines and lines[-1].startswith("error: "), (status, lines)
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], lines
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


# The shared pieces, in-process.


def test_flags_take_hyphens_or_underscores_and_errors_are_usage_errors():
    parser = cli.Parser("prog")
    parser.add_argument("--max-new-tokens", type=int, default=1)
    assert parser.parse_args(["--max_new_tokens=7"]).max_new_tokens == 7
    assert parser.parse_args(["--max-new-tokens", "8"]).max_new_tokens == 8
    with pytest.raises(UsageError, match=r"argument --max-new-tokens: invalid int value: 'x'") as error:
        parser.parse_args(["--max-new-tokens=x"])
    assert error.value.exit_code == EXIT_USAGE
    with pytest.raises(UsageError, match=r"unrecognized arguments: --nope"):
        parser.parse_args(["--nope"])


def config_parser():
    parser = cli.Parser("prog")
    parser.add_config_flag("config", config_lib.unknown_field)
    return parser


def test_config_overrides_apply_in_any_order_with_the_fields_types():
    args = config_parser().parse_args(
        [
            "--config.num_steps=7",
            "--config",
            DEMO_CONFIG,
            "--config.optim.learning_rate",
            "3",
            "--config.data.shuffle_seed=5",
        ]
    )
    assert args.config.num_steps == 7 and args.config.optim.learning_rate == 3.0 and args.config.data.shuffle_seed == 5
    assert isinstance(args.config.optim.learning_rate, float)


def test_config_mistakes_name_their_cause(tmp_path):
    with pytest.raises(UsageError) as error:  # the value, not the config file, is to blame
        config_parser().parse_args(["--config", DEMO_CONFIG, "--config.num_steps=abc"])
    assert str(error.value).startswith("--config.num_steps=abc: invalid literal for int()")
    with pytest.raises(
        UsageError, match=r"^--config\.optim\.lr: config\.optim\.lr is not a field \(choose from beta1, .*learning_rate"
    ):
        config_parser().parse_args(["--config", DEMO_CONFIG, "--config.optim.lr=1"])
    missing = str(tmp_path / "nothere.py")
    with pytest.raises(UsageError) as error:
        config_parser().parse_args(["--config", missing])
    assert str(error.value) == f"--config={missing}: the config file {missing} does not exist (No such file)"


@pytest.mark.parametrize(
    "old, new", [("num_epochs", "train_epochs"), ("seed", "init_seed"), ("data.seed", "data.shuffle_seed")]
)
def test_a_renamed_field_names_its_new_name(tmp_path, old, new):
    with pytest.raises(UsageError, match=rf"^--config\.{old}: config\.{old} was renamed config\.{new}$"):
        config_parser().parse_args(["--config", DEMO_CONFIG, f"--config.{old}=1"])
    # In a config file too: check_config says it.
    config = config_lib.base_config()
    *blocks, field = old.split(".")
    node = config
    for block in blocks:
        node = node[block]
    node[field] = 1
    with pytest.raises(config_lib.ConfigError, match=rf"config\.{old} was renamed config\.{new}"):
        config_lib.check_config(config)


def test_a_failing_config_file_is_named(tmp_path):
    failing = tmp_path / "failing.py"
    failing.write_text("def get_config():\n    return 1 / 0\n")
    with pytest.raises(UsageError, match=rf"^config file {failing}: ZeroDivisionError: division by zero$"):
        config_parser().parse_args(["--config", str(failing)])


def test_entry_point_turns_a_user_error_into_one_line_and_its_status(capsys):
    @cli.entry_point
    def main(argv):
        raise AvllmError(f"bad {argv[0]}")

    with pytest.raises(SystemExit) as exit:
        main(["input"])
    assert exit.value.code == EXIT_ERROR and str(exit.value) == "error: bad input"
    assert capsys.readouterr().err == "error: bad input\n"
    with pytest.raises(AvllmError, match="bad --debug"):  # --debug: the exception itself, with its traceback
        main(["--debug"])


def test_every_library_error_has_the_base():
    from avllm_jax import cache_features, export, plan, runtime, train
    from avllm_jax.curation import client
    from avllm_jax.data import conversation, feature_cache, media, pipeline
    from avllm_jax.evaluation import processes
    from avllm_jax.inference import chat_requests
    from avllm_jax.models import conversion

    errors = [
        processes.ProcessGroupError,
        config_lib.ConfigError,
        export.ExportError,
        runtime.DistributedError,
        cache_features.CacheBuildError,
        client.ChatError,
        conversion.ConversionError,
        plan.PlanError,
        checkpoint.CheckpointError,
        checkpoint.CheckpointMismatch,
        media.MediaError,
        pipeline.DataError,
        conversation.MalformedSampleError,
        conversation.PromptTooLongError,
        feature_cache.FeatureCacheError,
        train.SetupError,
        chat_requests.RequestError,
    ]
    assert [e.__name__ for e in errors if not issubclass(e, AvllmError)] == []


# Each entry point's bad inputs, as subprocesses.


def test_chat_bad_inputs(inputs, tmp_path, capsys):
    from avllm_jax import chat

    assert_one_line_error(
        run("-m", "avllm_jax.chat", "--checkpoint", str(tmp_path / "none"), "--media", "x.mp4"),
        f"--checkpoint {tmp_path / 'none'}:",
        "has no config.json",
        code=EXIT_USAGE,
    )
    assert_in_process_error(chat.main, ["--media", "x.mp4"], capsys, "required: --checkpoint", code=EXIT_USAGE)
    model, gone = str(inputs / "model"), str(tmp_path / "gone.mp4")
    assert_in_process_error(
        chat.main,
        ["--checkpoint", model, "--media", gone],
        capsys,
        f"--media {gone}: the media file does not exist",
        code=EXIT_USAGE,
    )
    # Decoded before the weights load: the model directory has none, so reaching them would fail otherwise.
    assert_in_process_error(
        chat.main, ["--checkpoint", model, "--media", str(inputs / "not_media.mp4")], capsys, "not_media.mp4"
    )


def test_evaluate_bad_inputs(inputs, tmp_path, capsys):
    from avllm_jax import evaluate

    model, out = str(inputs / "model"), str(tmp_path / "out")

    def check(argv, *needles, code=EXIT_ERROR):
        assert_in_process_error(
            evaluate.main, ["--checkpoint", model, "--out", out, *argv], capsys, *needles, code=code
        )

    assert_one_line_error(
        run("-m", "avllm_jax.evaluate", "--checkpoint", model, "--out", out, "--task", "jsonl"),
        "required: --data",
        code=EXIT_USAGE,
    )
    gone = str(tmp_path / "gone.json")
    check(
        ["--task", "msrvtt_qa", "--data", gone, "--media-root", str(tmp_path)],
        f"--data {gone}: the annotation file does not exist",
        code=EXIT_USAGE,
    )
    # An instruction file given as MSRVTT-QA, and an MSRVTT-QA file given as instructions.
    check(
        ["--task", "msrvtt_qa", "--data", str(inputs / "data.jsonl"), "--media-root", str(tmp_path)],
        f"--data {inputs / 'data.jsonl'} is not in the msrvtt_qa layout",
        "expected a JSON list of objects",
    )
    msrvtt = tmp_path / "test_qa.json"
    msrvtt.write_text(json.dumps([{"id": 0, "video_id": 1, "question": "what?", "answer": "a dog"}]))
    check(["--task", "jsonl", "--data", str(msrvtt)], f"--data {msrvtt} is not in the jsonl layout")
    check(["--task", "msrvtt_qa", "--data", str(msrvtt)], "--media-root is required", code=EXIT_USAGE)
    check(
        ["--task", "msrvtt_qa", "--data", str(msrvtt), "--media-root", str(tmp_path)],
        f"--media-root {tmp_path}: none of the media of the 1 annotated samples",
        "video1",
    )
    (tmp_path / "video1.mp4").write_bytes(b"")
    assert_in_process_error(
        evaluate.main,
        ["--checkpoint", str(tmp_path / "none"), "--out", out, "--task", "msrvtt_qa"]
        + ["--data", str(msrvtt), "--media-root", str(tmp_path)],
        capsys,
        f"--checkpoint {tmp_path / 'none'}: ",
        "has no config.json",
        code=EXIT_USAGE,
    )
    assert not (tmp_path / "out").exists()


def test_train_bad_inputs(inputs, tmp_path, capsys):
    from avllm_jax import train

    config = ["--config", DEMO_CONFIG, f"--config.tokenizer={inputs / 'tokenizer'}"]
    # A bad value before --config: blamed on the flag (not the file), and no FlagOrderError.
    result = run("-m", "avllm_jax.train", "--config.num_steps=abc", *config, "--workdir", str(tmp_path / "run"))
    assert_one_line_error(result, "--config.num_steps=abc: invalid literal for int()", code=EXIT_USAGE)
    assert "config file" not in result.stderr and "FlagOrderError" not in result.stderr
    assert_in_process_error(train.main, config, capsys, "required: --workdir", code=EXIT_USAGE)
    gone = tmp_path / "gone.jsonl"
    assert_in_process_error(
        train.main,
        [*config, f"--config.data.sources=({{'path': '{gone}', 'weight': 1.0}},)", "--workdir", str(tmp_path / "run")],
        capsys,
        f"data.sources[0].path: {gone} is no instruction file (no such file)",
    )
    assert_in_process_error(
        train.main,
        ["--config", DEMO_CONFIG, f"--config.tokenizer={tmp_path}/nothing", "--workdir", str(tmp_path / "run")],
        capsys,
        f"config.tokenizer {tmp_path}/nothing: no such directory",
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_plan_bad_inputs(tmp_path, capsys):
    from avllm_jax import plan

    assert_one_line_error(
        run("-m", "avllm_jax.plan", "--config", DEMO_CONFIG, "--topology=v9-8"), "unknown topology 'v9-8'"
    )
    assert_in_process_error(plan.main, ["--config", DEMO_CONFIG], capsys, "required: --topology", code=EXIT_USAGE)
    assert_in_process_error(
        plan.main,
        ["--topology=cpu:1", "--config", str(tmp_path / "none.py")],
        capsys,
        "the config file",
        "does not exist",
        code=EXIT_USAGE,
    )


def test_cache_features_bad_inputs(inputs, tmp_path, capsys):
    from avllm_jax import cache_features

    config = ["--config", DEMO_CONFIG, f"--config.tokenizer={inputs / 'tokenizer'}"]
    assert_one_line_error(
        run("tools/cache_features.py", *config, "--out", str(tmp_path / "c"), "--shard=3", cwd=REPO),
        "--shard='3': expected I/N",
    )
    assert_in_process_error(cache_features.main, config, capsys, "required: --out", code=EXIT_USAGE)
    assert not (tmp_path / "c").exists()


def test_web_bad_inputs(inputs, tmp_path, capsys):
    assert_one_line_error(
        run("-m", "avllm_jax.web", "--checkpoint", str(tmp_path / "none")),
        f"--checkpoint {tmp_path / 'none'}: ",
        code=EXIT_USAGE,
    )
    web = importlib.import_module("avllm_jax.web")
    gone = str(tmp_path / "gone.mp4")
    assert_in_process_error(
        web.main,
        ["--checkpoint", str(inputs / "model"), "--examples", gone],
        capsys,
        f"--examples {gone}: the example media file does not exist",
        code=EXIT_USAGE,
    )


def test_convert_and_export_bad_inputs(inputs, tmp_path, capsys):
    from avllm_jax import convert, export

    assert_one_line_error(
        run("tools/convert_hf_weights.py", "--clip", str(tmp_path / "clip"), "--out", str(tmp_path / "o"), cwd=REPO),
        f"--clip {tmp_path / 'clip'}: the Hugging Face model directory does not exist",
        code=EXIT_USAGE,
    )
    assert_in_process_error(convert.main, ["--out", str(tmp_path / "o")], capsys, "nothing to convert")
    assert_one_line_error(
        run("tools/export_hf.py", str(tmp_path / "none"), "--out", str(tmp_path / "e"), cwd=REPO),
        f"{tmp_path / 'none'} has no config.json",
    )
    assert_in_process_error(export.main, [str(inputs / "model")], capsys, "required: --out", code=EXIT_USAGE)


def test_serve_bad_inputs(inputs, tmp_path, capsys):
    from avllm_jax import serve

    assert_one_line_error(
        run("-m", "avllm_jax.serve", "--checkpoint", str(tmp_path / "none")),
        f"--checkpoint {tmp_path / 'none'}: ",
        code=EXIT_USAGE,
    )
    model = str(inputs / "model")
    gone = str(tmp_path / "gone")
    for argv, message in (
        (["--media-root", gone], f"--media-root {gone}: the media folder does not exist"),
        (["--max-batch", "0"], "--max-batch must be positive, got 0"),
        (["--audio-window-s", "20"], "audio_max_length_s=20"),
    ):
        code = EXIT_ERROR if "audio" in message else EXIT_USAGE
        assert_in_process_error(serve.main, ["--checkpoint", model, *argv], capsys, message, code=code)


# Runs `python -m MODULE ARGS...` as if the extras' packages were not installed: importing one
# raises ModuleNotFoundError, as on a bare `pip install .` (tools/check_install.sh does it for real).
WITHOUT_EXTRAS = """import runpy, sys
for name in ("gradio", "fastapi", "uvicorn"):
    sys.modules[name] = None
module = sys.argv.pop(1)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module, extra, first_missing", [("web", "web", "gradio"), ("serve", "serve", "fastapi")])
def test_web_and_serve_need_their_extra_only_after_checking_their_flags(inputs, tmp_path, module, extra, first_missing):
    without_extras = ("-c", WITHOUT_EXTRAS, f"avllm_jax.{module}")
    shown = run(*without_extras, "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: "), shown.stderr[-3000:]
    assert_one_line_error(
        run(*without_extras, "--checkpoint", str(tmp_path / "none")), f"--checkpoint {tmp_path / 'none'}: ", code=2
    )
    assert_one_line_error(
        run(*without_extras, "--checkpoint", str(inputs / "model")),
        f"error: {first_missing} is not installed",
        f"install the '{extra}' extra, pip install -c constraints.txt -e '.[{extra}]'",
    )


def test_require_extra_keeps_the_traceback_of_a_broken_install(monkeypatch, tmp_path):
    # The extra's package is there but fails to import one of its own dependencies: not a
    # missing extra, so the real error and its traceback stay.
    (tmp_path / "broken_extra.py").write_text("import a_module_that_is_not_there\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="a_module_that_is_not_there"):
        cli.require_extra("web", "broken_extra")
    with pytest.raises(AvllmError, match="not_installed_at_all is not installed"):
        cli.require_extra("web", "not_installed_at_all")


@pytest.mark.parametrize(
    "module", ["train", "plan", "evaluate", "chat", "web", "serve", "cache_features", "convert", "export"]
)
def test_every_entry_point_has_help_debug_and_log_level(module, capsys):
    main = importlib.import_module(f"avllm_jax.{module}").main
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert exit.value.code == 0 and help_text.startswith("usage: ")
    assert "--debug" in help_text and "--log-level" in help_text


def test_logging_replaces_a_dependency_s_basic_config_and_splits_training_s_streams(capsys):
    basic = logging.StreamHandler()  # basicConfig's, which absl installs on its first log call
    basic.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    logging.getLogger().addHandler(basic)
    cli.configure_logging(cli.Parser("prog").parse_args([]), stream="stdout")
    log = logging.getLogger("avllm_jax.test")
    log.info("a step line")
    log.warning("a fall-back")
    logging.getLogger("orbax").info("a save")  # dependencies: WARNING and above only
    printed = capsys.readouterr()
    assert printed.out == "a step line\n" and printed.err == "warning: a fall-back\n"
    cli.configure_logging(cli.Parser("prog").parse_args([]), process_index=1)  # another process of a job
    log.info("a step line")
    assert capsys.readouterr().out == ""
