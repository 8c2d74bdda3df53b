"""tools/demo.py chains the paper's recipe: the stand-in (an LLM trained on text alone and, as an
option, a CLIP trained on stills, written as a converted checkpoint), stage 1 from it with its
projectors fitted to the captions' words (projectors only), stage 2 from stage 1."""

import importlib.util
import pathlib

import numpy as np
import pytest
from flax import nnx, traverse_util

import avllm_jax
from avllm_jax.data import conversation, demo_text

REPO = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("demo", REPO / "tools" / "demo.py")
demo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(demo)


def small(config, steps, **optim):
    """The stage's config, small enough for a test: 8 packs (the test devices), one layer, no workers."""
    config.num_steps = config.checkpoint_every = steps
    config.global_batch_size = 8
    config.data.update(dict(worker_count=0, dedicated_worker_cpus=0))
    config.model.vision.num_layers = config.model.llm.num_layers = 1
    config.projector_init_batches = 2
    config.optim.update(optim)
    return config


def weights(path) -> dict[str, np.ndarray]:
    state = nnx.to_pure_dict(nnx.state(avllm_jax.load_model(path)))
    return {".".join(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(state).items()}


def part(flat, prefix):
    return {k: v for k, v in flat.items() if k.startswith(prefix)}


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    paths = demo.prepare(str(tmp_path_factory.mktemp("demo")), num_train=8, num_eval=2, num_lessons=40)
    demo.run_training(small(demo.stage_config("standin", paths), 2), paths["standin_run"])
    demo.write_standin(paths["standin_run"], paths["standin"], vision_steps=2)
    paths["standin_random_clip"] = paths["standin"] + "_random_clip"  # the default: no stills
    demo.write_standin(paths["standin_run"], paths["standin_random_clip"], vision_steps=0)
    demo.align_projectors(paths)
    demo.run_training(small(demo.stage_config("pretrain", paths), 2), paths["pretrain"])
    # At learning rate 0 a step keeps the weights it started from: stage 1's start.
    paths["pretrain_start"] = paths["pretrain"] + "_start"
    demo.run_training(small(demo.stage_config("pretrain", paths), 1, learning_rate=0.0), paths["pretrain_start"])
    # At learning rate 0 stage 2 keeps the weights it started from, so its result shows them.
    demo.run_training(small(demo.stage_config("sft", paths), 1, learning_rate=0.0), paths["sft"])
    names = ("standin_run", "standin", "standin_random_clip", "aligned", "pretrain", "pretrain_start", "sft")
    return {name: weights(paths[name]) for name in names} | {"paths": paths}


PROJECTORS = ("temporal_proj", "spatial_proj", "audio_proj")


def test_the_standin_is_the_text_trained_llm_with_its_clip_pretrained_or_random(stages):
    standin, run = stages["standin"], stages["standin_run"]
    for name in ("audio", "llm", *PROJECTORS):  # what text training left (the LLM) or drew (the rest)
        assert part(standin, name) and same(part(standin, name), part(run, name)), name
    # The CLIP trained on stills (tests/test_vision_pretraining.py checks what it learns) ...
    assert part(standin, "vision").keys() == part(run, "vision").keys()
    assert not same(part(standin, "vision"), part(run, "vision"))
    # ... or, by default, written as the run drew it.
    assert same(stages["standin_random_clip"], run)


def test_stage_1_trains_the_projectors_only(stages):
    assert same(part(stages["pretrain"], "llm"), part(stages["standin"], "llm"))
    assert same(part(stages["pretrain"], "vision"), part(stages["standin"], "vision"))
    for name in PROJECTORS:
        assert not same(part(stages["pretrain"], name), part(stages["standin"], name)), name


def test_stage_1_starts_from_the_standin_with_projectors_fitted_to_the_caption_words(stages):
    aligned, standin = stages["aligned"], stages["standin"]
    for name in ("vision.", "audio.", "llm."):  # with the dot: not audio_proj
        assert same(part(aligned, name), part(standin, name)), name
    for name in PROJECTORS:
        assert not same(part(aligned, name), part(standin, name)), name
        assert same(part(stages["pretrain_start"], name), part(aligned, name)), name


def test_the_fitted_frame_rows_are_nearest_their_own_words(stages):
    """Each training frame's row from the fitted W_t is nearer the embedding of its own colour and
    place than of any other colour and place the clips show."""
    paths = stages["paths"]
    model = avllm_jax.load_model(paths["aligned"])
    tokenizer = conversation.load_tokenizer(paths["aligned"])
    embeddings = np.asarray(model.language_model.embed[...])
    train_path = str(pathlib.Path(paths["data"]) / "train.jsonl")
    data_config = demo.stage_config("pretrain", paths).data
    rows, words = [], []
    for timeline, outputs in demo.encoder_outputs(model, train_path, paths["data"], data_config):
        if "frame tokens" in outputs:
            rows += list(np.asarray(model.temporal_proj(outputs["frame tokens"][:, 0])))
            words += demo_text.row_words(timeline)["temporal_proj"]
    vocabulary = sorted(set(words))
    assert len(rows) >= 8 and len(vocabulary) >= 3
    ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in vocabulary]
    targets = np.stack([embeddings[i].sum(0) for i in ids])
    targets /= np.linalg.norm(targets, axis=1, keepdims=True)
    nearest = np.argmax(np.asarray(rows) @ targets.T, axis=1)
    assert [vocabulary[i] for i in nearest] == words


def test_stage_2_starts_from_stage_1_projectors_and_the_standin_llm(stages):
    for name in PROJECTORS:
        assert same(part(stages["sft"], name), part(stages["pretrain"], name)), name
    assert same(part(stages["sft"], "llm"), part(stages["standin"], "llm"))


def test_configs_chain_the_stages_through_their_directories(tmp_path):
    names = ("data", "lessons", "captions", "tokenizer", "standin", "aligned", "pretrain")
    paths = {k: str(tmp_path / k) for k in names}
    standin, pretrain, sft = (demo.stage_config(s, paths) for s in ("standin", "pretrain", "sft"))
    assert standin.tokenizer == paths["tokenizer"] and not standin.init_checkpoint
    assert standin.data.sources[0]["path"] == paths["lessons"] and standin.trainable == (r"llm\..*",)
    assert pretrain.init_checkpoint == paths["aligned"] and pretrain.data.sources[0]["path"] == paths["captions"]
    assert pretrain.trainable == (r"(temporal|spatial|audio)_proj\..*",)
    assert sft.init_checkpoint == paths["pretrain"] and sft.data.sources[0]["path"].endswith("train.jsonl")


def test_the_probe_scores_what_a_linear_read_out_gets_right():
    """--probes' ridge read-out: it names the class a feature direction stands for, and on
    features whose pairing with the classes differs from the fitted one it is scored wrong."""
    rng = np.random.default_rng(0)
    classes = np.array(["circle", "square", "triangle"])
    directions = rng.normal(size=(3, 16))
    labels = rng.integers(3, size=300)
    features = directions[labels] + 0.1 * rng.normal(size=(300, 16))
    assert demo._ridge_accuracy(features[:200], classes[labels[:200]], features[200:], classes[labels[200:]]) == 1.0
    swapped = classes[(labels[200:] + 1) % 3]  # each direction now labelled with another class
    assert demo._ridge_accuracy(features[:200], classes[labels[:200]], features[200:], swapped) == 0.0


def test_a_built_standin_is_reused_when_its_clip_is_the_one_asked_for(tmp_path, monkeypatch):
    """A stand-in without vision_standin.json predates the CLIP option (its CLIP random): reused
    for the default; one whose record names the asked steps is reused too. Neither trains."""
    monkeypatch.setattr(demo, "run_training", lambda *args: pytest.fail("trained a built stand-in"))
    standin = tmp_path / "standin"
    standin.mkdir()
    (standin / "config.json").write_text("{}")
    paths = {"standin": str(standin), "standin_run": str(tmp_path / "standin_run")}
    assert demo.build_standin(paths, vision_steps=0) == 0.0
    (standin / demo.VISION_STANDIN_RECORD).write_text('{"steps": 2000}')
    assert demo.build_standin(paths, vision_steps=2000) == 0.0
