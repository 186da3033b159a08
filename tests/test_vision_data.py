"""paper_repro.vision.data: digits splits, sample images, shape and digit canvases, aligned transforms."""
import pytest
import torch
from torchvision.ops import masks_to_boxes
from torchvision.transforms import v2

from paper_repro.vision import data as vd


def test_digit_splits_are_fixed_disjoint_and_cover_the_set():
    parts = {s: vd.load_digits_images(s, 8) for s in vd.DIGIT_SPLITS}
    assert sum(len(y) for _, y in parts.values()) == 1797
    flat = {s: x.flatten(1) for s, (x, _) in parts.items()}
    # the original set has a few duplicate images; a split pair may share only those, never by construction
    shared = (flat["train"][:, None] == flat["test"][None]).all(-1).sum().item()
    assert shared <= 2
    x1, y1 = vd.load_digits_images("val", 16)
    x2, y2 = vd.load_digits_images("val", 16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and x1.shape == (200, 1, 16, 16)


def test_digit_arguments_are_checked():
    with pytest.raises(ValueError, match="split='dev'; valid: train, val, test"): vd.load_digits_images("dev")
    with pytest.raises(ValueError, match="size=12; valid: 8, 16, 32"): vd.load_digits_images("train", 12)
    with pytest.raises(ValueError, match="name='eagle'"): vd.sample_image("eagle")


def test_sample_image_is_rgb_in_range():
    img = vd.sample_image("coffee", 24)
    assert img.shape == (3, 24, 24) and img.min() >= 0 and img.max() <= 1


@pytest.mark.parametrize("shape", vd.SHAPES)
def test_shape_masks_have_the_expected_area(shape):
    m = vd.shape_mask(shape, 200, 100, 100, 40)
    expected = {"circle": 3.14159 * 40 ** 2, "square": 80 ** 2, "triangle": 80 * 80 / 2}[shape]
    assert abs(m.sum().item() - expected) / expected < 0.03


def test_canvas_masks_boxes_and_caption_agree():
    for seed in range(20):
        c = vd.shapes_canvas(seed, 32, (2, 4))
        assert not (c.masks.sum(0) > 1).any()
        assert torch.equal(c.boxes, masks_to_boxes(c.masks) + torch.tensor([0, 0, 1, 1]))
        # every visible pixel of an object has that object's colour
        for m, col in zip(c.masks, c.colors):
            rgb = torch.tensor(list(vd.COLORS.values())[col])
            assert torch.allclose(c.image[:, m], rgb[:, None].expand(3, int(m.sum())))
        names = [f"{list(vd.COLORS)[k]} {vd.SHAPES[s]}" for s, k in zip(c.labels, c.colors)]
        assert c.caption.startswith(f"a {names[0]}") and all(n in c.caption for n in names)


def test_relation_words():
    a, b = torch.tensor([0, 0, 4, 4]), torch.tensor([10, 1, 14, 5])
    assert vd._relation(a, b) == "left of" and vd._relation(b, a) == "right of"
    assert vd._relation(torch.tensor([0, 0, 4, 4]), torch.tensor([1, 10, 5, 14])) == "above"


def test_digit_canvas_uses_only_its_split_and_is_deterministic():
    a, b = vd.digits_canvas(5, 64, 3, split="test"), vd.digits_canvas(5, 64, 3, split="test")
    assert torch.equal(a.image, b.image) and a.labels.tolist() == b.labels.tolist()
    assert set(a.labels.tolist()) <= set(range(10)) and (a.colors == -1).all()


def test_transforms_move_annotations_with_the_image():
    t = v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.RandomVerticalFlip(p=1.0)])
    ds = vd.CanvasDataset(6, transform=t, size=32)
    for i in range(len(ds)):
        img, tgt = ds[i]
        assert torch.equal(img, ds.canvas(i).image.flip(-1).flip(-2))
        assert torch.equal(tgt["boxes"], masks_to_boxes(tgt["masks"]) + torch.tensor([0, 0, 1, 1]))
    images, targets = vd.collate_canvases([ds[0], ds[1]])
    assert images.shape == (2, 3, 32, 32) and len(targets) == 2
    with pytest.raises(IndexError): ds.canvas(6)
    with pytest.raises(ValueError, match="n must be a positive int"): vd.CanvasDataset(0)
