"""`python -m avllm_jax.chat` on a tiny random checkpoint converted from HF CLIP, CLAP and LLaMA:
the streamed answer is exactly `answer_questions`' answer, the multi-turn chat keeps the
conversation, the ids it feeds the model are the training pipeline's ids of the same
conversation up to the last "ASSISTANT:", and a forced modality the file lacks is refused by name."""

import io

import numpy as np
import pytest
import torch
import transformers
from hf_reference import build_hf, save_tiny_tokenizer

import avllm_jax
from avllm_jax import chat, convert
from avllm_jax.data import conversation, samples
from avllm_jax.data.media import load_media, write_media
from avllm_jax.inference import generate as gen
from avllm_jax.inference import prompts
from avllm_jax.modality import IGNORE_INDEX, Modality

NUM_FRAMES = 4
MAX_NEW = 10
CLIP = dict(
    image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
)
CLAP = dict(
    spec_size=256, window_size=8, depths=[1, 1], num_attention_heads=[2, 4], patch_embeds_hidden_size=16, mlp_ratio=2.0
)
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _strengthen(model, std=0.2):
    """HF's init (std 0.02) makes every prompt ending in "ASSISTANT:" get the same answer; wider
    weights make the answer depend on the conversation and the media."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.parameters():
            if tensor.ndim >= 2:
                tensor.copy_(std * torch.randn(tensor.shape, generator=generator))
    return model


def write_converted_model(root):
    """Random-weight CLIP, CLAP and (strengthened) Llama checkpoints under `root`, converted into
    root / "model" with tools/convert_hf_weights.py's code; returns that directory."""
    build_hf(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**CLIP)).save_pretrained(root / "clip")
    build_hf(transformers.ClapAudioModel, transformers.ClapAudioConfig(**CLAP)).save_pretrained(root / "clap")
    tokenizer = save_tiny_tokenizer(root / "llm")
    llm = _strengthen(
        build_hf(transformers.LlamaForCausalLM, transformers.LlamaConfig(vocab_size=len(tokenizer), **LLAMA))
    )
    llm.save_pretrained(root / "llm")
    out = root / "model"
    convert.main(
        ["--clip", str(root / "clip"), "--clap", str(root / "clap"), "--llm", str(root / "llm"), "--out", str(out)]
    )
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    out = write_converted_model(root)

    rng = np.random.default_rng(0)
    frames = np.zeros((8, 48, 48, 3), np.uint8)
    for t in range(8):  # a red square moving right
        frames[t, 16:32, 4 * t : 4 * t + 16, 0] = 255
    tone = (0.3 * np.sin(2 * np.pi * 660 * np.arange(72000) / 48000) + 0.01 * rng.standard_normal(72000)).astype(
        np.float32
    )
    write_media(root / "clip.mp4", frames=frames, audio=tone)
    write_media(root / "silent.mp4", frames=frames)
    model = avllm_jax.load_model(out)
    return {
        "dir": str(out),
        "video": str(root / "clip.mp4"),
        "silent": str(root / "silent.mp4"),
        "model": model,
        "tokenizer": conversation.load_tokenizer(out),
    }


def run_chat(checkpoint, *extra):
    return chat.main(
        [
            "--checkpoint",
            checkpoint["dir"],
            "--media",
            checkpoint["video"],
            "--num-frames",
            str(NUM_FRAMES),
            "--max-new-tokens",
            str(MAX_NEW),
            *extra,
        ]
    )


def expected_answers(checkpoint, questions):
    media = load_media(checkpoint["video"], num_frames=NUM_FRAMES, image_size=32)
    assert media.has_visual and media.has_audio
    return prompts.answer_questions(
        checkpoint["model"], checkpoint["tokenizer"], [media] * len(questions), questions, max_new_tokens=MAX_NEW
    )


def test_question_prints_what_answer_questions_answers(checkpoint, capsys):
    question = "What colour is the square?"
    answers = run_chat(checkpoint, "--question", question)
    printed = capsys.readouterr()
    expected = expected_answers(checkpoint, [question])[0]
    assert expected and printed.out == expected + "\n" and answers == [expected]
    assert "modality: audio_visual (from the file's streams)" in printed.err


def test_multi_turn_keeps_the_conversation(checkpoint, capsys, monkeypatch):
    first, second = "What colour is the square?", "How many beeps do you hear?"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{first}\n\n{second}\nexit\nnever asked\n"))
    answers = run_chat(checkpoint)
    printed = capsys.readouterr().out
    assert len(answers) == 2
    assert answers[0] == expected_answers(checkpoint, [first])[0]
    assert f"ASSISTANT: {answers[0]}\n" in printed and f"ASSISTANT: {answers[1]}\n" in printed
    # The second answer continues the whole conversation, the media token in the first turn only.
    turns = [
        (conversation.USER_ROLE, conversation.first_user_message(first, Modality.AUDIO_VISUAL)),
        (conversation.ASSISTANT_ROLE, answers[0]),
        (conversation.USER_ROLE, second),
    ]
    media = load_media(checkpoint["video"], num_frames=NUM_FRAMES, image_size=32)
    model, tokenizer = checkpoint["model"], checkpoint["tokenizer"]
    batch = prompts.conversation_batch(model, tokenizer, [media], [turns], [Modality.AUDIO_VISUAL])
    tokens, length = gen.generate(model, batch, max_new_tokens=MAX_NEW, eos_token_id=tokenizer.eos_token_id)
    assert answers[1] == prompts.decode_answer(tokenizer, np.asarray(tokens[0])[: int(length[0])])
    assert answers[1] != expected_answers(checkpoint, [second])[0]  # the history changed the answer


def test_chat_feeds_the_training_ids_up_to_the_last_answer(checkpoint, capsys, monkeypatch):
    """Each turn's prompt, as chat feeds it to the model, equals the ids the training pipeline
    builds for the conversation so far with that turn's answer, cut right after the last
    "ASSISTANT:": the position where that answer's labels start."""
    model, tokenizer = checkpoint["model"], checkpoint["tokenizer"]
    questions = ["What colour is the square?", "And how many beeps do you hear?", "Which way does it move?"]
    scripted = ["a red square", "three beeps", "to the right"]  # the answers chat is made to give
    fed = []

    def stream_tokens(model, batch, **_):  # records the batch and "generates" the scripted answer
        fed.append(batch)
        yield from tokenizer(scripted[len(fed) - 1], add_special_tokens=False)["input_ids"]

    monkeypatch.setattr("avllm_jax.inference.generate.stream_tokens", stream_tokens)
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(q + "\n" for q in questions)))
    answers = run_chat(checkpoint)
    capsys.readouterr()
    assert len(fed) == len(answers) == 3 and answers[0] == "a red square"

    # The training side: the pipeline's media loading and sample building, as for a training batch.
    data_config = prompts.inference_data_config(model, checkpoint["dir"], num_frames=NUM_FRAMES)
    media = samples.load_file_media(checkpoint["video"], data_config)
    turns = []
    for question, answer, batch in zip(questions, answers, fed):
        first = not turns
        turns += [
            (
                conversation.USER_ROLE,
                conversation.first_user_message(question, Modality.AUDIO_VISUAL) if first else question,
            ),
            (conversation.ASSISTANT_ROLE, answer),
        ]
        sample = samples.build_sample(
            turns,
            media,
            Modality.AUDIO_VISUAL,
            data_config,
            tokenizer,
            rng=np.random.default_rng(0),
            max_length=data_config.max_text_length,
        )
        ids, labels = sample["input_ids"], sample["labels"]
        prompt = np.asarray(batch["input_ids"][0])[np.asarray(batch["token_mask"][0])]
        cut = prompt.size
        np.testing.assert_array_equal(prompt, ids[:cut])
        assert ids.size > cut and tokenizer.decode(ids[:cut]).endswith(f"{conversation.ASSISTANT_ROLE}:")
        labelled = np.flatnonzero(labels != IGNORE_INDEX)
        answer_starts = labelled[np.r_[0, np.flatnonzero(np.diff(labelled) > 1) + 1]]
        assert len(answer_starts) == len(turns) // 2 and answer_starts[-1] == cut
        np.testing.assert_array_equal(np.asarray(batch["labels"][0])[:cut], labels[:cut])  # earlier answers only
        for key in ("frames", "audio_features", "audio_is_longer", "has_visual", "has_audio"):
            np.testing.assert_array_equal(np.asarray(batch[key][0]), sample[key], err_msg=key)


def test_forced_modality_needs_its_stream(checkpoint):
    with pytest.raises(SystemExit, match=r"modality 'audio' needs an audio stream, which .*silent\.mp4 lacks"):
        chat.main(
            [
                "--checkpoint",
                checkpoint["dir"],
                "--media",
                checkpoint["silent"],
                "--modality",
                "audio",
                "--question",
                "Hi?",
            ]
        )


def test_audio_settings_the_htsat_cannot_take_are_one_line(checkpoint):
    """A 256-pixel HTSAT holds 4 x 256 = 1024 spectrogram frames: 10.23 s, not 20."""
    base = ["--checkpoint", checkpoint["dir"], "--media", checkpoint["video"], "--question", "Hi?"]
    with pytest.raises(
        SystemExit,
        match=r"^error: audio_max_length_s=20 gives 2001 spectrogram frames and the audio encoder takes "
        r"at most 1024: use a window of 10.23 s or less \(--audio-window-s, --audio-truncation\)$",
    ):
        chat.main(base + ["--audio-window-s", "20"])
    with pytest.raises(
        SystemExit, match=r"audio_truncation='fusion' but the audio encoder is unfused; use 'rand_trunc'"
    ):
        chat.main(base + ["--audio-truncation", "fusion"])


def test_stream_printer_holds_back_what_may_change():
    out = io.StringIO()
    printer = chat._StreamPrinter(out)
    for text in [" The", " The red ", " The red sq\ufffd", " The red square", " The red square. "]:
        printer.update(text)
    assert out.getvalue() == "The red square."
    printer.update(" The red square. ", final=True)
    assert out.getvalue() == "The red square."
