"""Phased training (the paper's Table 4, data/phases.py): each phase's batches hold only its
modalities, the boundary falls at the configured step, a restored iterator (mid phase 2, at the
boundary, in phase 1 before it) gives exactly an uninterrupted one's batches, bad phase configs
are refused naming the field, the Table 4 configs load, the log line names the phase, and a
training run resumed before the boundary ends with the uninterrupted run's parameters."""

import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from training_runs import STEPS, environment, final_params, make_demo_files, max_difference, train_command

from avllm_jax import checkpoint
from avllm_jax.data import conversation as conv
from avllm_jax.data import phases, pipeline, synthetic
from avllm_jax.data.media import write_media
from avllm_jax.modality import Modality
from avllm_jax.training import config as config_lib
from avllm_jax.training import metrics as training_metrics

SIZE, FRAMES, SEGMENTS, TEXT, BATCH = 16, 2, 2, 48, 4
PT1 = (dict(modalities=("audio_visual",), share=0.5), dict(modalities=("visual", "audio", "text"), share=0.5))
NUM_STEPS = 6  # phase 1: steps 1-3, phase 2: steps 4-6
MEDIA = {
    Modality.AUDIO_VISUAL: dict(video="av.mp4"),
    Modality.VISUAL: dict(video="silent.mp4"),
    Modality.AUDIO: dict(audio="sound.flac"),
}
ABLATIONS = os.path.join(os.path.dirname(__file__), "..", "configs", "ablations")


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [conv.SYSTEM_PROMPT, "USER: ASSISTANT: what is it? item a dog", *[f"item{i}" for i in range(40)]]
    tokenizer = conv.train_tokenizer(corpus, vocab_size=600)
    conv.add_modality_tokens(tokenizer)
    return tokenizer


def record(name, modality):
    prompt = f"{modality.token}\n{name}" if modality else name
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": "a dog"}]
    return {"id": name, **(MEDIA[modality] | {"modality": modality.value} if modality else {}), "conversations": turns}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A mixed source (audio-visual, visual, audio and text-only samples in turn) and a
    visual-only one, over three tiny media files."""
    root = tmp_path_factory.mktemp("phases")
    rng = np.random.default_rng(0)
    frames = synthetic.draw_clip("red", "circle", "left", rng)[:2, ::4, ::4]
    tone = synthetic.tone_pattern("high", 2, rng)[:12000]
    write_media(root / "av.mp4", frames=frames, audio=tone, audio_options={"aac_coder": "fast"})
    write_media(root / "silent.mp4", frames=frames)
    write_media(root / "sound.flac", audio=tone, audio_codec="flac")
    cycle = (Modality.AUDIO_VISUAL, Modality.VISUAL, Modality.AUDIO, None)
    mixed = [record(f"item{i}", cycle[i % 4]) for i in range(16)]
    visual = [record(f"item{20 + i}", Modality.VISUAL) for i in range(5)]
    for name, records in (("mixed.jsonl", mixed), ("visual.jsonl", visual)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def data_config(root, *names):
    config = pipeline.default_data_config()
    config.sources = [dict(path=str(root / name), media_root=None, weight=1.0) for name in names]
    config.num_frames, config.image_size, config.num_audio_segments = FRAMES, SIZE, SEGMENTS
    config.audio_max_length_s, config.audio_truncation = 0.25, "rand_trunc"
    config.max_text_length, config.worker_count, config.read_threads = TEXT, 0, 1
    return config


def phased(config, tokenizer, phase_config=PT1, num_steps=NUM_STEPS, process_index=0, process_count=1):
    plan = phases.plan(phase_config, num_steps)
    return phases.make_phased_iterator(
        config,
        plan,
        tokenizer,
        per_source=pipeline.read_sources(config),
        global_batch_size=BATCH,
        process_index=process_index,
        process_count=process_count,
    )


def row_modalities(batch, tokenizer):
    """Each row's modality name, from its streams, checked against its modality token."""
    token_ids = {tokenizer.convert_tokens_to_ids(m.token): m for m in Modality}
    names = []
    for row in range(len(batch["input_ids"])):
        tokens = [token_ids[i] for i in batch["input_ids"][row][batch["token_mask"][row]] if i in token_ids]
        from_flags = Modality.from_flags(batch["has_visual"][row], batch["has_audio"][row])
        assert tokens == ([from_flags] if from_flags else []), row
        names.append(from_flags.value if from_flags else "text")
    return names


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_plan_splits_the_steps_by_share():
    assert [(p.first_step, p.last_step) for p in phases.plan(PT1, 6)] == [(1, 3), (4, 6)]
    assert [(p.first_step, p.last_step) for p in phases.plan(PT1, 7)] == [(1, 4), (5, 7)]
    thirds = tuple(dict(modalities=(m,), share=1 / 3) for m in ("visual", "audio", "audio_visual"))
    assert [(p.first_step, p.last_step) for p in phases.plan(thirds, 10)] == [(1, 3), (4, 7), (8, 10)]
    assert phases.phase_at(phases.plan(PT1, 6), 4).label == "phase 2/2 (visual+audio+text)"
    with pytest.raises(ValueError, match="1 steps leave phase 2/2 .* no step"):
        phases.plan(PT1, 1)


def test_each_phase_holds_only_its_modalities_and_switches_at_the_boundary(sources, tokenizer):
    config = data_config(sources, "mixed.jsonl", "visual.jsonl")
    iterator = phased(config, tokenizer)
    seen = []
    for step in range(1, NUM_STEPS + 1):
        assert iterator.phase.number == (1 if step <= 3 else 2)
        seen.append(row_modalities(next(iterator), tokenizer))
    assert all(set(rows) == {"audio_visual"} for rows in seen[:3])
    assert not any("audio_visual" in rows for rows in seen[3:])
    # Phase 2 mixes the visual-only source (item20-24) with the mixed one's visual, audio and text samples.
    assert set(sum(seen[3:], [])) == {"visual", "audio", "text"}
    iterator.close()


def test_restored_iterator_gives_the_uninterrupted_batches(sources, tokenizer):
    config = data_config(sources, "mixed.jsonl", "visual.jsonl")
    iterator = phased(config, tokenizer)
    states, batches = [], []
    for _ in range(NUM_STEPS + 1):  # past the last step the last phase goes on
        states.append(json.loads(json.dumps(iterator.get_state())))  # as the checkpoint stores it
        batches.append(next(iterator))
    # Saved after step 4 (mid phase 2), after step 3 (the boundary), after step 1 (before it).
    for done in (4, 3, 1):
        fresh = phased(config, tokenizer)
        fresh.set_state(states[done])
        assert states[done]["phase"] == (2 if done == 4 else 1)
        for want in batches[done:]:
            assert same(next(fresh), want), done
        fresh.close()


def test_checkpointed_iterator_resumes_in_phase_two(sources, tokenizer, tmp_path):
    config = data_config(sources, "mixed.jsonl")
    iterator = phased(config, tokenizer)
    for _ in range(4):
        next(iterator)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = [next(iterator) for _ in range(2)]
    fresh = phased(config, tokenizer)
    manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert fresh.phase.number == 2
    assert all(same(next(fresh), want) for want in expected)

    other = phased(config, tokenizer, phase_config=PT1[::-1])
    with pytest.raises(ValueError, match="saved with the phases .*resume with the phases it was saved with"):
        other.set_state(iterator.get_state())


def test_the_next_phase_stops_the_previous_phases_worker_processes(sources, tokenizer):
    config = data_config(sources, "mixed.jsonl")
    config.worker_count = 1

    def children():  # but those of earlier tests
        return {p.pid for p in multiprocessing.active_children()} - before

    before = {p.pid for p in multiprocessing.active_children()}
    iterator = phased(config, tokenizer)
    workers = []
    try:
        for step in range(1, 5):
            rows = row_modalities(next(iterator), tokenizer)
            assert (set(rows) == {"audio_visual"}) == (step <= 3)
            workers.append(children())
    finally:
        iterator.close()
    assert len(workers[2]) == 1 and workers[0] == workers[2]  # phase 1's worker
    assert len(workers[3]) == 1 and workers[3].isdisjoint(workers[2])  # phase 2's, phase 1's gone
    assert not children()


def test_sources_and_samples_outside_a_phase_are_reported(sources):
    config = data_config(sources, "mixed.jsonl", "visual.jsonl")
    per_source = pipeline.read_sources(config)
    pt = (dict(modalities=("audio_visual",), share=0.5), dict(modalities=("visual", "audio"), share=0.5))
    lines = phases.describe(phases.plan(pt, 10), per_source, config.sources)
    assert lines == [
        "phase 1/2 (audio_visual): steps 1-5 of 10; mixed.jsonl: 4 samples, visual.jsonl: none, left out of this phase",
        "phase 2/2 (visual+audio): steps 6-10 of 10; mixed.jsonl: 8 samples, visual.jsonl: 5 samples",
        "in no phase, so not trained on: 4 text samples of mixed.jsonl",
    ]
    phase_config, phase_samples = phases.phase_data(phases.plan(pt, 10)[0], config, per_source)
    assert [os.path.basename(s["path"]) for s in phase_config.sources] == ["mixed.jsonl"]
    assert phase_config.shuffle_seed == config.shuffle_seed and len(phase_samples[0]) == 4
    assert phases.phase_data(phases.plan(pt, 10)[1], config, per_source)[0].shuffle_seed == config.shuffle_seed + 1000

    only_visual = data_config(sources, "visual.jsonl")
    with pytest.raises(ValueError, match=r"phase 1/2 \(audio_visual\) has no samples: .*\(visual.jsonl: visual 5\)"):
        phases.describe(phases.plan(pt, 10), pipeline.read_sources(only_visual), only_visual.sources)


@pytest.mark.parametrize(
    "phase_config, message",
    [
        (
            (dict(modalities=("video",), share=1.0),),
            "config.phases[0].modalities names 'video', not a modality (choose from 'visual', 'audio', "
            "'audio_visual', 'text')",
        ),
        ((dict(modalities=(), share=1.0),), "config.phases[0].modalities is empty"),
        ((dict(modalities="visual", share=1.0),), "config.phases[0].modalities must be a tuple of names"),
        (
            (dict(modalities=("visual",), share=0.5), dict(modalities=("audio",), share=0.0)),
            "config.phases[1].share=0.0: it must be a positive number",
        ),
        (
            (dict(modalities=("visual",), share=0.5), dict(modalities=("audio",), share=0.4)),
            "shares (0.5, 0.4) sum to 0.9, not 1",
        ),
        ((dict(modalities=("visual",), weight=1.0),), "config.phases[0].weight is not a field of a phase"),
        ((dict(modalities=("visual", "visual"), share=1.0),), "names a modality twice"),
    ],
)
def test_bad_phase_configs_are_refused(phase_config, message):
    config = config_lib.base_config()
    config.phases = phase_config
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.check_config(config)


def test_phases_need_the_data_repeated():
    config = config_lib.base_config()
    config.phases = PT1
    config_lib.check_config(config)  # shares within 1e-6 of one, data.source_epochs None
    config.data.source_epochs = 2
    with pytest.raises(config_lib.ConfigError, match="config.phases needs config.data.source_epochs=None"):
        config_lib.check_config(config)


def test_table4_configs_load():
    loaded = {
        row: config_lib.load_config_file(os.path.join(ABLATIONS, f"table4_{row}.py")) for row in ("mat", "pt1", "pt2")
    }
    for config in loaded.values():
        config_lib.check_config(config)
        assert config.phases == () or abs(sum(p["share"] for p in config.phases) - 1) < 1e-6
    assert loaded["mat"].phases == ()
    first = {row: set(loaded[row].phases[0]["modalities"]) - {"text"} for row in ("pt1", "pt2")}
    assert first == {"pt1": {"audio_visual"}, "pt2": {"visual", "audio"}}
    assert [p["modalities"] for p in loaded["pt2"].phases] == [p["modalities"] for p in loaded["pt1"].phases][::-1]


class _Writer:
    def write_scalars(self, step, scalars):
        self.last = (step, scalars)


def test_log_line_names_the_phase(caplog):
    caplog.set_level(logging.INFO, logger="avllm_jax")
    plan = phases.plan(PT1, NUM_STEPS)
    writer = _Writer()
    log = training_metrics.MetricsLog(
        writer,
        useful_flops=lambda work: 0.0,
        slot_flops_per_step=0.0,
        peak_flops=None,
        num_devices=1,
        total=NUM_STEPS,
        start_step=0,
        phase_of=lambda step: phases.phase_at(plan, step),
    )
    log.add({"loss": np.float32(1.0), "work": np.zeros(6, np.float32)}, {})
    row = log.flush(4, learning_rate=1e-3)
    assert caplog.messages[-1].startswith("step 4/6 | phase 2/2 (visual+audio+text) | loss 1.0000 |")
    assert row["phase"] == 2.0 and writer.last == (4, row)


def test_training_resumed_before_the_boundary_ends_as_the_uninterrupted_run(tmp_path):
    """Phases 1-3 and 4-6 of the demo; the run resumed from step 2 crosses the boundary."""
    demo_files = make_demo_files(tmp_path / "demo")
    workdir = tmp_path / "run"
    command = train_command(
        demo_files,
        workdir,
        f"--config.phases={PT1!r}",
        "--config.checkpoint_every=2",
        "--config.keep_checkpoints=3",
    )
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "phase 1/2 (audio_visual): steps 1-3 of 6" in result.stdout
    for step in range(1, STEPS + 1):
        assert f"step {step}/{STEPS} | phase {1 if step <= 3 else 2}/2 (" in result.stdout, step
    uninterrupted = final_params(workdir)

    for step in (4, 6):
        shutil.rmtree(workdir / checkpoint.CHECKPOINTS_DIR / str(step))
    assert checkpoint.latest_step(str(workdir)) == 2
    resumed = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout and f"step 4/{STEPS} | phase 2/2" in resumed.stdout
    # The same batches give the same losses, step by step, and the same parameters.
    losses = [line.split(" | loss ")[1].split()[0] for line in result.stdout.splitlines() if " | loss " in line]
    resumed_losses = [
        line.split(" | loss ")[1].split()[0] for line in resumed.stdout.splitlines() if " | loss " in line
    ]
    assert resumed_losses == losses[2:]
    assert max_difference(uninterrupted, final_params(workdir)) <= 1e-6


def test_two_processes_in_phase_two_resume_on_one_with_its_batches(sources, tokenizer):
    """Elastic restore (data/position.py) keeps the phase and its stream's global order."""
    config = data_config(sources, "mixed.jsonl", "visual.jsonl")
    alone = phased(config, tokenizer)
    want = [next(alone) for _ in range(NUM_STEPS)]
    alone.close()
    old = [phased(config, tokenizer, process_index=index, process_count=2) for index in range(2)]
    for _ in range(4):  # mid phase 2
        for iterator in old:
            next(iterator)
    states = [json.loads(json.dumps(iterator.get_state())) for iterator in old]
    new = phased(config, tokenizer)
    assert new.restore_states(states).startswith("data: 2 process(es) had used the global stream up to sample 4 ")
    assert new.phase.number == 2
    for step in (4, 5):
        assert same(next(new), want[step]), step
    for iterator in (*old, new):
        iterator.close()
