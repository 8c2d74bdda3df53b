"""`make demo`: train and evaluate a tiny audio-visual LLM on the synthetic demo data, on CPU.

1. writes the demo data set to demo_out/data: training clips of seen attribute combinations
   with three questions each, and held-out clips, drawn from another seed, half of them made
   of held-out combinations, each clip asked every question of its modality;
2. trains a tokenizer on the demo text and the stand-in's lessons;
3. builds the stand-in for the paper's pretrained models when demo_out/standin is missing (its
   LLM on text lessons, configs/demo.py:standin; with --vision-standin-steps, its CLIP on still
   pictures), and stage 1's start (demo_out/aligned: the stand-in with its projectors fitted to
   the captions' words, align_projectors) when the stand-in is new or it is missing; then trains
   stage 1 (configs/demo.py:pretrain) into demo_out/pretrain and stage 2 (:sft) into
   demo_out/run (rerunning resumes, or skips a finished run);
4. answers every held-out question greedily and scores exact match per question type, for
   seen and unseen combinations, beside chance and the best guess from one stream alone;
5. with --played-back, asks them again about each clip played backwards (frames and audio
   segments in reverse order, scored against the reversed timeline): a model that reads the
   order of the frames changes its answers to the order questions; one that does not keeps them;
6. asks the model one question about a held-out clip through the chat command.

The last line is `demo accuracy: visual=... audio=... audio_visual=... timing=... (unseen combinations: ...)`.
tools/ablate.py trains the paper's Table 4 rows on the same data with these functions.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
import sys
import time

from avllm_jax import cli

GROUPS = ("visual", "audio", "audio_visual", "timing")
STAGES = ("standin", "pretrain", "sft")
# Off by default: the stand-in's CLIP stays random. Pretrained on stills (--vision-standin-steps 2000:
# it names the shape 0.98 and places it within 2.3 px), it made the demo read the shape, but the
# frames' order unevenly across three runs of the previous recipe (docs/demo.md, "A stand-in for CLIP").
VISION_STANDIN_STEPS = 0
VISION_STANDIN_RECORD = "vision_standin.json"  # its steps and scores, in the stand-in's directory
ALIGN_CLIPS = 800  # the training clips stage 1's start is fitted on (about 2,500 frame rows)
CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "demo.py")


@cli.entry_point
def main(argv=None):
    parser = cli.Parser("python tools/demo.py", __doc__)
    parser.add_argument("--out", default="demo_out", help="directory for data, tokenizer and runs (default demo_out)")
    parser.add_argument("--num-train", type=int, default=3000, help="training clips (three questions each)")
    parser.add_argument(
        "--num-eval", type=int, default=300, help="held-out clips (every question of their modality each)"
    )
    parser.add_argument("--num-lessons", type=int, default=20000, help="the stand-in's text samples")
    for stage in STAGES:
        parser.add_argument(
            f"--{stage}-steps", type=int, default=None, help=f"steps of the {stage} run (default: configs/demo.py)"
        )
    parser.add_argument(
        "--vision-standin-steps",
        type=int,
        default=VISION_STANDIN_STEPS,
        help=(
            "steps of 128 still pictures the stand-in's CLIP is pretrained on before it is frozen "
            f"(default {VISION_STANDIN_STEPS}: left random; docs/demo.md, 'The stand-in for CLIP')"
        ),
    )
    parser.add_argument(
        "--standin-only",
        action="store_true",
        help="build the stand-in (demo_out/standin) and stage 1's start (demo_out/aligned), and stop",
    )
    parser.add_argument(
        "--standin-scores",
        action="store_true",
        help="after building the stand-in, print its exact match per question type on held-out lessons",
    )
    parser.add_argument(
        "--probes",
        action="store_true",
        help=(
            "also fit linear probes of what the encoders give the LLM: each frame's colour, place and shape, "
            "each audio segment's beep and pitch, each clip's beep count (print_probes)"
        ),
    )
    parser.add_argument(
        "--played-back",
        action="store_true",
        help=(
            "also ask every held-out question about its clip played backwards "
            "and print how the answers follow the order"
        ),
    )
    args = parser.parse_args(argv)
    cli.configure_logging(args)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    start = time.time()

    paths = prepare(args.out, args.num_train, args.num_eval, args.num_lessons)
    steps = {stage: getattr(args, f"{stage}_steps") for stage in STAGES}
    seconds = {"data": time.time() - start}
    seconds |= build_stage_1_start(paths, steps["standin"], args.vision_standin_steps)
    if args.standin_scores:
        print_lesson_scores(paths["standin"], os.path.join(paths["data"], "heldout_lessons.jsonl"))
    if args.standin_only:
        print(f"stand-in in {paths['standin']}, stage 1's start in {paths['aligned']}: {time.time() - start:.0f} s")
        return
    for stage in ("pretrain", "sft"):
        seconds[stage] = run_training(stage_config(stage, paths, steps[stage]), paths[stage])
    workdir, eval_path = paths["sft"], paths["eval"]
    results = evaluate(workdir, eval_path)
    print_question_table(results)
    if args.played_back:
        print_played_back_table(results, evaluate(workdir, eval_path, played_back=True))
    if args.probes:
        print_probes(workdir, paths)
    chat_once(workdir, eval_path)
    print(
        f"demo wall time {time.time() - start:.0f} s ("
        + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
        + "; a stand-in or start found built counts 0 s)"
    )
    seen, unseen = group_accuracy(results, "seen"), group_accuracy(results, "unseen")
    print(
        "demo accuracy: "
        + " ".join(f"{g}={seen[g]:.2f}" for g in GROUPS)
        + " (unseen combinations: "
        + " ".join(f"{g}={unseen[g]:.2f}" for g in GROUPS)
        + ")"
    )


def prepare(out: str, num_train: int, num_eval: int, num_lessons: int = 20000) -> dict[str, str]:
    """The demo data set, the stand-in's lessons, stage 1's captions and the tokenizer under
    `out` (each written once); returns the paths of everything the runs read and write."""
    from avllm_jax.data import conversation, demo_text, synthetic

    data_dir = os.path.join(out, "data")
    paths = {
        "data": data_dir,
        "eval": os.path.join(data_dir, "eval.jsonl"),
        "lessons": os.path.join(data_dir, "lessons.jsonl"),
        "captions": os.path.join(data_dir, "train_captions.jsonl"),
        "tokenizer": os.path.join(out, "tokenizer"),
        "standin_run": os.path.join(out, "standin_run"),
        "standin": os.path.join(out, "standin"),
        "aligned": os.path.join(out, "aligned"),
        "pretrain": os.path.join(out, "pretrain"),
        "sft": os.path.join(out, "run"),
    }
    if not os.path.exists(paths["eval"]):
        synthetic.make_demo_split(data_dir, "train", num_train, seed=0, turns_per_sample=3)
        synthetic.make_demo_split(data_dir, "eval", num_eval, seed=1, unseen_share=0.5, every_question=True)
    if not os.path.exists(paths["captions"]):
        demo_text.make_caption_split(data_dir, "train")
    if not os.path.exists(paths["lessons"]):
        demo_text.make_lessons(paths["lessons"], num_lessons, seed=0)
    if not os.path.exists(os.path.join(paths["tokenizer"], "tokenizer.json")):
        corpus = synthetic.demo_tokenizer_corpus() + demo_text.tokenizer_corpus()
        conversation.train_tokenizer(corpus, vocab_size=1000).save_pretrained(paths["tokenizer"])
    return paths


def stage_config(stage: str, paths: dict[str, str], steps: int | None = None):
    """configs/demo.py's `stage` reading and starting from the runs under `paths` (prepare's)."""
    from avllm_jax.training.config import load_config_file

    config = load_config_file(CONFIG, stage)
    source = {
        "standin": paths["lessons"],
        "pretrain": paths["captions"],
        "sft": os.path.join(paths["data"], "train.jsonl"),
    }
    config.data.sources = (dict(path=source[stage], media_root=None, weight=1.0),)
    if stage == "standin":
        config.tokenizer = paths["tokenizer"]
    else:
        config.init_checkpoint = paths["aligned" if stage == "pretrain" else "pretrain"]
    if steps:
        config.num_steps = config.checkpoint_every = steps
    return config


def build_stage_1_start(
    paths: dict[str, str], standin_steps: int | None = None, vision_steps: int = VISION_STANDIN_STEPS
) -> dict[str, float]:
    """The stand-in (build_standin) and stage 1's start fitted to it (align_projectors), each built
    when missing, the start also when the stand-in is new; returns the seconds each took (0: found)."""
    seconds = {"standin": build_standin(paths, standin_steps, vision_steps), "aligned": 0.0}
    if seconds["standin"] or not os.path.exists(os.path.join(paths["aligned"], "config.json")):
        seconds["aligned"] = align_projectors(paths)
    return seconds


def build_standin(paths: dict[str, str], steps: int | None = None, vision_steps: int = VISION_STANDIN_STEPS) -> float:
    """Trains the stand-in's LLM on text (and, with `vision_steps`, its CLIP on stills) and writes
    them as a converted checkpoint, unless one built with these `vision_steps` is there; returns
    the seconds it took."""
    if os.path.exists(os.path.join(paths["standin"], "config.json")):
        built_with = 0  # a stand-in without the record predates the option: its CLIP is random
        record_path = os.path.join(paths["standin"], VISION_STANDIN_RECORD)
        if os.path.exists(record_path):
            with open(record_path) as f:
                built_with = json.load(f)["steps"]
        if built_with == vision_steps:
            return 0.0
        print(f"{paths['standin']} has a CLIP of {built_with} steps on stills, not {vision_steps}: rewriting it")
    start = time.time()
    run_training(stage_config("standin", paths, steps), paths["standin_run"])  # skips a finished run
    write_standin(paths["standin_run"], paths["standin"], vision_steps)
    return time.time() - start


def write_standin(run_dir: str, out: str, vision_steps: int = VISION_STANDIN_STEPS) -> None:
    """The stand-in as tools/convert_hf_weights.py writes a converted checkpoint: config.json,
    the tokenizer and params/. Its LLM is the one trained in `run_dir` (the stand-in for Vicuna),
    its CLIP random or, with `vision_steps`, pretrained on stills (the stand-in for CLIP,
    training/vision_pretraining.py); its audio encoder and projectors are at their random
    initialisation. Its encoders are frozen from here on."""
    import avllm_jax
    from avllm_jax.training import vision_pretraining

    model = avllm_jax.load_model(run_dir)
    scores = {}
    if vision_steps:
        start = time.time()
        scores = vision_pretraining.pretrain_vision(model.vision, steps=vision_steps)
        print(
            f"stand-in for CLIP: {vision_steps} steps in {time.time() - start:.0f} s; on 1024 new stills colour "
            f"{scores['colour']:.3f}, shape {scores['shape']:.3f}, centre error {scores['centre error px']:.1f} px"
        )
    save_checkpoint(model, run_dir, out)
    with open(os.path.join(out, VISION_STANDIN_RECORD), "w") as f:  # written last: the stand-in is whole
        json.dump({"steps": vision_steps, **scores}, f)


def save_checkpoint(model, source_dir: str, out: str) -> None:
    """`model`'s weights, with the model config and tokenizer of `source_dir`, as
    tools/convert_hf_weights.py writes a converted checkpoint (an older one's weights replaced)."""
    from flax import nnx

    from avllm_jax import checkpoint
    from avllm_jax.data import conversation

    params_dir = os.path.join(out, checkpoint.PARAMS_DIR)
    if os.path.exists(params_dir):
        shutil.rmtree(params_dir)
    checkpoint.save_params(params_dir, nnx.to_pure_dict(nnx.state(model)))
    checkpoint.write_model_config(out, checkpoint.read_model_config(source_dir))
    conversation.load_tokenizer(source_dir).save_pretrained(out)


def align_projectors(paths: dict[str, str], num_clips: int = ALIGN_CLIPS) -> float:
    """Stage 1's start, written to paths["aligned"]: the stand-in with each projector fitted
    (ridge regression, projector_init.fit_projector) so that the rows it makes of the first
    `num_clips` training clips are the stand-in's embeddings of the caption words they stand for
    (demo_text.row_words: a frame's colour and place, the shape, an audio segment's pitch and
    sound; a row's target is the sum of its words' token embeddings, scaled to the embeddings'
    RMS norm). Each attribute then starts at a word's weight in its row, the place beside the
    colour (docs/demo.md, "Projectors fitted to the captions' words"). Returns the seconds it took."""
    import numpy as np

    import avllm_jax
    from avllm_jax.data import conversation, demo_text
    from avllm_jax.training import projector_init

    start = time.time()
    model = avllm_jax.load_model(paths["standin"])
    tokenizer = conversation.load_tokenizer(paths["standin"])
    embeddings = np.asarray(model.language_model.embed[...], np.float64)
    norm = float(np.sqrt(np.mean(np.sum(embeddings**2, axis=-1))))

    @functools.cache  # a few dozen distinct word strings over thousands of rows
    def target(words: str) -> np.ndarray:
        summed = embeddings[tokenizer(" " + words, add_special_tokens=False)["input_ids"]].sum(0)
        return summed * norm / np.linalg.norm(summed)

    inputs, targets = collections.defaultdict(list), collections.defaultdict(list)
    train_path = os.path.join(paths["data"], "train.jsonl")
    data_config = stage_config("pretrain", paths).data
    for timeline, outputs in encoder_outputs(model, train_path, paths["data"], data_config, num_clips):
        words = demo_text.row_words(timeline)
        if "frame tokens" in outputs:
            tokens = outputs["frame tokens"]
            inputs["temporal_proj"] += list(tokens[:, 0])
            targets["temporal_proj"] += [target(w) for w in words["temporal_proj"]]
            inputs["spatial_proj"] += list(tokens[:, 1:].mean(0))  # each patch over the clip's frames
            targets["spatial_proj"] += [target(words["spatial_proj"][0])] * (tokens.shape[1] - 1)
        if "audio segments" in outputs:
            inputs["audio_proj"] += list(outputs["audio segments"])
            targets["audio_proj"] += [target(w) for w in words["audio_proj"]]
    for name, rows in inputs.items():
        explained = projector_init.fit_projector(getattr(model, name), np.asarray(rows), np.asarray(targets[name]))
        print(f"stage 1's start: {name} fitted to the words of {len(rows):,} rows ({explained:.2f} of their variance)")
    save_checkpoint(model, paths["standin"], paths["aligned"])
    return time.time() - start


def print_lesson_scores(model_dir: str, lessons_path: str, num_lessons: int = 300) -> None:
    """Exact match per question type of the model's LLM on held-out lessons (seed 99, text
    alone): an answer is right when the argmax at each of its tokens, `</s>` included, is the
    answer's token given the text before it (what greedy decoding answers, without decoding)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import avllm_jax
    from avllm_jax.data import conversation, demo_text, pipeline, samples

    demo_text.make_lessons(lessons_path, num_lessons, seed=99)
    model = avllm_jax.load_model(model_dir)
    tokenizer = conversation.load_tokenizer(model_dir)
    data_config = pipeline.default_data_config()
    length = 256

    @jax.jit
    def predictions(ids):
        positions = jnp.arange(ids.shape[1])[None]
        logits = model.llm(inputs_embeds=model.llm.embed_tokens(ids), positions=positions, segment_ids=ids * 0 + 1)
        return jnp.argmax(logits, -1)

    right, total = collections.Counter(), collections.Counter()
    with open(lessons_path) as f:
        records = [json.loads(line) for line in f]
    lessons, _ = conversation.read_samples(lessons_path)
    for record, sample in zip(records, lessons, strict=True):
        row = samples.build_sample(sample.turns, None, None, data_config, tokenizer, rng=np.random.default_rng(0))
        ids, labels = row["input_ids"], row["labels"]
        padded = np.zeros((1, length), np.int32)
        padded[0, : ids.size] = ids
        predicted = np.asarray(predictions(padded))[0]
        answered = np.flatnonzero(labels >= 0)
        spans = np.split(answered, np.flatnonzero(np.diff(answered) > 1) + 1)  # one per answer, in order
        for (question_type, _, _), span in zip(record["lesson"]["questions"], spans, strict=True):
            total[question_type] += 1
            right[question_type] += bool(np.all(predicted[span - 1] == labels[span]))
    print("\n| lesson question | questions | exact match |\n|---|---|---|")
    for question_type in sorted(total):
        print(f"| {question_type} | {total[question_type]} | {right[question_type] / total[question_type]:.2f} |")
    print(f"| all | {sum(total.values())} | {sum(right.values()) / sum(total.values()):.2f} |")


def print_probes(workdir: str, paths: dict[str, str], num_clips: int = 600) -> None:
    """Whether the encoders' outputs can tell the LLM what the questions ask, by ridge regression
    (linear probes) on the first `num_clips` training clips:

    - each frame's colour and stop from its class token (the frozen CLIP's) and from W_t's
      output, fitted on three quarters of the frames and scored on the rest;
    - each frame's shape from its class token and from the mean of its patch tokens, and each
      audio segment's sound (quiet or beep) and pitch from its embedding, and each audio clip's
      beep count from its segments' embeddings side by side: fitted on the training clips (seen
      colour and shape, pitch and count pairs only) and scored on the held-out clips, those of
      seen and of unseen pairs apart. Whether an encoder holds the attributes apart."""
    import numpy as np

    import avllm_jax
    from avllm_jax.data import synthetic

    model = avllm_jax.load_model(workdir)
    data_config = stage_config("sft", paths).data

    def read(path, limit=None):
        """Per frame: "class token", "patch tokens, mean", "colour", "place", "shape", "unseen" (a
        colour and shape pair the training clips never show); per audio segment: "segment", "sound",
        "pitch"; per audio clip: "segments" (its embeddings side by side), "beeps", "unseen audio"."""
        found: dict[str, list] = collections.defaultdict(list)
        for timeline, outputs in encoder_outputs(model, path, paths["data"], data_config, limit):
            if "shape" in timeline:
                tokens = outputs["frame tokens"]
                found["class token"].append(tokens[:, 0])
                found["patch tokens, mean"].append(tokens[:, 1:].mean(1))
                found["colour"] += timeline["colours"]
                found["place"] += timeline["stops"]
                found["shape"] += [timeline["shape"]] * len(tokens)
                found["unseen"] += [(c, timeline["shape"]) in synthetic.HELD_OUT["visual"] for c in timeline["colours"]]
            if "pitch" in timeline:
                segments = outputs["audio segments"]
                found["segment"].append(segments)
                found["sound"] += ["beep" if b else "quiet" for b in timeline["beeps"]]
                found["pitch"] += [timeline["pitch"]] * len(segments)
                found["segments"].append(segments.reshape(1, -1))
                found["beeps"].append(sum(timeline["beeps"]))
                found["unseen audio"].append((timeline["pitch"], sum(timeline["beeps"])) in synthetic.HELD_OUT["audio"])
        return {k: np.concatenate(v) if np.ndim(v[0]) else np.asarray(v) for k, v in found.items()}

    train = read(os.path.join(paths["data"], "train.jsonl"), num_clips)
    cls = train["class token"]
    fit = len(cls) * 3 // 4
    inputs = {"class token": cls, "W_t(class token)": cls @ np.asarray(model.temporal_proj.kernel[...])}
    print(f"\n| frame probe ({len(cls)} frames, a quarter held out) | colour | place |\n|---|---|---|")
    for name, x in inputs.items():
        scores = [_ridge_accuracy(x[:fit], train[t][:fit], x[fit:], train[t][fit:]) for t in ("colour", "place")]
        print(f"| {name} | {scores[0]:.3f} | {scores[1]:.3f} |")

    held_out = read(paths["eval"])
    frames_unseen = held_out["unseen"]
    segments_unseen = np.repeat(held_out["unseen audio"], synthetic.NUM_SEGMENTS)
    probes = [  # (what is read, from what, the unseen mask of the held-out rows)
        ("shape", "class token", frames_unseen),
        ("shape", "patch tokens, mean", frames_unseen),
        ("sound", "segment", segments_unseen),
        ("pitch", "segment", segments_unseen),
        ("beeps", "segments", held_out["unseen audio"]),
    ]
    print(
        "\n| probe fitted on training clips | held-out: seen pairs | unseen pairs "
        "(colour and shape; pitch and count) |\n|---|---|---|"
    )
    for target, source, unseen in probes:
        scores = [
            _ridge_accuracy(train[source], train[target], held_out[source][rows], held_out[target][rows])
            for rows in (~unseen, unseen)
        ]
        print(f"| {target} from {source} ({np.sum(~unseen)} / {np.sum(unseen)}) | {scores[0]:.3f} | {scores[1]:.3f} |")


def encoder_outputs(model, path: str, media_root: str, data_config, limit: int | None = None):
    """Yields (timeline, outputs) for each clip of the JSONL `path` (its first `limit` lines; a
    clip that several lines ask about, once), outputs holding what `model`'s frozen encoders give
    its projectors: "frame tokens" [F, 1+N, Dv] (class token first) and "audio segments" [K, Da],
    those the clip has."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from avllm_jax.data import samples
    from avllm_jax.models import clip_vision

    encode_frames = jax.jit(lambda frames: model.vision(clip_vision.normalize_frames(frames)))
    encode_audio = jax.jit(
        lambda features, is_longer: model.audio_embeddings(
            {"audio_features": features[None, None], "audio_is_longer": is_longer[None, None]}
        )[0, 0]
    )
    with open(path) as f:
        records = [json.loads(line) for _, line in zip(range(limit or 10**9), f)]
    timelines = {record.get("video") or record["audio"]: record["timeline"] for record in records}
    for media_path, timeline in timelines.items():
        media = samples.load_file_media(os.path.join(media_root, media_path), data_config)
        outputs = {}
        if "shape" in timeline:
            outputs["frame tokens"] = np.asarray(encode_frames(jnp.asarray(media.frames)))
        if "pitch" in timeline:
            arrays = samples.audio_arrays(media.audio, data_config, rng=np.random.default_rng(0))
            outputs["audio segments"] = np.asarray(encode_audio(arrays["audio_features"], arrays["audio_is_longer"]))
        yield timeline, outputs


def _ridge_accuracy(x_fit, labels_fit, x_test, labels_test) -> float:
    """Accuracy on (x_test, labels_test) of a ridge regression to one-hot labels fitted on (x_fit, labels_fit)."""
    import numpy as np

    classes = sorted(set(map(str, labels_fit)))
    onehot = np.asarray([[str(v) == c for c in classes] for v in labels_fit], np.float64)
    x_fit, x_test = (np.c_[x, np.ones(len(x))] for x in (x_fit, x_test))
    weights = np.linalg.solve(x_fit.T @ x_fit + 1e-2 * np.eye(x_fit.shape[1]), x_fit.T @ onehot)
    predicted = np.asarray(classes)[np.argmax(x_test @ weights, 1)]
    return float(np.mean(predicted == np.asarray([str(v) for v in labels_test])))


def run_training(config, workdir: str) -> float:
    from avllm_jax.train import train

    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    train(config, workdir)
    return time.time() - start


def evaluate(
    workdir: str, eval_path: str, *, visual_only: bool = False, played_back: bool = False, batch_size: int = 64
) -> list[dict]:
    """Greedy answers to every held-out question: one
    {"type", "group", "combination", "answer", "reference", "correct"} each.

    Each held-out conversation is the prompt, its answer cut off: built as training builds it.
    `visual_only` (the paper's Figure 8): questions about an audio-visual clip are asked with
    the visual stream alone (the <VIS> token), those about audio-only files are left out.
    `played_back`: each clip is played backwards (its frames and audio segments in reverse
    order) and scored against its reversed timeline (synthetic.reversed_timeline).
    """
    import tqdm

    import avllm_jax
    from avllm_jax.checkpoint import read_data_config
    from avllm_jax.data import conversation, pipeline, synthetic
    from avllm_jax.evaluation.metrics import exact_match
    from avllm_jax.inference.prompts import answer_conversations
    from avllm_jax.modality import Modality

    model = avllm_jax.load_model(workdir)
    tokenizer = conversation.load_tokenizer(workdir)
    data_config = read_data_config(workdir)
    with open(eval_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    items = []  # (record, prompt turns, modality, media, reference)
    for record, (sample, media) in zip(records, pipeline.iterate_eval(eval_path, data_config), strict=True):
        turns, modality = sample.turns[:-1], sample.modality
        if visual_only:
            if not modality.has_visual:
                continue
            turns, modality = conversation.with_modality(turns, Modality.VISUAL), Modality.VISUAL
        reference = sample.turns[-1][1]
        if played_back:
            media = synthetic.played_back(media)
            reference = synthetic.answer(record["questions"][-1], synthetic.reversed_timeline(record["timeline"]))
        items.append((record, turns, modality, media, reference))
    results = []
    desc = (
        "evaluating held-out split"
        + (" (visual stream only)" if visual_only else "")
        + (" (played back)" if played_back else "")
    )
    for begin in tqdm.trange(0, len(items), batch_size, desc=desc, unit="batch"):
        chunk = items[begin : begin + batch_size]
        answers = answer_conversations(
            model,
            tokenizer,
            [i[3] for i in chunk],
            [i[1] for i in chunk],
            [i[2] for i in chunk],
            max_new_tokens=6,
            data_config=data_config,
        )
        for (record, _, _, _, reference), given in zip(chunk, answers):
            question_type = record["questions"][-1]
            results.append(
                {
                    "type": question_type,
                    "group": synthetic.GROUPS[question_type],
                    "combination": record["combination"],
                    "answer": given,
                    "reference": reference,
                    "correct": exact_match(given, [reference]),
                }
            )
    return results


def group_accuracy(results: list[dict], combination: str | None = None) -> dict[str, float]:
    """Exact match per question group ("nan" for a group with no questions), over one combination kind or all."""
    correct, total = collections.Counter(), collections.Counter()
    for r in results:
        if combination in (None, r["combination"]):
            total[r["group"]] += 1
            correct[r["group"]] += r["correct"]
    return {g: correct[g] / total[g] if total[g] else float("nan") for g in GROUPS}


def print_question_table(results: list[dict]) -> None:
    """Accuracy per question type, seen and unseen combinations, beside chance (a uniform guess
    among the type's answers) and the best guess from one stream alone (the other stream's
    timeline known perfectly; for a single-stream question, the stream not asked about)."""
    from avllm_jax.data import synthetic
    from avllm_jax.evaluation import demo_baselines

    baselines = demo_baselines.one_stream_baselines()
    tally = collections.defaultdict(lambda: [0, 0])
    for r in results:
        tally[r["type"], r["combination"]][0] += r["correct"]
        tally[r["type"], r["combination"]][1] += 1
    print(
        "\n| question type | group | chance | best from one stream | seen: questions | seen: exact match "
        "| unseen: questions | unseen: exact match |\n|---|---|---|---|---|---|---|---|"
    )
    for question_type, group in synthetic.GROUPS.items():
        streams = {"visual": ("audio",), "audio": ("visual",)}.get(group, ("visual", "audio"))
        one_stream = max(baselines[question_type][s] for s in streams)
        cells = []
        for combination in ("seen", "unseen"):
            right, count = tally[question_type, combination]
            cells += [str(count), f"{right / count:.3f}" if count else "-"]
        print(
            f"| {question_type} | {group} | {1 / len(synthetic.answer_words(question_type)):.2f} | {one_stream:.2f} | "
            + " | ".join(cells)
            + " |"
        )


def print_played_back_table(as_recorded: list[dict], played_back: list[dict]) -> None:
    """Per question type whose answer a played-back clip can change: exact match on the clips as
    recorded and played back, and, where the right answer changed, how often the model's did
    not (1.00: it answers from the clip's content without its order)."""
    tally = collections.defaultdict(collections.Counter)
    for forward, backward in zip(as_recorded, played_back, strict=True):
        counts = tally[forward["type"]]
        counts["questions"] += 1
        counts["right"] += forward["correct"]
        counts["right played back"] += backward["correct"]
        if backward["reference"] != forward["reference"]:
            counts["should change"] += 1
            counts["kept"] += backward["answer"] == forward["answer"]
    print(
        "\n| question type | questions | exact match | played back: exact match | right answer changed | model's "
        "answer kept |\n"
        "|---|---|---|---|---|---|"
    )
    for question_type, counts in tally.items():
        if counts["should change"]:
            n = counts["questions"]
            print(
                f"| {question_type} | {n} | {counts['right'] / n:.3f} | {counts['right played back'] / n:.3f} | "
                f"{counts['should change']} | {counts['kept'] / counts['should change']:.3f} |"
            )


def chat_once(workdir: str, eval_path: str) -> None:
    """One cross-modal question about the first held-out audio-visual clip, through `python -m avllm_jax.chat`."""
    import subprocess

    from avllm_jax.data import conversation
    from avllm_jax.modality import Modality

    samples, _ = conversation.read_samples(eval_path)
    media = next(s.media_path for s in samples if s.modality == Modality.AUDIO_VISUAL)
    question = "What colour is the shape when the beeps start?"
    print(f"\n$ python -m avllm_jax.chat --checkpoint {workdir} --media {media} --question {question!r}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "avllm_jax.chat", "--checkpoint", workdir, "--media", media, "--question", question],
        check=True,
    )


if __name__ == "__main__":
    main()
