"""paper_repro.speech.oneavm: synthetic data, metrics, mix-and-separate masks, the three losses."""
import math

import numpy as np
import pytest
import torch

from paper_repro.speech.oneavm import (IMG_SIZE, LOSSES, N_CLASSES, N_SAMPLES, AudioFrontEnd, OneAVM, apply_masks,
                                       avl_loss, box_map, ciou, icon_mask, localise, make_clips, nn_accuracy,
                                       oneavm_loss, recognition_embeddings, separate, si_sdr, target_masks)


@pytest.fixture(scope="module")
def clips():
    return make_clips(12, seed=5)


@pytest.fixture(scope="module")
def front():
    return AudioFrontEnd()


# ---- data ---------------------------------------------------------------------------------------------------------
def test_generator_is_deterministic_and_seed_dependent(clips):
    again = make_clips(12, seed=5)
    for k in vars(clips):
        assert torch.equal(getattr(clips, k), getattr(again, k)), k
    assert not torch.equal(make_clips(12, seed=6).images, clips.images)
    assert clips.audio.shape == (12, N_SAMPLES) and clips.images.shape == (12, 3, IMG_SIZE, IMG_SIZE)


def test_masks_and_boxes_match_the_drawn_icons():
    """Without background noise, the pixels that differ from the (flat) background are exactly the two icons; the
    sounding icon's mask is the class's drawing at the box, and the box is the mask's tight bounding box."""
    c = make_clips(30, seed=11, noise=0.0)
    for i in range(len(c)):
        img = c.images[i]
        bg = img[:, 0, 0] if not c.masks[i, 0, 0] else None
        m = c.masks[i]
        rows, cols = torch.nonzero(m, as_tuple=True)
        r0, c0, r1, c1 = c.boxes[i].tolist()
        assert (r0, c0, r1, c1) == (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
        # the mask is the class's drawing (at one of the drawn sizes) placed somewhere covering the box
        found = False
        for size in range(8, 13):
            ref = torch.from_numpy(icon_mask(int(c.labels[i]), size))
            for rr in range(max(0, r1 - size), min(r0, IMG_SIZE - size) + 1):
                for cc in range(max(0, c1 - size), min(c0, IMG_SIZE - size) + 1):
                    window = torch.zeros_like(m); window[rr:rr + size, cc:cc + size] = ref
                    found |= bool(torch.equal(window, m))
        assert found, i
        # icon pixels all carry the instrument's colour; everything else is flat background or the distractor
        colours = img[:, m]
        assert torch.allclose(colours, colours[:, :1].expand_as(colours))
        if bg is not None:
            other = (img != bg[:, None, None]).any(0) & ~m
            assert other.sum() > 0                                  # the silent distractor is drawn
            # the distractor is the other class's drawing: its pixels carry that class's colour, not the sounding one's
            assert not torch.allclose(img[:, other][:, 0], colours[:, 0])


def test_icons_are_distinct_and_bad_inputs_raise():
    shapes = [icon_mask(k, 10) for k in range(N_CLASSES)]
    assert all(s.any() for s in shapes)
    assert len({s.tobytes() for s in shapes}) == N_CLASSES
    with pytest.raises(ValueError, match="cls must be in"): icon_mask(N_CLASSES, 10)
    with pytest.raises(ValueError, match="icon size"): icon_mask(0, 2)
    with pytest.raises(ValueError, match="n must be positive"): make_clips(0, seed=0)
    with pytest.raises(ValueError, match="noise must be"): make_clips(2, seed=0, noise=-1)


def test_tones_differ_per_instrument(front):
    """Each instrument's tone has its energy peak at its own fundamental (or a harmonic of it)."""
    from paper_repro.speech.oneavm import TONE_F0, harmonic_tone
    rng = np.random.default_rng(0)
    for k in range(N_CLASSES):
        x = torch.from_numpy(harmonic_tone(k, rng)).double()
        spec = torch.fft.rfft(x).abs()
        f_peak = float(spec.argmax()) * 8000 / len(x)
        ratio = f_peak / TONE_F0[k]
        assert abs(ratio - round(ratio)) < 0.1 and round(ratio) >= 1, (k, f_peak)


# ---- metrics ------------------------------------------------------------------------------------------------------
def test_ciou_hand_computed():
    gt = torch.zeros(1, 4, 4, dtype=torch.bool); gt[0, :2, :2] = True                 # 4 pixels
    h = torch.zeros(1, 4, 4); h[0, :2, :2] = 1.0
    assert float(ciou(h, gt)) == 1.0
    h = torch.zeros(1, 4, 4); h[0, :2, :3] = 1.0                                       # 4 hit + 2 extra
    assert math.isclose(float(ciou(h, gt)), 4 / (4 + 2))
    h = torch.zeros(1, 4, 4); h[0, 0, 0] = 1.0                                          # 1 hit, nothing extra
    assert math.isclose(float(ciou(h, gt)), 1 / 4)
    h = torch.zeros(1, 4, 4); h[0, 3, 3] = 1.0                                          # a miss
    assert float(ciou(h, gt)) == 0.0
    # min-max normalisation then threshold 0.5: 0.2 and 0.6 of range [0, 1] → only the 0.6 pixel is predicted
    h = torch.zeros(1, 4, 4); h[0, 0, 0] = 1.0; h[0, 0, 1] = 0.6; h[0, 0, 2] = 0.2
    assert math.isclose(float(ciou(h, gt)), 2 / 4)
    assert math.isclose(float(ciou(h * 7 + 3, gt)), 2 / 4)                             # affine invariant
    assert torch.equal(box_map(torch.tensor([[0, 0, 2, 2]]), 4), gt)
    with pytest.raises(ValueError, match="heatmaps and gt"): ciou(h, gt[0])
    with pytest.raises(ValueError, match="threshold"): ciou(h, gt, threshold=1.0)
    with pytest.raises(ValueError, match="boxes must be"): box_map(torch.tensor([0, 0, 2, 2]), 4)


def test_si_sdr_hand_computed():
    s = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    n = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)    # zero mean, orthogonal to s, same energy
    assert math.isclose(float(si_sdr(s + 0.1 * n, s, eps=0.0)), 20.0, abs_tol=1e-9)
    assert math.isclose(float(si_sdr(s + n, s, eps=0.0)), 0.0, abs_tol=1e-9)
    assert math.isclose(float(si_sdr(3 * (s + 0.1 * n) + 5, s, eps=0.0)), 20.0, abs_tol=1e-9)   # scale and offset invariant
    assert float(si_sdr(s, s)) > 70
    # an estimate with a component along s: ŝ = 2s + n → s_t = 2s, error n, SI-SDR = 10 log10(4·4 / 4) = 6.02 dB
    assert math.isclose(float(si_sdr(2 * s + n, s, eps=0.0)), 10 * math.log10(4.0), abs_tol=1e-9)
    with pytest.raises(ValueError, match="same shape"): si_sdr(s, s[:3])


def test_nn_accuracy_hand_computed():
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); gl = torch.tensor([0, 1])
    q = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]); ql = torch.tensor([0, 1, 1])
    assert math.isclose(nn_accuracy(g, gl, q, ql), 2 / 3)
    with pytest.raises(ValueError, match="same width"): nn_accuracy(g, gl, q[:, :1], ql)


# ---- mix-and-separate masks ---------------------------------------------------------------------------------------
def test_unwarp_rows_sum_to_one(front):
    assert torch.allclose(front.unwarp.sum(1), torch.ones_like(front.unwarp[:, 0]), atol=1e-12)
    assert (front.unwarp >= 0).all()


def test_target_masks_reconstruct_the_mixture(clips, front):
    a, b = clips.audio[:6].double(), clips.audio[6:].double()
    masks = target_masks(front, a, b)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(1), torch.ones_like(masks[:, 0]))
    est = apply_masks(front, a + b, masks)
    assert torch.allclose(est.sum(1), a + b, atol=1e-10)
    # the STFT round trip alone is exact, and an all-ones mask returns the mixture
    assert torch.allclose(front.istft(front.stft(a), a.shape[-1]), a, atol=1e-10)
    # the oracle masks do separate: well above the 0 dB of returning the mixture for each source
    sdr = si_sdr(est, torch.stack([a, b], 1))
    mix_sdr = si_sdr(torch.stack([a + b, a + b], 1), torch.stack([a, b], 1))
    assert (sdr.mean() > mix_sdr.mean() + 5)
    with pytest.raises(ValueError, match="same shape"): target_masks(front, a, b[:, :100])
    with pytest.raises(ValueError, match="mel_masks must be"): apply_masks(front, a + b, masks[:, 0])


# ---- losses and model ---------------------------------------------------------------------------------------------
def test_avl_loss_hand_computed():
    sim = torch.zeros(2, 2, 1, 2, dtype=torch.float64)
    sim[0, 0, 0, 1] = 1.0; sim[1, 1, 0, 0] = 1.0            # positives have max 1, negatives max 0
    tau = 0.5
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert math.isclose(float(avl_loss(sim, tau)), expected, rel_tol=1e-12)
    with pytest.raises(ValueError, match="sim must be"): avl_loss(sim[:1], tau)


@pytest.mark.parametrize("losses", [("avl",), ("avs",), ("mva",), LOSSES])
def test_each_loss_is_finite_and_has_gradients(clips, losses):
    torch.manual_seed(0)
    model = OneAVM()
    out = oneavm_loss(model, clips.images, clips.audio, clips.labels, losses, generator=torch.Generator().manual_seed(0))
    assert set(out) == set(losses) | {"total"}
    for k, v in out.items(): assert torch.isfinite(v) and v.dim() == 0, k
    for k in losses:
        model.zero_grad()
        out = oneavm_loss(model, clips.images, clips.audio, clips.labels, (k,), generator=torch.Generator().manual_seed(0))
        out[k].backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert any(n.startswith("visual.") for n in grads) and any(n.startswith("audio.") for n in grads), k
        assert all(torch.isfinite(g).all() for g in grads.values())
        if k == "avs": assert any(n.startswith("cond.") for n in grads)


def test_mva_with_lambda_one_is_plain_alignment(clips):
    """With λ = 1 the mixed frame is frame i and the target is audio i: MVA reduces to visual→audio InfoNCE."""
    from paper_repro.speech.oneavm import mva_loss, similarity_maps
    torch.manual_seed(0)
    model = OneAVM().double()
    images, audio = clips.images.double(), clips.audio.double()
    emb, _ = model.embed_audio(audio)
    perm = torch.roll(torch.arange(len(images)), 1)
    got = mva_loss(model, images, emb, perm, torch.ones(len(images), dtype=torch.float64))
    logits = similarity_maps(emb, model.embed_visual(images)).flatten(2).amax(-1).T / model.tau
    ref = torch.nn.functional.cross_entropy(logits, torch.arange(len(images)))
    assert torch.allclose(got, ref, atol=1e-10)


def test_inference_shapes_and_bad_inputs(clips):
    torch.manual_seed(0)
    model = OneAVM().eval()
    assert 0.2e6 < sum(p.numel() for p in model.parameters()) < 0.4e6
    heat = localise(model, clips.images, clips.audio)
    assert heat.shape == (12, IMG_SIZE, IMG_SIZE)
    est = separate(model, clips.audio[:6] + clips.audio[6:], torch.stack([clips.images[:6], clips.images[6:]], 1))
    assert est.shape == (6, 2, N_SAMPLES)
    emb = recognition_embeddings(model, clips.images, clips.audio)
    assert emb["audio"].shape == emb["visual"].shape == (12, 64)
    with pytest.raises(ValueError, match="valid: any non-empty subset"):
        oneavm_loss(model, clips.images, clips.audio, clips.labels, ("avl", "sep"))
    with pytest.raises(ValueError, match="valid: any non-empty subset"):
        oneavm_loss(model, clips.images, clips.audio, clips.labels, ())
    with pytest.raises(ValueError, match="at least 2"):
        oneavm_loss(model, clips.images[:1], clips.audio[:1], clips.labels[:1])
    with pytest.raises(ValueError, match="images must be"): model.visual(clips.images[:, :1])
    with pytest.raises(ValueError, match=r"images must be \[B, S"): separate(model, clips.audio[:2], clips.images[:2])


# ---- training -------------------------------------------------------------------------------------------------------
def _pre_fit_train_combo(model, train, steps, batch, losses, seed):
    "The notebook's training loop before it moved onto `core.train.fit` (commit d0e4065), kept as the reference."
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    log = []
    for step in range(steps):
        idx = torch.randint(0, len(train), (batch,), generator=g)
        out = oneavm_loss(model, train.images[idx], train.audio[idx], train.labels[idx], losses, generator=g)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log.append({"step": step, **{k: v.item() for k, v in out.items()}})
    return log


def test_train_oneavm_on_fit_takes_the_steps_of_the_pre_fit_loop():
    "The notebook's model and settings (batch 48, Adam at 2e-3), a dozen steps: bit-identical parameters and log."
    from paper_repro.speech.oneavm import train_oneavm
    train, losses = make_clips(96, seed=1000), LOSSES
    runs = []
    for new in (False, True):
        torch.manual_seed(0)
        m = OneAVM()
        log = train_oneavm(m, train, 12, 48, losses, lr=2e-3, seed=0) if new else \
            _pre_fit_train_combo(m, train, 12, 48, losses, seed=0)
        runs.append((m, log))
    (old, log_old), (new, log_new) = runs
    assert log_new == log_old and [r["step"] for r in log_new] == [0, 10, 11]
    for (name, a), b in zip(old.state_dict().items(), new.state_dict().values()):   # BatchNorm statistics too
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="batch must be at least 2"): train_oneavm(new, train, 2, 1)


def test_nn_accuracy_per_item_is_the_mean_of_its_items():
    from paper_repro.speech.oneavm import nn_accuracy
    g = torch.eye(3)
    gl = torch.tensor([0, 1, 2])
    q = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.0, 1.0], [0.9, 0.0, 0.2]])
    ql = torch.tensor([0, 1, 0])
    items = nn_accuracy(g, gl, q, ql, per_item=True)
    assert items.tolist() == [True, False, True]
    assert nn_accuracy(g, gl, q, ql) == pytest.approx(2 / 3) == float(items.double().mean())
