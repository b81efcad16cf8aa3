import numpy as np
import pytest
from PIL import Image

from evaluation.grid import (DIVIDER_W, _font, _line_h, base_vs_trained_grid, image_grid, paired_rows_grid,
                             save_png_atomic)


def _solid(color, size=(64, 64)):
    return Image.new("RGB", size, color)


def _bbox_of(img: Image.Image, color) -> tuple[int, int, int, int]:
    a = np.asarray(img)
    ys, xs = np.nonzero(np.all(a == np.array(color, dtype=np.uint8), axis=-1))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_grid_size_and_tile_position_without_labels():
    w, h, pad = 20, 12, 3
    colors = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    g = image_grid([[_solid(c, (w, h)) for c in row] for row in colors], pad=pad)
    assert g.mode == "RGB"
    assert g.size == (pad + 3 * (w + pad), pad + 2 * (h + pad))  # (72, 33)
    # tile (1, 2) top-left at (pad + 2*(w+pad), pad + 1*(h+pad)) = (49, 18)
    assert _bbox_of(g, (255, 0, 255)) == (49, 18, 49 + w, 18 + h)
    assert g.getpixel((49, 18)) == (255, 0, 255)
    assert g.getpixel((0, 0)) == (255, 255, 255)  # white padding


def test_base_vs_trained_grid_layout():
    base = [_solid((200, 0, 0)), _solid((0, 200, 0))]
    trained = [_solid((0, 0, 200)), _solid((10, 20, 30))]
    g = base_vs_trained_grid(base, trained, ["a photo of a cat, seed 0", "dog s1"])
    # trained tile of column 1 sits exactly one tile (64 + pad 2) right of column 0 and one below base
    x0, y0, x1, y1 = _bbox_of(g, (200, 0, 0))
    assert (x1 - x0, y1 - y0) == (64, 64)
    assert _bbox_of(g, (0, 200, 0))[:2] == (x0 + 66, y0)
    assert _bbox_of(g, (0, 0, 200))[:2] == (x0, y0 + 66)
    assert _bbox_of(g, (10, 20, 30)) == (x0 + 66, y0 + 66, x0 + 130, y0 + 130)
    # canvas = label margins + 2 tiles + pads; labels take room on the left and top
    assert x0 > 2 and y0 > 2
    assert g.size == (x0 + 2 * 66, y0 + 2 * 66)
    # labels are drawn in black somewhere in the margins
    a = np.asarray(g)
    assert (a[y0:, :x0 - 2] < 128).all(axis=-1).any()  # row labels
    assert (a[:y0 - 2, x0:] < 128).all(axis=-1).any()  # captions


def test_tile_labels_and_divider_follow_the_layout_formula():
    w, h, pad = 20, 12, 3
    th = _line_h(_font())  # one text line under each tile
    colors = [[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]]
    labels = [["a", "b", "c"], ["d", "e", "f"]]
    g = image_grid([[_solid(c, (w, h)) for c in row] for row in colors], pad=pad, tile_labels=labels, divider_at=2,
                   tile_label_colors=[[(0, 0, 0)] * 3, [(0, 0, 0), (0, 0, 0), (200, 0, 0)]])
    assert g.size == (pad + 3 * (w + pad) + DIVIDER_W, pad + 2 * (h + th + pad))
    # tile (r, c) at (pad + c*(w + pad) + dx(c), pad + r*(h + th + pad)); dx = DIVIDER_W from column 2 on
    assert _bbox_of(g, (255, 0, 0))[:2] == (pad, pad)
    assert _bbox_of(g, (0, 255, 255))[:2] == (pad + (w + pad), pad + (h + th + pad))
    assert _bbox_of(g, (255, 0, 255)) == (pad + 2 * (w + pad) + DIVIDER_W, pad + (h + th + pad),
                                          pad + 2 * (w + pad) + DIVIDER_W + w, pad + (h + th + pad) + h)
    a = np.asarray(g).astype(int)
    # labels sit in the band under their tile, in their colour
    under = a[pad + h:pad + h + th, pad:pad + w]
    assert (under.max(axis=-1) < 128).any()
    red = a[2 * pad + 2 * h + th:2 * pad + 2 * h + 2 * th, pad + 2 * (w + pad) + DIVIDER_W:]
    assert ((red[..., 0] > 150) & (red[..., 1] < 100)).any()
    # a 2 px grey line in the gap left of column 2, none elsewhere (along a tile row: no text there)
    grey = (a[pad:pad + h] == 96).all(axis=-1)
    assert grey.any(axis=0).nonzero()[0].tolist() == [pad + 2 * (w + pad) + DIVIDER_W - (pad + DIVIDER_W) // 2 - 1,
                                                       pad + 2 * (w + pad) + DIVIDER_W - (pad + DIVIDER_W) // 2]


def test_paired_rows_grid_puts_each_side_left_and_right_of_the_divider():
    b = [[_solid((200, 0, 0), (16, 16))], [_solid((0, 200, 0), (16, 16))]]
    t = [[_solid((0, 0, 200), (16, 16))], [_solid((10, 20, 30), (16, 16))]]
    g = paired_rows_grid(b, t, row_labels=["r0", "r1"], base_labels=[["x"], ["y"]], trained_labels=[["z"], ["w"]])
    xb, yb = _bbox_of(g, (200, 0, 0))[:2]
    assert _bbox_of(g, (0, 0, 200))[:2] == (xb + 16 + 2 + DIVIDER_W, yb)  # trained of the same row, past the divider
    assert _bbox_of(g, (10, 20, 30))[0] == xb + 16 + 2 + DIVIDER_W and _bbox_of(g, (0, 200, 0))[0] == xb
    with pytest.raises(ValueError, match="row 1 has 1 base and 0 trained"):
        paired_rows_grid(b, [t[0], []], row_labels=["r0", "r1"], base_labels=[["x"], ["y"]], trained_labels=[["z"], []])


def test_grid_errors():
    with pytest.raises(ValueError, match=r"rows\[1\]"):
        image_grid([[_solid((0, 0, 0))], [_solid((0, 0, 0)), _solid((0, 0, 0))]])
    with pytest.raises(ValueError, match="size"):
        image_grid([[_solid((0, 0, 0)), _solid((0, 0, 0), (32, 32))]])
    with pytest.raises(ValueError, match="tile_labels"):
        image_grid([[_solid((0, 0, 0)), _solid((0, 0, 0))]], tile_labels=[["a"]])
    with pytest.raises(ValueError, match="divider_at=2"):
        image_grid([[_solid((0, 0, 0)), _solid((0, 0, 0))]], divider_at=2)
    with pytest.raises(ValueError, match="captions has 2"):
        base_vs_trained_grid([_solid((0, 0, 0))], [_solid((0, 0, 0))], ["a", "b"])


def test_save_png_atomic_roundtrip(tmp_path):
    img = image_grid([[_solid((1, 2, 3), (8, 8))]], pad=0)
    out = save_png_atomic(img, tmp_path / "eval" / "grid.png")
    assert out == tmp_path / "eval" / "grid.png"
    assert sorted(p.name for p in out.parent.iterdir()) == ["grid.png"]  # no temp file left
    with Image.open(out) as back:
        assert back.format == "PNG" and back.size == (8, 8) and back.getpixel((4, 4)) == (1, 2, 3)
