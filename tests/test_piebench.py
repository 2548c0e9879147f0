"""PIE-Bench's data set (tools/piebench.py): the mask decoder against hand-made run-length codes, the entries of a
synthetic set in the benchmark's layout (tests/piebench_data.py), the bad entries named, the picture scored, the
table's means."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from minledits.tools import piebench
from tests import piebench_data

N = 512 * 512


def frame():
    m = np.zeros((512, 512), bool)
    m[0], m[-1], m[:, 0], m[:, -1] = True, True, True, True
    return m


def test_an_empty_mask_is_the_frame_and_a_whole_frame_mask_is_everything():
    assert (piebench.decode_mask([]) == frame()).all()
    assert piebench.decode_mask([0, N]).all()
    assert piebench.decode_mask([0, N]).shape == (512, 512)


def test_runs_are_row_major_and_cross_row_ends():
    m = piebench.decode_mask([512 * 10 + 500, 20])  # row 10, columns 500..511, then row 11, columns 0..7
    want = frame()
    want[10, 500:] = True
    want[11, :8] = True
    assert (m == want).all()
    assert not m[10, 499] and not m[11, 8] and m[11, 7]


def test_overlapping_unsorted_runs_are_a_union_and_the_last_is_clipped():
    m = piebench.decode_mask([512 * 100 + 50, 10, 512 * 100 + 45, 8, 512 * 511 + 300, 10_000])
    want = frame()
    want[100, 45:60] = True
    want[511, 300:] = True  # clipped at the picture's end, as the benchmark
    assert (m == want).all()


def test_a_drawn_rectangle_round_trips():
    r = piebench_data.entry_mask(1, 3)
    code = piebench_data.rle(r)
    assert (piebench.decode_mask(code) == (r | frame())).all()


@pytest.mark.parametrize("code, words", [([5], "pairs"), ([0, 5, 7], "pairs"), ([N, 1], "outside"),
                                         ([-1, 3], "outside"), ([3, -1], "outside"), ([0.5, 3], "pairs"),
                                         ("0 10", "pairs")])
def test_a_mask_of_the_wrong_length_is_refused(code, words):
    with pytest.raises(ValueError, match=words):
        piebench.decode_mask(code)


def test_brackets():
    assert piebench.strip("a [red] car [on] a road") == "a red car on a road"
    assert piebench.bracketed("a [red] [old] car") == ["red", "old"]
    assert piebench.bracketed("a [snowy mountain]") == ["snowy mountain"] and piebench.bracketed("none") == []


def test_the_synthetic_set_has_the_benchmarks_layout(tmp_path):
    ids = piebench_data.write(tmp_path, 12)
    mapping = json.loads((tmp_path / "mapping_file.json").read_text())
    assert list(mapping) == ids and ids[0] == "000000000000" and ids[1] == "111000000000"
    for key, v in mapping.items():
        assert set(v) == set(piebench.KEYS) and v["image_path"].endswith(f"/{key}.jpg")
        with Image.open(tmp_path / "annotation_images" / v["image_path"]) as im:
            assert im.format == "JPEG" and im.size == (512, 512) and im.mode == "RGB"
    assert mapping["111000000000"]["image_path"] == "1_change_object_80/1_artificial/1_animal/111000000000.jpg"
    assert mapping["911000000000"]["mask"] == [0, N]
    entries, bad = piebench.read(tmp_path)
    assert bad == {} and [e.id for e in entries] == ids
    e = entries[1]
    assert (e.source, e.target, e.add, e.remove, e.edit_type) == (
        "a red car parked on the street", "a blue car parked on the street", ("blue",), ("red",), "1")
    assert [e.id for e in piebench.read(tmp_path, {"1", "2"})[0]] == ["111000000000", "211000000000", "122000000001"]
    assert len(piebench.read(tmp_path, None, 3)[0]) == 3


def test_bad_entries_are_named_and_the_others_read(tmp_path):
    ids = piebench_data.write(tmp_path, 6)
    path = tmp_path / "mapping_file.json"
    mapping = json.loads(path.read_text())
    (tmp_path / "annotation_images" / mapping[ids[0]]["image_path"]).unlink()
    mapping[ids[1]]["mask"] = mapping[ids[1]]["mask"] + [7]
    mapping[ids[2]]["editing_type_id"] = "12"
    mapping[ids[3]]["editing_prompt"] = "[ ]"
    mapping[ids[4]]["image_path"] = "../outside.jpg"
    path.write_text(json.dumps(mapping))
    entries, bad = piebench.read(tmp_path)
    assert [e.id for e in entries] == [ids[5]]
    assert bad[ids[0]].startswith(f"entry {ids[0]}: no photo ") and "pairs" in bad[ids[1]]
    assert "unknown edit type '12'" in bad[ids[2]] and "editing_prompt is empty" in bad[ids[3]]
    assert "not a path inside" in bad[ids[4]] and all("\n" not in why for why in bad.values())
    with pytest.raises(piebench.MinleditsError, match="cannot read"):
        piebench.read(tmp_path / "nowhere")
    path.write_text('{"000000000000": ')
    with pytest.raises(piebench.MinleditsError, match=r"mapping_file.json is not JSON \(Expecting value at line 1, "
                                                      r"column 18\)$"):
        piebench.read(tmp_path)


def test_a_picture_that_is_not_square_is_scored_on_its_bottom_right_block():
    row = Image.new("RGB", (1024, 600), "red")
    row.paste(Image.new("RGB", (512, 512), "blue"), (512, 88))
    picked = piebench.scored(row)
    assert picked.size == (512, 512) and picked.getpixel((0, 0)) == (0, 0, 255)
    assert picked.getpixel((511, 511)) == (0, 0, 255)
    square = Image.new("RGB", (512, 512))
    assert piebench.scored(square) is square


def test_means_skip_nan_and_use_the_papers_units():
    def row(method, t, psnr, mse):
        return {"method": method, "editing_type_id": t, **dict.fromkeys(piebench.METRICS, 0.5),
                "psnr_unedit_part": psnr, "mse_unedit_part": mse}
    rows = [row("ddpm", "1", 20.0, 0.01), row("ddpm", "9", math.nan, math.nan), row("ddpm", "1", 30.0, 0.03)]
    table = piebench.summary(rows, ["vae", "ddpm"])
    assert [(r["method"], r["edit_type"], r["n"]) for r in table] == [("ddpm", "all", 3), ("ddpm", "1", 2),
                                                                       ("ddpm", "9", 1)]
    assert table[0]["psnr_unedit_part"] == 25 and table[0]["mse_unedit_part"] == pytest.approx(200)
    assert table[0]["structure_distance"] == 500 and table[0]["ssim_unedit_part"] == 50
    assert math.isnan(table[2]["psnr_unedit_part"])
