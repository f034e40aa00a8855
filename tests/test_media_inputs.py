"""Image, video and audio columns: preftune trains on text and images, so every reader reads images (the vision
path: tests/test_vision.py) and refuses data that carries videos or audio, naming the file and the column, instead
of dropping the column and training on the rest alone."""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
from conftest import shared_asset

from preftune.cli import main
from preftune.data.formats import canonicalize_records, load_preference_data
from preftune.errors import DataError

REFUSAL = "not supported yet: video inputs (column '{}'); preftune trains on text and images"

# TRL's vision preference format (e.g. openbmb/RLAIF-V in TRL's docs): conversational prompt with an image part.
TRL_VISION_ROW = {
    "images": ["cat.png"],
    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "图片里有什么？"}]}],
    "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "一只猫。"}]}],
    "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "一只狗。"}]}],
}
# LLaMA-Factory's rlhf_v (sharegpt, ranking): "<image>" placeholders in the text, file names in "images".
LLAMAFACTORY_VISION_ROW = {
    "conversations": [{"from": "human", "value": "<image>这张图片里有什么？"}],
    "chosen": {"from": "gpt", "value": "一只猫坐在垫子上。"},
    "rejected": {"from": "gpt", "value": "一只狗在跑。"},
    "images": ["images/0001.jpg"],
}
LLAMAFACTORY_VIDEO_ROW = {
    "conversations": [{"from": "human", "value": "<video>视频里发生了什么？"}],
    "chosen": {"from": "gpt", "value": "一只猫在跳。"},
    "rejected": {"from": "gpt", "value": "一只狗在跑。"},
    "videos": ["videos/0001.mp4"],
}
TEXT_ROW = {"prompt": "天空是什么颜色？", "chosen": "蓝色。", "rejected": "绿色。"}
CHAT_ROW = {"prompt": [{"role": "user", "content": "天空是什么颜色？"}], "chosen": [{"role": "assistant", "content": "蓝色。"}],
            "rejected": [{"role": "assistant", "content": "绿色。"}]}


def save_image(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color=(255, 0, 0)).save(path)
    return path


def write_json(path, rows):
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def test_a_trl_vision_row_is_read_with_its_image_beside_the_file(tmp_path):
    path = tmp_path / "vision.jsonl"
    save_image(tmp_path / "cat.png")
    path.write_text(json.dumps(CHAT_ROW, ensure_ascii=False) + "\n" + json.dumps(TRL_VISION_ROW) + "\n",
                    encoding="utf-8")
    loaded = load_preference_data(str(path))
    assert loaded.dataset["images"] == [[], [{"bytes": None, "path": str(tmp_path / "cat.png")}]]
    assert loaded.dataset[1]["prompt"] == [{"role": "user", "content": "<image>图片里有什么？"}]


@pytest.mark.parametrize("policy", ["skip", "warn"])
def test_skipping_bad_rows_does_not_skip_videos_into_a_text_only_run(tmp_path, policy):
    path = write_json(tmp_path / "video.json", [LLAMAFACTORY_VIDEO_ROW])
    with pytest.raises(DataError, match=REFUSAL.format("videos").replace("(", r"\(").replace(")", r"\)")):
        load_preference_data(str(path), on_bad_row=policy)


def test_a_llamafactory_registry_entry_with_a_videos_column_is_refused_before_reading(tmp_path):
    registry = {"rlhf_v_local": {"file_name": "absent.json", "ranking": True, "formatting": "sharegpt",
                                 "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                             "images": "images"}},
                "video_local": {"file_name": "absent.json", "ranking": True, "formatting": "sharegpt",
                                "columns": {"messages": "conversations", "videos": "videos"}},
                "audio_local": {"file_name": "absent.json", "ranking": True, "formatting": "sharegpt",
                                "columns": {"messages": "conversations", "audios": "audios"}}}
    write_json(tmp_path / "dataset_info.json", registry)
    info = str(tmp_path / "dataset_info.json")
    with pytest.raises(DataError, match="file not found"):  # images are read: the entry gets as far as its file
        load_preference_data("rlhf_v_local", dataset_dir=str(tmp_path))
    for name, key, kind in (("video_local", "videos", "video"), ("audio_local", "audios", "audio")):
        with pytest.raises(DataError) as caught:
            load_preference_data(name, dataset_dir=str(tmp_path))
        assert (caught.value.file, caught.value.field) == (info, f"columns.{key}")
        assert f"dataset '{name}': not supported yet: {kind} inputs (column '{key}')" in str(caught.value)


def test_images_in_a_registered_file_whose_entry_does_not_name_them_are_read(tmp_path):
    write_json(tmp_path / "dataset_info.json", {"pairs": {"file_name": "pairs.json", "ranking": True,
                                                          "formatting": "sharegpt"}})
    write_json(tmp_path / "pairs.json", [LLAMAFACTORY_VISION_ROW])
    save_image(tmp_path / "images" / "0001.jpg")
    loaded = load_preference_data("pairs", dataset_dir=str(tmp_path))
    assert loaded.dataset[0]["images"] == [{"bytes": None, "path": str(tmp_path / "images" / "0001.jpg")}]


def test_every_reader_refuses_a_video_or_audio_column(tmp_path):
    rows = [dict(TEXT_ROW, videos=["a.mp4"])]
    pd.DataFrame(rows).to_parquet(tmp_path / "v.parquet")
    pd.DataFrame([dict(TEXT_ROW, video="a.mp4")]).to_csv(tmp_path / "v.csv", index=False)
    datasets.Dataset.from_list([dict(TEXT_ROW, videos=["clip.mp4"])]).save_to_disk(str(tmp_path / "saved"))
    write_json(tmp_path / "v.json", [dict(TEXT_ROW, audios=["a.wav"])])
    cases = [("v.parquet", "videos"), ("v.csv", "video"), ("saved", "videos")]
    for name, column in cases:
        with pytest.raises(DataError, match=rf"not supported yet: video inputs \(column '{column}'\)") as caught:
            load_preference_data(str(tmp_path / name))
        assert caught.value.file == str(tmp_path / name) and caught.value.field == column
    with pytest.raises(DataError, match=r"not supported yet: audio inputs \(column 'audios'\)"):
        load_preference_data(str(tmp_path / "v.json"))
    with pytest.raises(DataError, match="column 'videos'"):
        canonicalize_records(rows, source="mem", on_bad_row="skip")


def test_an_images_column_with_a_text_prompt_is_a_data_error(tmp_path):
    save_image(tmp_path / "a.png")
    with pytest.raises(DataError, match="field 'images': has images but a text prompt"):
        load_preference_data([dict(TEXT_ROW, images=["a.png"])], dataset_dir=str(tmp_path))


def test_decoded_images_of_a_datasets_image_column_are_read(tmp_path):
    from PIL import Image

    picture = Image.new("RGB", (2, 2), color=(255, 0, 0))
    saved = datasets.Dataset.from_list([dict(CHAT_ROW, images=[picture])])
    row = load_preference_data(saved).dataset[0]
    assert row["images"][0]["path"] is None and row["images"][0]["bytes"].startswith(b"\x89PNG")


def test_an_images_column_empty_in_every_row_is_text_only_and_accepted(tmp_path):
    rows = [dict(TEXT_ROW, images=[]), dict(TEXT_ROW, chosen="蔚蓝。", images=None), dict(TEXT_ROW, images=[None])]
    loaded = load_preference_data(str(write_json(tmp_path / "empty.json", rows)))
    assert loaded.dataset["chosen"] == ["蓝色。", "蔚蓝。", "蓝色。"]
    pd.DataFrame([dict(TEXT_ROW, image="")]).to_csv(tmp_path / "empty.csv", index=False)
    assert len(load_preference_data(str(tmp_path / "empty.csv")).dataset) == 1


def test_data_check_and_train_stop_with_one_line_naming_file_and_column(tmp_path, capsys):
    path = write_json(tmp_path / "video.json", [LLAMAFACTORY_VIDEO_ROW])
    expected = f"preftune: error: file {path}, row 0, field 'videos': {REFUSAL.format('videos')}\n"
    assert main(["data", "check", str(path)]) == 2
    assert capsys.readouterr().err.endswith(expected)
    config = tmp_path / "cfg.yaml"
    model = shared_asset("stories260K-hf")
    config.write_text(f"model_name_or_path: {model}\ndataset: {path}\noutput_dir: {tmp_path / 'out'}\n", encoding="utf-8")
    assert main(["train", str(config)]) == 2
    assert capsys.readouterr().err.endswith(expected)
