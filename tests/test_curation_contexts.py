"""Context extraction: tiny random-weight BLIP and CLAP from configs, media written with PyAV."""

import importlib.util
import json
import string
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import transformers

from avllm_jax.curation.contexts import ClapLabeller, TransformersCaptioner, extract_contexts, find_media, read_labels
from avllm_jax.curation.instructions import read_finished
from avllm_jax.data.media import load_media

_cli_spec = importlib.util.spec_from_file_location(
    "extract_contexts_cli", Path(__file__).parents[1] / "tools" / "extract_contexts.py"
)
extract_cli = importlib.util.module_from_spec(_cli_spec)
_cli_spec.loader.exec_module(extract_cli)

SR = 48000
LABELS = ["a dog barking", "rain falling", "a piano", "people talking", "an engine"]


def write_video(path, seconds=2.0, fps=10, with_audio=True, shade=0):
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("aac", rate=SR) if with_audio else None
        if audio:
            audio.layout = "mono"
        for i in range(int(seconds * fps)):  # brightness rises over time: every sampled frame differs
            frame = np.full((48, 64, 3), (shade + 11 * i) % 256, np.uint8)
            frame[:, :, 1] = 255 - frame[:, :, 0]
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        if audio:
            write_tone(container, audio, seconds, 220 + shade)


def write_tone(container, stream, seconds, hz):
    t = np.arange(int(seconds * SR)) / SR
    wave = (0.3 * np.sin(2 * np.pi * hz * t) * np.linspace(0.2, 1, t.size)).astype(np.float32)
    for start in range(0, wave.size, 1024):
        frame = av.AudioFrame.from_ndarray(wave[None, start : start + 1024], format="fltp", layout="mono")
        frame.sample_rate = SR
        container.mux(stream.encode(frame))
    container.mux(stream.encode())


def write_audio(path, seconds=2.0):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=SR)
        stream.layout = "mono"
        write_tone(container, stream, seconds, 880)


def write_image(path):
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 40, 30, "rgb24"
        image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
        container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    write_video(root / "street.mp4", shade=0)
    (root / "sub").mkdir()
    write_video(root / "sub" / "park.mp4", shade=90)
    write_video(root / "silent.mp4", with_audio=False, shade=40)
    write_audio(root / "bell.wav")
    write_image(root / "photo.png")
    (root / "broken.mp4").write_text("this is not a video")
    (root / "notes.txt").write_text("not media, not listed")
    return root


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    path = tmp_path_factory.mktemp("blip")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "[DEC]",
        *"a dog cat on the beach runs man woman street park car".split(),
    ]
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    processor = transformers.BlipProcessor(
        image_processor=transformers.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
    )
    config = transformers.BlipConfig(
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(
            vocab_size=len(words),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            encoder_hidden_size=16,
            bos_token_id=5,
            pad_token_id=0,
            sep_token_id=3,
            eos_token_id=3,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    transformers.BlipForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory):
    path = tmp_path_factory.mktemp("clap")
    vocab = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", *string.ascii_lowercase, "Ġ", "."]
    tokenizer = transformers.RobertaTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, merges=[])
    processor = transformers.ClapProcessor(
        feature_extractor=transformers.ClapFeatureExtractor(truncation="rand_trunc"), tokenizer=tokenizer
    )
    config = transformers.ClapConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        audio_config=dict(
            depths=[1, 1],
            num_attention_heads=[1, 2],
            patch_embeds_hidden_size=8,
            hidden_size=16,
            window_size=8,
            spec_size=256,
            num_mel_bins=64,
            enable_fusion=False,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = transformers.ClapModel(config)
    with torch.no_grad():  # spread the label embeddings so that the nearest label is a clear choice
        model.text_projection.linear2.weight.mul_(50.0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def frame_brightness_captioner(frames):
    return [f"brightness {int(f[..., 0].mean())}" for f in frames]


def audio_loudness_captioner(segments):
    return [f"loudness {float(np.abs(s).mean()):.4f}" for s in segments]


def test_find_media_ids_and_errors(media_dir, tmp_path):
    found = dict(find_media([media_dir]))
    assert set(found) == {"street", "sub/park", "silent", "bell", "photo", "broken"}
    assert found["sub/park"] == str(media_dir / "sub" / "park.mp4")
    assert find_media([media_dir / "bell.wav"]) == [("bell", str(media_dir / "bell.wav"))]
    with pytest.raises(FileNotFoundError, match="nothing.mp4"):
        find_media([tmp_path / "nothing.mp4"])
    with pytest.raises(ValueError, match="share the ids"):
        find_media([media_dir / "street.mp4", media_dir / "street.mp4"])


@pytest.mark.parametrize("batch_size", [3, 64])
def test_extract_contexts_records_per_file_and_kind(media_dir, tmp_path, batch_size):
    out = tmp_path / "contexts.jsonl"
    media = find_media([media_dir])
    counts = extract_contexts(
        media,
        out,
        frame_brightness_captioner,
        audio_loudness_captioner,
        num_frames=4,
        image_size=32,
        num_audio_segments=3,
        batch_size=batch_size,
    )
    assert counts == {"already_done": 0, "video": 3, "audio": 1, "image": 1, "unreadable": 1}
    records = {r["id"]: r for r in read_finished(out)}
    assert set(records) == {"street", "sub/park", "silent", "bell", "photo"}
    assert records["photo"]["image"].endswith("photo.png") and records["bell"]["audio"].endswith("bell.wav")
    # Each file's captions are those of its own frames and segments, in time order.
    for media_id, path in media:
        if media_id == "broken":
            continue
        decoded = load_media(path, num_frames=4, image_size=32, num_audio_segments=3)
        expected_visual = frame_brightness_captioner(decoded.frames) if decoded.has_visual else []
        expected_audio = audio_loudness_captioner(decoded.audio) if decoded.has_audio else []
        assert records[media_id]["visual_captions"] == expected_visual, media_id
        assert records[media_id]["audio_captions"] == expected_audio, media_id
        kind = next(k for k in ("video", "image", "audio") if k in records[media_id])
        assert (out.parent / records[media_id][kind]).resolve() == Path(path).resolve()
    assert len(set(records["street"]["visual_captions"])) == 4  # the check above could tell frames apart
    assert len(records["photo"]["visual_captions"]) == 1 and records["silent"]["audio_captions"] == []


def test_extract_contexts_resumes(media_dir, tmp_path):
    out = tmp_path / "contexts.jsonl"
    media = find_media([media_dir])
    assert [i for i, _ in media[:3]] == ["bell", "broken", "photo"]
    extract_contexts(media[:3], out, frame_brightness_captioner, None, num_frames=2, image_size=32)
    first = out.read_text()
    seen = []

    def counting_captioner(frames):
        seen.append(len(frames))
        return frame_brightness_captioner(frames)

    counts = extract_contexts(media, out, counting_captioner, None, num_frames=2, image_size=32)
    assert counts["already_done"] == 2
    assert out.read_text().startswith(first)
    ids = [r["id"] for r in read_finished(out)]
    assert len(ids) == len(set(ids)) == 5  # broken stays out, nothing twice
    assert sum(seen) == 3 * 2  # only the three videos not done before (broken is tried again, and fails)


def test_transformers_captioner_matches_the_hf_model(tiny_blip, media_dir):
    frames = load_media(media_dir / "street.mp4", num_frames=3, image_size=32).frames
    captioner = TransformersCaptioner(tiny_blip, max_new_tokens=6)
    assert captioner.image_size == 32
    processor = transformers.AutoProcessor.from_pretrained(tiny_blip)
    model = transformers.BlipForConditionalGeneration.from_pretrained(tiny_blip).eval()
    with torch.no_grad():
        tokens = model.generate(**processor(images=list(frames), return_tensors="pt"), max_new_tokens=6)
    expected = [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]
    assert captioner(frames) == expected
    assert all(expected)
    # With a prompt, BLIP continues it; the caption keeps only the continuation.
    prompted = TransformersCaptioner(tiny_blip, max_new_tokens=6, prompt="a dog")(frames)
    with torch.no_grad():
        inputs = processor(images=list(frames), text=["a dog"] * 3, return_tensors="pt")
        raw = processor.batch_decode(model.generate(**inputs, max_new_tokens=6), skip_special_tokens=True)
    assert all(r.startswith("a dog") for r in raw)
    assert prompted == [r[len("a dog") :].strip() for r in raw]


def test_clap_labeller_picks_the_nearest_label(tiny_clap, media_dir):
    segments = load_media(media_dir / "street.mp4", num_frames=1, image_size=32, num_audio_segments=2).audio
    labeller = ClapLabeller(LABELS, tiny_clap, template="The sound of {}.")
    captions = labeller(segments)
    processor = transformers.AutoProcessor.from_pretrained(tiny_clap)
    model = transformers.ClapModel.from_pretrained(tiny_clap).eval()
    with torch.no_grad():
        text = model.get_text_features(
            **processor(text=[f"The sound of {label}." for label in LABELS], return_tensors="pt", padding=True)
        ).pooler_output
        audio = model.get_audio_features(
            **processor(audio=list(segments), sampling_rate=SR, return_tensors="pt")
        ).pooler_output
    similarity = torch.nn.functional.normalize(audio, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    top2 = similarity.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1] > 1e-3).all()  # a clear winner, so the comparison below means something
    assert captions == [f"The sound of {LABELS[i]}." for i in similarity.argmax(-1).tolist()]


def test_read_labels(tmp_path):
    (tmp_path / "labels.txt").write_text("# comment\n\n  a dog barking \nrain\n")
    assert read_labels(tmp_path / "labels.txt") == ["a dog barking", "rain"]
    assert len(read_labels()) > 50  # the shipped default list
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no labels"):
        read_labels(tmp_path / "empty.txt")


def test_cli_with_tiny_models(tiny_blip, tiny_clap, media_dir, tmp_path, capsys):
    out = tmp_path / "contexts.jsonl"
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS))
    argv = [
        "--media",
        str(media_dir / "street.mp4"),
        str(media_dir / "photo.png"),
        "--out",
        str(out),
        "--captioner",
        tiny_blip,
        "--clap",
        tiny_clap,
        "--audio-labels",
        str(labels),
        "--num-frames",
        "2",
        "--num-audio-segments",
        "2",
    ]
    assert extract_cli.main(argv) == 0
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(records["street"]["visual_captions"]) == 2 and len(records["photo"]["visual_captions"]) == 1
    assert len(records["street"]["audio_captions"]) == 2
    assert all(c.removeprefix("The sound of ").removesuffix(".") in LABELS for c in records["street"]["audio_captions"])
    assert "video: 1" in capsys.readouterr().out
