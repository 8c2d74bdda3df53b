"""Each annotation layout read from a 2-3 record fixture written here in that layout."""

import json

import pytest

from avllm_jax.evaluation import tasks
from avllm_jax.evaluation.tasks import Sample


def write(path, content):
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_msrvtt_qa(tmp_path):
    f = write(
        tmp_path / "test_qa.json",
        [
            {"answer": "dog", "id": 0, "question": "what is running?", "video_id": 7010},
            {"id": 1, "question": "who sings?", "video_id": 7011},  # no answer
        ],
    )
    assert tasks.load_task("msrvtt_qa", f) == [
        Sample("0", ("video7010",), ("what is running?",), ("dog",)),
        Sample("1", ("video7011",), ("who sings?",), ()),
    ]


def test_msvd_qa_with_and_without_mapping(tmp_path):
    records = [
        {"answer": "cat", "id": 3, "question": "what plays?", "video_id": 1},
        {"answer": "man", "id": 4, "question": "who cooks?", "video_id": 2},
    ]
    f = write(tmp_path / "test_qa.json", records)
    assert [s.media for s in tasks.load_task("msvd_qa", f)] == [("vid1",), ("vid2",)]
    write(tmp_path / "youtube_mapping.txt", "-4wsuPCjDBc_5_15 vid1\nabc_1_2 vid2\n")
    samples = tasks.load_task("msvd_qa", f)
    assert samples[0] == Sample("3", ("-4wsuPCjDBc_5_15", "vid1"), ("what plays?",), ("cat",))
    assert samples[1].media == ("abc_1_2", "vid2")


def test_activitynet_qa_pairs_questions_with_answers_file(tmp_path):
    q = write(
        tmp_path / "test_q.json",
        [
            {"video_name": "abc", "question": "is it indoors", "question_id": "v_abc_0"},
            {"video_name": "v_def", "question": "what color is the car?", "question_id": "v_def_1"},
        ],
    )
    with pytest.raises(ValueError, match="test_a.json"):
        tasks.load_task("activitynet_qa", q)
    write(tmp_path / "test_a.json", [{"answer": "yes", "type": 3, "question_id": "v_abc_0"}])
    assert tasks.load_task("activitynet_qa", q) == [
        Sample("v_abc_0", ("abc", "v_abc"), ("is it indoors?",), ("yes",)),
        Sample("v_def_1", ("v_def",), ("what color is the car?",), ()),
    ]


def test_avsd_turns_and_undisclosed_answers(tmp_path):
    f = write(
        tmp_path / "avsd_test.json",
        {
            "type": "test",
            "dialogs": [
                {
                    "image_id": "QH2CC",
                    "caption": "...",
                    "dialog": [
                        {"question": "is there a man?", "answer": "yes, one man"},
                        {"question": "does he speak?", "answer": "__UNDISCLOSED__"},
                    ],
                },
            ],
        },
    )
    assert tasks.load_task("avsd", f) == [
        Sample("QH2CC_0", ("QH2CC",), ("is there a man?",), ("yes, one man",)),
        Sample("QH2CC_1", ("QH2CC",), ("does he speak?",), ()),
    ]


def test_music_avqa_fills_template_and_reads_misspelt_answer(tmp_path):
    f = write(
        tmp_path / "avqa-test.json",
        [
            {
                "video_id": "00000823",
                "question_id": 325,
                "type": '["Audio-Visual", "Existential"]',
                "question_content": "Is the <Object> on the <LR> playing?",
                "templ_values": '["cello", "left"]',
                "question_deleted": 0,
                "anser": "yes",
            },
            {
                "video_id": "00000824",
                "question_id": 326,
                "question_content": "How many instruments are sounding?",
                "templ_values": "[]",
                "anser": "two",
            },
        ],
    )
    assert tasks.load_task("music_avqa", f) == [
        Sample("325", ("00000823",), ("Is the cello on the left playing?",), ("yes",)),
        Sample("326", ("00000824",), ("How many instruments are sounding?",), ("two",)),
    ]


def test_avssd_keeps_test_split(tmp_path):
    f = write(tmp_path / "vggsound.csv", "---g-f_I2yQ,1,people marching,test\nabc,30,dog barking,train\nxyz,5,,test\n")
    assert tasks.load_task("avssd", f) == [
        Sample(
            "---g-f_I2yQ_1",
            ("---g-f_I2yQ_000001", "---g-f_I2yQ_1", "---g-f_I2yQ"),
            (tasks.AVSSD_QUESTION,),
            ("people marching",),
        ),
        Sample("xyz_5", ("xyz_000005", "xyz_5", "xyz"), (tasks.AVSSD_QUESTION,), ()),
    ]


def test_videochat_generic_and_consistency(tmp_path):
    g = write(
        tmp_path / "generic_qa.json",
        [
            {"video_name": "v_a", "Q": "What happens?", "A": "A man dances."},
            {"video_name": "v_a", "Q": "Where is it?", "A": "In a park."},
        ],
    )
    assert tasks.load_task("videochat_generic", g) == [
        Sample("0_v_a", ("v_a",), ("What happens?",), ("A man dances.",)),
        Sample("1_v_a", ("v_a",), ("Where is it?",), ("In a park.",)),
    ]
    c = write(
        tmp_path / "consistency_qa.json",
        [{"video_name": "v_b", "Q1": "Who runs?", "Q2": "Which person runs?", "A": "A girl."}],
    )
    assert tasks.load_task("videochat_consistency", c) == [
        Sample("0_v_b", ("v_b",), ("Who runs?", "Which person runs?"), ("A girl.",))
    ]
    assert tasks.TASKS["videochat_generic"].judge_dimensions + tasks.TASKS[
        "videochat_temporal"
    ].judge_dimensions + tasks.TASKS["videochat_consistency"].judge_dimensions == (
        "correctness",
        "detail",
        "context",
        "temporal",
        "consistency",
    )


def test_clotho_and_audiocaps(tmp_path):
    c = write(
        tmp_path / "clotho_captions_evaluation.csv",
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
        '"rain, roof.wav",Rain falls.,Water drips,"Rain, then thunder.",,A storm\n',
    )
    assert tasks.load_task("clotho", c) == [
        Sample(
            "rain, roof.wav",
            ("rain, roof.wav",),
            (tasks.CAPTION_QUESTION,),
            ("Rain falls.", "Water drips", "Rain, then thunder.", "A storm"),
        )
    ]
    a = write(
        tmp_path / "test.csv",
        "audiocap_id,youtube_id,start_time,caption\n"
        "1,abc,30,A dog barks\n2,def,0,Wind blows\n3,abc,30,Dogs bark loudly\n",
    )
    assert tasks.load_task("audiocaps", a) == [
        Sample("abc", ("abc", "Yabc", "abc_30"), (tasks.CAPTION_QUESTION,), ("A dog barks", "Dogs bark loudly")),
        Sample("def", ("def", "Ydef", "def_0"), (tasks.CAPTION_QUESTION,), ("Wind blows",)),
    ]
    assert tasks.TASKS["audiocaps"].modality == "audio"


def test_bad_files_name_the_file(tmp_path):
    bad = write(tmp_path / "broken.json", "{not json")
    with pytest.raises(ValueError, match="broken.json"):
        tasks.load_task("msrvtt_qa", bad)
    dup = write(tmp_path / "dup.json", [{"id": 1, "question": "q", "answer": "a", "video_id": 1}] * 2)
    with pytest.raises(ValueError, match="dup.json.*'1'"):
        tasks.load_task("msrvtt_qa", dup)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        tasks.load_task("msrvtt_qa", tmp_path / "absent.json")
    wrong = write(tmp_path / "captions.csv", "name,text\nx.wav,rain\n")
    with pytest.raises(ValueError, match="captions.csv: the header lacks column.s. file_name, caption_1"):
        tasks.load_task("clotho", wrong)
    template = write(
        tmp_path / "avqa.json",
        [
            {
                "video_id": "1",
                "question_id": 7,
                "question_content": "Is <Object> on?",
                "templ_values": "[cello",
                "anser": "yes",
            }
        ],
    )
    with pytest.raises(ValueError, match="avqa.json: question 7: templ_values"):
        tasks.load_task("music_avqa", template)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.load_task("nope", dup)


def test_media_resolution(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("video1.mp4", "sub/Yabc.wav", "notes.txt", "video1.txt"):
        (tmp_path / name).write_bytes(b"")
    index = tasks.index_media(tmp_path)
    assert tasks.resolve_media(Sample("a", ("video1",), ("q",), ()), index) == str(tmp_path / "video1.mp4")
    assert tasks.resolve_media(Sample("b", ("abc", "Yabc"), ("q",), ()), index) == str(tmp_path / "sub/Yabc.wav")
    assert tasks.resolve_media(Sample("c", ("sub/Yabc.wav",), ("q",), ()), index) == str(tmp_path / "sub/Yabc.wav")
    assert tasks.resolve_media(Sample("d", ("notes",), ("q",), ()), index) is None


def test_jsonl_reads_the_training_format_first_exchange_and_modality(tmp_path):
    from avllm_jax.modality import Modality

    def line(id, key, path, token, question, answer, *more):
        turns = [{"from": "human", "value": f"{token}\n{question}"}, {"from": "gpt", "value": answer}, *more]
        return json.dumps({"id": id, key: path, "conversations": turns})

    later = [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": "It stops."}]
    f = write(
        tmp_path / "held_out.jsonl",
        "\n".join(
            [
                line("v1", "video", "media/dog.mp4", "<VIS>", "What is the dog doing?", "It is running.", *later),
                line("a1", "audio", "media/rain.flac", "<AUD>", "What do you hear?", " Rain. "),
            ]
        ),
    )
    assert tasks.load_task("jsonl", f) == [
        Sample("v1", ("media/dog.mp4",), ("What is the dog doing?",), ("It is running.",), Modality.VISUAL),
        Sample("a1", ("media/rain.flac",), ("What do you hear?",), ("Rain.",), Modality.AUDIO),
    ]
    assert tasks.TASKS["jsonl"].kind == "qa"  # exact match, and the judge when one is given
    write(tmp_path / "bad.jsonl", line("x", "video", "a.mp4", "<AUD_VIS>", "Q?", "A.")[:-3] + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not valid JSON"):
        tasks.load_task("jsonl", tmp_path / "bad.jsonl")
