"""paper_repro.speech.features: filterbank and log-mel against librosa, batching, lengths, MFCC, SpecAugment."""
import numpy as np
import pytest
import scipy.fft
import torch

from paper_repro.speech.features import (LogMel, dct_matrix, feature_stats, frame_lengths, hz_to_mel, mel_filterbank,
                                         mel_to_hz, mfcc, spec_augment)

librosa = pytest.importorskip("librosa", reason="librosa (dev extra) is the reference implementation")


@pytest.mark.parametrize("scale", ["slaney", "htk"])
@pytest.mark.parametrize("norm", ["slaney", None])
@pytest.mark.parametrize("sr,n_fft,n_mels,fmin,fmax", [(16000, 512, 80, 0.0, None), (16000, 400, 40, 20.0, 7600.0),
                                                       (22050, 1024, 64, 0.0, 11025.0)])
def test_filterbank_matches_librosa(scale, norm, sr, n_fft, n_mels, fmin, fmax):
    ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax, scale, norm, torch.float64).numpy()
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=scale == "htk",
                              norm=norm, dtype=np.float64)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", ["slaney", "htk"])
def test_mel_scale_matches_librosa_and_inverts(scale):
    f = np.array([0.0, 100.0, 999.0, 1000.0, 1001.0, 4000.0, 8000.0])
    np.testing.assert_allclose(hz_to_mel(torch.tensor(f), scale).numpy(), librosa.hz_to_mel(f, htk=scale == "htk"),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(torch.tensor(f), scale), scale).numpy(), f, atol=1e-9)


def _signal(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)).astype(np.float64)


@pytest.mark.parametrize("n_fft,win,hop,scale", [(512, 400, 160, "slaney"), (400, 400, 160, "htk"),
                                                  (256, 200, 80, "slaney")])
def test_log_mel_matches_librosa(n_fft, win, hop, scale):
    x = _signal(12345)
    front = LogMel(n_fft=n_fft, win_length=win, hop_length=hop, n_mels=40, mel_scale=scale, normalize=None)
    feats, flen = front(torch.tensor(x))
    # librosa's STFT power through a float64 filterbank (melspectrogram itself builds a float32 filterbank)
    spec = librosa.stft(x, n_fft=n_fft, hop_length=hop, win_length=win, window="hann", center=True,
                        pad_mode="constant", dtype=np.complex128)
    fb = librosa.filters.mel(sr=16000, n_fft=n_fft, n_mels=40, htk=scale == "htk", norm="slaney", dtype=np.float64)
    ref = fb @ np.abs(spec) ** 2                                                   # [n_mels, T]
    assert flen.item() == ref.shape[1] == len(x) // hop + 1
    np.testing.assert_allclose(front.power_mel(torch.tensor(x)[None])[0].numpy(), ref.T, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(feats[0].numpy(), np.log(np.maximum(ref.T, 1e-10)), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("normalize", ["utterance", None])
def test_batch_equals_single_and_padding_is_zero(normalize):
    lens = [16000, 9001, 160, 4799]
    xs = [torch.tensor(_signal(n, seed=i)) for i, n in enumerate(lens)]
    batch = torch.zeros(len(xs), max(lens), dtype=torch.float64)
    for i, x in enumerate(xs): batch[i, :len(x)] = x
    front = LogMel(normalize=normalize)
    bf, bl = front(batch, torch.tensor(lens))
    assert bl.tolist() == [n // 160 + 1 for n in lens] == frame_lengths(torch.tensor(lens), 160).tolist()
    for i, x in enumerate(xs):
        sf, sl = front(x)
        assert sl.item() == bl[i].item()
        torch.testing.assert_close(bf[i, :bl[i]], sf[0], rtol=1e-9, atol=1e-9)
        assert (bf[i, bl[i]:] == 0).all()


def test_utterance_normalisation_statistics():
    x = torch.tensor(_signal(8000))
    feats, flen = LogMel(normalize="utterance", eps=0.0)(x)
    f = feats[0, :flen[0]]
    torch.testing.assert_close(f.mean(0), torch.zeros(80, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(f.std(0, unbiased=False), torch.ones(80, dtype=torch.float64), atol=1e-6, rtol=0)


def test_global_normalisation_uses_stats():
    xs = torch.stack([torch.tensor(_signal(8000, s)) for s in range(3)])
    raw, flen = LogMel(normalize=None)(xs)
    mean, std = feature_stats(raw, flen, eps=0.0)
    front = LogMel(normalize="global"); front.set_stats(mean.float(), std.float())
    normed, _ = front(xs)
    torch.testing.assert_close(normed, (raw - mean.float().double()) / std.float().double(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="stats must have shape"): front.set_stats(mean[:3], std[:3])


def test_float32_close_to_float64_and_device_follow():
    x = torch.tensor(_signal(4000))
    f64, _ = LogMel()(x)
    f32, _ = LogMel()(x.float())
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), f64, atol=2e-3, rtol=1e-3)


def test_bad_arguments_name_valid_values():
    with pytest.raises(ValueError, match="valid: 'utterance', 'global', None"): LogMel(normalize="batch")
    with pytest.raises(ValueError, match="valid: slaney, htk"): mel_filterbank(mel_scale="mel")
    with pytest.raises(ValueError, match="win_length"): LogMel(n_fft=256, win_length=400)
    with pytest.raises(ValueError, match="wave must be"): LogMel()(torch.zeros(1, 2, 3))


def test_mfcc_matches_scipy_dct():
    feats, _ = LogMel(normalize=None)(torch.tensor(_signal(4000)))
    ref = scipy.fft.dct(feats.numpy(), type=2, norm="ortho", axis=-1)[..., :13]
    np.testing.assert_allclose(mfcc(feats, 13).numpy(), ref, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="n_mfcc"): dct_matrix(0, 10)


def test_spec_augment_masks_inside_lengths_and_is_seeded():
    feats = torch.randn(3, 200, 80) + 5.0                      # no natural zeros
    lens = torch.tensor([200, 120, 50])
    a = spec_augment(feats, lens, n_freq_masks=2, freq_width=10, n_time_masks=2, time_width=20, time_frac=0.2,
                     generator=torch.Generator().manual_seed(1))
    b = spec_augment(feats, lens, n_freq_masks=2, freq_width=10, n_time_masks=2, time_width=20, time_frac=0.2,
                     generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    zero = a == 0
    assert ((a == feats) | zero).all() and zero.any()
    band = zero.all(1)                                          # bands masked for all frames: [B, D]
    frames = zero.all(2)                                        # frames masked in all bands: [B, T]
    assert (band.sum(1) <= 2 * 10).all()
    for i, n in enumerate(lens.tolist()):
        assert not frames[i, n:].any()                          # time masks stay inside the valid frames
        assert frames[i].sum() <= 2 * min(20, int(n * 0.2))
        # every zero is explained by a band mask or a frame mask
        assert (zero[i] == (band[i][None, :] | frames[i][:, None])).all()
