"""The data position on another layout (data/position.py): P processes' iterator states resume
on Q processes. Unpacked and stopped at a step, the new processes read the old stream's next
global batches, in order; packed (each process packs its own samples, so the packs differ), and
with bad samples dropped, no sample is lost or read twice."""

import json

import test_packing
import test_pipeline
from test_pipeline import data_config, prompt_names, text_source, write_jsonl

from avllm_jax.data import pipeline

tokenizer, media_dir = test_pipeline.tokenizer, test_pipeline.media_dir  # the fixtures, shared


def iterators(config, tokenizer, count, global_batch_size, **kwargs):
    """The iterators of `count` processes."""
    return [
        pipeline.make_train_iterator(
            config, tokenizer, global_batch_size=global_batch_size, process_index=index, process_count=count, **kwargs
        )
        for index in range(count)
    ]


def next_global_batch(iterators, tokenizer):
    """The processes' next batches side by side, as the names of their samples."""
    return [name for it in iterators for name in prompt_names(next(it), tokenizer)]


def saved(iterator):
    return json.loads(json.dumps(iterator.get_state()))  # as the checkpoint stores it


def test_two_processes_resume_on_one_and_on_three_in_the_same_global_order(tmp_path, tokenizer):
    config = data_config((text_source(tmp_path / "a.jsonl", "a", 40), 1.0))
    alone = pipeline.make_train_iterator(config, tokenizer, global_batch_size=6, process_index=0, process_count=1)
    global_batches = [prompt_names(next(alone), tokenizer) for _ in range(5)]
    old = iterators(config, tokenizer, 2, 6)
    for _ in range(2):  # two steps on two processes
        assert next_global_batch(old, tokenizer) in global_batches[:2]
    states = [saved(it) for it in old]
    for count in (1, 3):
        new = iterators(config, tokenizer, count, 6)
        lines = [it.restore_states(states) for it in new]
        assert lines[0].startswith("data: 2 process(es) had used the global stream up to sample 12 and 0 past it")
        for step in (2, 3, 4):
            assert next_global_batch(new, tokenizer) == global_batches[step], (count, step)


def test_same_layout_restores_grain_state_without_a_new_view(tmp_path, tokenizer):
    config = data_config((text_source(tmp_path / "a.jsonl", "a", 40), 1.0))
    old = iterators(config, tokenizer, 2, 4)
    for it in old:
        next(it)
    states = [saved(it) for it in old]
    want = prompt_names(next(old[1]), tokenizer)
    again = iterators(config, tokenizer, 2, 4)
    assert again[1].restore_states(states) is None
    assert prompt_names(next(again[1]), tokenizer) == want


def test_bad_samples_and_packs_lose_and_repeat_nothing(tmp_path, tokenizer, media_dir):
    # Packed, each process's packs hold what its samples' lengths allow, so after the same
    # number of steps the processes have used different parts of the stream, and a few
    # samples wait in a packer; some samples are bad (their media is missing) and dropped.
    records = [
        test_pipeline.chat(f"{'<AUD>' if i % 7 == 3 else ''}\nitem{i} " + "word " * (i % 5), audio="missing.wav")
        if i % 7 == 3
        else test_pipeline.chat(f"item{i} " + "word " * (i % 5))
        for i in range(60)
    ]
    config = test_packing.packed_config((write_jsonl(tmp_path / "d.jsonl", records), 1.0), source_epochs=1)
    config.sources[0]["media_root"] = str(media_dir)
    config.max_bad_fraction = 0.5
    rows = test_packing.ROWS

    def names(batch):
        return [sample["name"].split()[0] for sample in test_packing.samples_of(batch, tokenizer)]

    old = iterators(config, tokenizer, 2, 2, modality_rows=rows)
    # Process 0 three packs, process 1 one: their parts of the stream are used up to different points.
    used = [name for it, packs in zip(old, (3, 1)) for _ in range(packs) for name in names(next(it))]
    states = [saved(it) for it in old]
    new = iterators(config, tokenizer, 3, 3, modality_rows=rows)
    line = new[0].restore_states(states)
    for it in new[1:]:
        it.restore_states(states)
    _, past = (int(word) for word in line.split("up to sample ")[1].split(" past it")[0].split(" and "))
    assert past > 0  # process 0's samples past process 1's first unused one
    rest = [name for it in new for batch in it for name in names(batch)]
    good = {f"item{i}" for i in range(60) if i % 7 != 3}
    assert not set(used) & set(rest) and len(used) == len(set(used)) and len(rest) == len(set(rest))
    # All but the stream's last samples, which do not fill a global batch of three processes
    # (so an uninterrupted run on three leaves them out too).
    config.packing.enabled = False
    stream = [n.split()[0] for b in iterators(config, tokenizer, 1, 1)[0] for n in prompt_names(b, tokenizer)]
    lost = good - set(used) - set(rest)
    assert set(used) | set(rest) <= good and len(lost) <= 2 and lost <= set(stream[-2:]), (lost, stream[-3:])
