"""keywords: the MFCC front end, the formant synthesizer, and the Speech Commands reader."""

from __future__ import annotations

import math
import types
import wave
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal
from sklearn.model_selection import StratifiedGroupKFold

from ..errors import DatasetError
from .base import TEST_FRACTION, Dataset, cap_option, frozen, resolve_path, rng_for, stratified_split

# --------------------------------------------------------------------------------------------
# keywords: MFCC front end
# --------------------------------------------------------------------------------------------

SAMPLE_RATE = 16000
CLIP_SAMPLES = SAMPLE_RATE  # 1 s
MFCC_WINDOW = 480  # 30 ms
MFCC_STRIDE = 320  # 20 ms
MFCC_FFT = 512
MFCC_FRAMES = 1 + (CLIP_SAMPLES - MFCC_WINDOW) // MFCC_STRIDE  # 49
MFCC_MEL_BINS = 40
MFCC_LOW_HZ = 20.0
MFCC_HIGH_HZ = 4000.0
MFCC_COEFFICIENTS = 10
MFCC_LOG_FLOOR = 1e-6
# Fixed scaling of every MFCC, in training and on the device alike: features = mfcc / MFCC_SCALE.
# Speech then spans about [-6, 2] in c0 (log energy) and [-1.5, 1.5] in the others; digital
# silence bottoms out at log(1e-6) * sqrt(40) / 10 = -8.7. A constant rather than train-split
# statistics, so that a device front end needs nothing but this number.
MFCC_SCALE = 10.0


def _mel_weights() -> np.ndarray:
    """(257, 40) triangular HTK-mel filterbank, laid out like tf.signal.linear_to_mel_weight_matrix."""

    def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)

    bins = MFCC_FFT // 2 + 1
    # The DC bin carries no speech and is zeroed, as in the TF op the MLPerf front end uses.
    bin_mels = hz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, bins)[1:])[:, None]
    edges = np.linspace(hz_to_mel(MFCC_LOW_HZ), hz_to_mel(MFCC_HIGH_HZ), MFCC_MEL_BINS + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bin_mels - lower) / (center - lower)
    falling = (upper - bin_mels) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights = np.vstack([np.zeros((1, MFCC_MEL_BINS)), weights])
    weights.setflags(write=False)
    return weights


_MEL_WEIGHTS = _mel_weights()
# Periodic Hann, as tf.signal.stft uses.
_HANN_480 = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(MFCC_WINDOW) / MFCC_WINDOW)
_HANN_480.setflags(write=False)


def mfcc_features(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The keywords front end: audio -> scaled (49, 10) MFCC, float32.

    `audio` is mono, float in [-1, 1] or int16 PCM; 1-D for one clip or 2-D (clips, samples) for a
    batch (then the result is (clips, 49, 10)). Other sample rates are resampled to 16 kHz; the
    clip is then zero-padded or trimmed at the end to exactly 1 s.
    """
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2):
        raise DatasetError(f"mfcc_features expects 1-D or 2-D audio, got shape {audio.shape}")
    single = audio.ndim == 1
    batch = audio[None, :] if single else audio
    if np.issubdtype(batch.dtype, np.integer):
        batch = batch.astype(np.float64) / 32768.0
    else:
        batch = batch.astype(np.float64)
    if sample_rate <= 0:
        raise DatasetError(f"sample rate must be positive, got {sample_rate}")
    batch = fit_to_clip(to_sample_rate(batch, int(sample_rate)))
    # In blocks: the framed spectra take ~0.6 MB per clip.
    scaled = np.concatenate(
        [_mfcc_block(batch[start : start + _MFCC_BLOCK]) for start in range(0, len(batch), _MFCC_BLOCK)]
    )
    return scaled[0] if single else scaled


_MFCC_BLOCK = 256


def _mfcc_block(clips: np.ndarray) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(clips, MFCC_WINDOW, axis=1)
    frames = windows[:, ::MFCC_STRIDE][:, :MFCC_FRAMES]
    magnitude = np.abs(np.fft.rfft(frames * _HANN_480, n=MFCC_FFT, axis=-1))
    log_mel = np.log(magnitude @ _MEL_WEIGHTS + MFCC_LOG_FLOOR)
    mfcc = scipy.fft.dct(log_mel, type=2, norm="ortho", axis=-1)[..., :MFCC_COEFFICIENTS]
    return (mfcc / MFCC_SCALE).astype(np.float32)


def fit_to_clip(batch: np.ndarray) -> np.ndarray:
    if batch.shape[1] >= CLIP_SAMPLES:
        return batch[:, :CLIP_SAMPLES]
    return np.pad(batch, ((0, 0), (0, CLIP_SAMPLES - batch.shape[1])))


# --------------------------------------------------------------------------------------------
# keywords: formant synthesizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Phone:
    """Targets of one phone for an adult male vocal tract; speakers scale the formants."""

    formants: tuple[float, float, float, float]
    bandwidths: tuple[float, float, float, float]
    duration_ms: float
    voicing: float = 0.0  # glottal source amplitude into the formant cascade
    aspiration: float = 0.0  # noise into the formant cascade (breathy /h/, stop release)
    frication: float = 0.0  # noise into the parallel frication resonator
    frication_hz: float = 4000.0
    frication_bandwidth_hz: float = 2000.0


_VOWEL_BW = (60.0, 90.0, 150.0, 200.0)
_NASAL_BW = (100.0, 300.0, 400.0, 450.0)
_NEUTRAL = (500.0, 1500.0, 2500.0, 3500.0)


def _vowel(
    f1: float, f2: float, f3: float, f4: float = 3500.0, ms: float = 130.0, voicing: float = 1.0
) -> _Phone:
    return _Phone((f1, f2, f3, f4), _VOWEL_BW, ms, voicing=voicing)


# Formant targets after Peterson & Barney / Hillenbrand (adult male). Diphthongs are two phones in
# a row; the track smoothing turns them into a glide.
_PHONES: Mapping[str, _Phone] = types.MappingProxyType(
    {
        "i": _vowel(270, 2290, 3010, 3700, voicing=0.9),
        "ɪ": _vowel(390, 1990, 2550, 3600, ms=90),
        "ɛ": _vowel(530, 1840, 2480),
        "æ": _vowel(660, 1720, 2410),
        "ʌ": _vowel(620, 1220, 2550, ms=110),
        "ɑ": _vowel(730, 1090, 2440, ms=150),
        "ɔ": _vowel(570, 840, 2410, 3400, ms=150),
        "o": _vowel(500, 900, 2400, 3400, ms=110),
        "ʊ": _vowel(400, 1000, 2300, 3400, ms=110, voicing=0.85),
        "a": _vowel(750, 1300, 2500, ms=120),
        "u": _vowel(300, 870, 2240, 3400, voicing=0.85),
        "j": _Phone((260, 2250, 3000, 3700), _VOWEL_BW, 60, voicing=0.6),
        "w": _Phone((300, 650, 2200, 3400), _VOWEL_BW, 60, voicing=0.6),
        "l": _Phone((360, 1200, 2700, 3500), _VOWEL_BW, 70, voicing=0.6),
        "ɹ": _Phone((320, 1100, 1450, 3300), _VOWEL_BW, 70, voicing=0.6),
        # Nasal murmur: low first resonance, damped upper ones, quiet (the nasal zero is omitted).
        "n": _Phone((250, 1700, 2600, 3500), _NASAL_BW, 75, voicing=0.35),
        "s": _Phone(_NEUTRAL, _VOWEL_BW, 130, frication=0.5, frication_hz=5500, frication_bandwidth_hz=2500),
        "f": _Phone(_NEUTRAL, _VOWEL_BW, 110, frication=0.15, frication_hz=4000, frication_bandwidth_hz=6000),
        "h": _Phone(_NEUTRAL, _VOWEL_BW, 40, aspiration=0.3),
        # Stops: a closure, then a short burst whose spectrum marks the place of articulation.
        "closure": _Phone(_NEUTRAL, _VOWEL_BW, 50),
        "voice_bar": _Phone((150, 1500, 2500, 3500), _NASAL_BW, 40, voicing=0.08),
        "t": _Phone(_NEUTRAL, _VOWEL_BW, 12, frication=0.6, frication_hz=4000, frication_bandwidth_hz=3000),
        "d": _Phone(_NEUTRAL, _VOWEL_BW, 10, frication=0.4, frication_hz=3500, frication_bandwidth_hz=3000),
        "p": _Phone(_NEUTRAL, _VOWEL_BW, 12, frication=0.4, frication_hz=800, frication_bandwidth_hz=2000),
        "g": _Phone(_NEUTRAL, _VOWEL_BW, 15, frication=0.5, frication_hz=2000, frication_bandwidth_hz=800),
    }
)

# The ten MLPerf Tiny / Speech Commands keywords.
_WORDS: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {
        "yes": ("j", "ɛ", "s"),
        "no": ("n", "o", "ʊ"),
        "up": ("ʌ", "closure", "p", "h"),
        "down": ("voice_bar", "d", "a", "ʊ", "n"),
        "left": ("l", "ɛ", "f", "closure", "t"),
        "right": ("ɹ", "a", "ɪ", "closure", "t"),
        "on": ("ɑ", "n"),
        "off": ("ɔ", "f"),
        "stop": ("s", "closure", "t", "h", "ɑ", "closure", "p"),
        "go": ("voice_bar", "g", "o", "ʊ"),
    }
)
KEYWORD_WORDS: tuple[str, ...] = tuple(_WORDS)
SILENCE_LABEL = "silence"

_CONTROL_HOP = 80  # synthesizer parameters change every 5 ms
_CHUNK_CLIPS = 256  # clips made together: vectorized enough, and peak memory stays ~250 MB
_MALE_F0 = (85.0, 155.0)
_FEMALE_F0 = (165.0, 255.0)
_SNR_DB = (-10.0, 30.0)
_SPEECH_RMS_DB = (-35.0, -12.0)
_SILENCE_RMS_DB = (-80.0, -30.0)
_RT60_S = (0.1, 0.6)


def _smooth(track: np.ndarray, width: int) -> np.ndarray:
    """Moving Hann average along the last axis: targets become coarticulated transitions."""
    if width <= 1:
        return track
    kernel = np.hanning(width + 2)[1:-1]
    return scipy.ndimage.convolve1d(track, kernel / kernel.sum(), axis=-1, mode="nearest")


@dataclass(frozen=True)
class _Utterance:
    """Control tracks (one value per 5 ms frame) for one spoken word."""

    formants: np.ndarray  # (4, frames)
    bandwidths: np.ndarray  # (4, frames)
    voicing: np.ndarray
    aspiration: np.ndarray
    frication: np.ndarray
    frication_hz: np.ndarray
    frication_bandwidth_hz: np.ndarray
    f0: np.ndarray
    tilt: float  # glottal low-pass pole: breathier voices have a steeper spectral tilt


def _plan_utterance(word: str, rng: np.random.Generator) -> _Utterance:
    female = rng.random() < 0.5
    # Vocal tract length sets a speaker-wide formant scale; women's tracts are ~15% shorter.
    tract_scale = rng.normal(1.17 if female else 1.0, 0.05)
    f0_base = rng.uniform(*(_FEMALE_F0 if female else _MALE_F0))
    rate = rng.uniform(0.9, 1.6)  # duration multiplier; isolated keywords are said slowly
    bandwidth_scale = rng.uniform(0.8, 1.4)
    phones = [_PHONES[p] for p in _WORDS[word]]
    frame_ms = 1000.0 * _CONTROL_HOP / SAMPLE_RATE
    durations = []
    for index, phone in enumerate(phones):
        lengthen = 1.3 if index == len(phones) - 1 else 1.0  # phrase-final lengthening
        ms = phone.duration_ms * rate * lengthen * rng.uniform(0.85, 1.15)
        durations.append(max(1, round(ms / frame_ms)))
    lead, tail = 2, 6  # let amplitude ramps start and die out inside the utterance
    frames = lead + sum(durations) + tail
    per_phone_formant_jitter = rng.normal(1.0, 0.04, size=(len(phones), 4))

    def step(values: Sequence[object], lead_value: object, tail_value: object) -> np.ndarray:
        """Piecewise-constant track: lead frames, each phone's value for its duration, tail frames."""
        pieces = [(lead_value, lead), *zip(values, durations, strict=True), (tail_value, tail)]
        return np.concatenate(
            [np.repeat(np.asarray(v, dtype=np.float64)[..., None], n, axis=-1) for v, n in pieces], axis=-1
        )

    formant_targets = [
        np.asarray(p.formants) * tract_scale * j
        for p, j in zip(phones, per_phone_formant_jitter, strict=True)
    ]
    # Smoothing over ~40 ms turns the step targets into formant transitions (coarticulation).
    formants = _smooth(step(formant_targets, formant_targets[0], formant_targets[-1]), 8)
    bandwidth_targets = [np.asarray(p.bandwidths) * bandwidth_scale for p in phones]
    bandwidths = _smooth(step(bandwidth_targets, bandwidth_targets[0], bandwidth_targets[-1]), 4)
    # Keep formants ordered and below Nyquist after scaling and jitter.
    formants = np.minimum(np.maximum.accumulate(formants, axis=0), 7000.0)

    def amplitude(attr: str) -> np.ndarray:
        return _smooth(step([getattr(p, attr) for p in phones], 0.0, 0.0), 3)

    voicing = amplitude("voicing") * rng.uniform(0.9, 1.1)
    aspiration = amplitude("aspiration")
    frication = amplitude("frication") * rng.uniform(0.6, 1.4)
    fric_hz_targets = [p.frication_hz for p in phones]
    fric_hz = step(fric_hz_targets, fric_hz_targets[0], fric_hz_targets[-1])
    fric_hz = np.minimum(fric_hz * rng.uniform(0.9, 1.1) * math.sqrt(tract_scale), 7200.0)
    fric_bw_targets = [p.frication_bandwidth_hz for p in phones]
    fric_bw = step(fric_bw_targets, fric_bw_targets[0], fric_bw_targets[-1])

    # Pitch: a random rise or fall across the word plus slow wander and cycle-to-cycle jitter.
    position = np.linspace(0.0, 1.0, frames)
    contour = 1.0 + rng.uniform(-0.25, 0.15) * position + 0.08 * rng.uniform(-1, 1)
    wander = _smooth(rng.normal(0.0, 0.03, frames)[None, :], 10)[0]
    jitter = rng.normal(0.0, 0.012, frames)
    f0 = f0_base * contour * (1.0 + wander + jitter)
    return _Utterance(
        formants=formants,
        bandwidths=bandwidths,
        voicing=voicing,
        aspiration=aspiration,
        frication=frication,
        frication_hz=fric_hz,
        frication_bandwidth_hz=fric_bw,
        f0=np.clip(f0, 60.0, 400.0),
        tilt=rng.uniform(0.90, 0.975),
    )


def _resonator(freq: np.ndarray, bandwidth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Klatt two-pole resonator y = a*x + b*y[-1] + c*y[-2], unity gain at DC."""
    t = 1.0 / SAMPLE_RATE
    c = -np.exp(-2.0 * np.pi * bandwidth * t)
    b = 2.0 * np.exp(-np.pi * bandwidth * t) * np.cos(2.0 * np.pi * freq * t)
    a = 1.0 - b - c
    return a, b, c


def _render_chunk(utterances: Sequence[_Utterance], rng: np.random.Generator) -> list[np.ndarray]:
    """Render utterances together (the per-sample loop runs once for the whole chunk)."""
    count = len(utterances)
    frames = max(u.voicing.shape[0] for u in utterances)
    samples = frames * _CONTROL_HOP

    def padded(get: Callable[[_Utterance], np.ndarray], fill_last: bool) -> np.ndarray:
        out = np.zeros((count, *get(utterances[0]).shape[:-1], frames))
        for i, u in enumerate(utterances):
            track = get(u)
            out[i, ..., : track.shape[-1]] = track
            if fill_last:
                out[i, ..., track.shape[-1] :] = track[..., -1:]
        return out

    formants = padded(lambda u: u.formants, True)  # (count, 4, frames)
    bandwidths = padded(lambda u: u.bandwidths, True)
    fric_hz = padded(lambda u: u.frication_hz, True)
    fric_bw = padded(lambda u: u.frication_bandwidth_hz, True)
    f0 = padded(lambda u: u.f0, True)
    voicing = padded(lambda u: u.voicing, False)
    aspiration = padded(lambda u: u.aspiration, False)
    frication = padded(lambda u: u.frication, False)

    def to_samples(track: np.ndarray) -> np.ndarray:
        return np.repeat(track, _CONTROL_HOP, axis=-1)

    # Glottal source: one impulse per pitch period (phase accumulator), shimmer on each pulse,
    # a two-pole low-pass for the glottal flow and a first difference for lip radiation.
    phase = np.cumsum(to_samples(f0) / SAMPLE_RATE, axis=1)
    phase += rng.random((count, 1))
    pulses = np.diff(np.floor(phase), axis=1, prepend=np.floor(phase[:, :1])).astype(np.float64)
    pulses *= 1.0 + 0.1 * rng.standard_normal(pulses.shape)
    source = np.empty_like(pulses)
    for i, u in enumerate(utterances):
        flow = scipy.signal.lfilter([1.0], [1.0, -2.0 * u.tilt, u.tilt * u.tilt], pulses[i])
        source[i] = np.diff(flow, prepend=0.0)
    source /= np.sqrt(np.mean(source**2, axis=1, keepdims=True)) + 1e-12
    cascade_input = source * to_samples(voicing)
    cascade_input += rng.standard_normal((count, samples)) * to_samples(aspiration) * 3.0
    frication_input = rng.standard_normal((count, samples)) * to_samples(frication)

    # Four cascaded formant resonators plus one parallel frication resonator, all time-varying.
    a = np.empty((count, frames, 5))
    b = np.empty_like(a)
    c = np.empty_like(a)
    a[:, :, :4], b[:, :, :4], c[:, :, :4] = _resonator(
        formants.transpose(0, 2, 1), bandwidths.transpose(0, 2, 1)
    )
    fa, fb, fc = _resonator(fric_hz, fric_bw)
    # The frication resonator is normalized to unity gain at its centre so `frication` sets its level.
    z = np.exp(-2j * np.pi * fric_hz / SAMPLE_RATE)
    peak = np.abs(fa / (1.0 - fb * z - fc * z * z))
    a[:, :, 4], b[:, :, 4], c[:, :, 4] = fa / peak, fb, fc

    # The stages are pipelined by one sample (stage k reads stage k-1's previous output) so all five
    # update in one vector operation; one sample of delay per stage is inaudible.
    y1 = np.zeros((count, 5))
    y2 = np.zeros((count, 5))
    x = np.zeros((count, 5))
    voiced_out = np.empty((samples, count))
    fric_out = np.empty((samples, count))
    cascade_t = np.ascontiguousarray(cascade_input.T)
    frication_t = np.ascontiguousarray(frication_input.T)
    for frame in range(frames):
        gain, feedback1, feedback2 = a[:, frame], b[:, frame], c[:, frame]
        for n in range(frame * _CONTROL_HOP, (frame + 1) * _CONTROL_HOP):
            x[:, 0] = cascade_t[n]
            x[:, 1:4] = y1[:, 0:3]
            x[:, 4] = frication_t[n]
            y = gain * x + feedback1 * y1 + feedback2 * y2
            y2 = y1
            y1 = y
            voiced_out[n] = y[:, 3]
            fric_out[n] = y[:, 4]

    clips = []
    for i, u in enumerate(utterances):
        length = u.voicing.shape[0] * _CONTROL_HOP
        voiced = voiced_out[:length, i]
        level = np.sqrt(np.mean(voiced**2))
        # A purely unvoiced word cannot happen with the word table, but stay finite regardless.
        voiced = voiced / level if level > 0 else voiced
        clips.append(voiced + fric_out[:length, i])
    return clips


def _background_noise(count: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS 1 s noise beds: 1/f^alpha colour (white to brown), sometimes mains hum."""
    white = rng.standard_normal((count, CLIP_SAMPLES))
    spectrum = np.fft.rfft(white, axis=1)
    freqs = np.maximum(np.fft.rfftfreq(CLIP_SAMPLES, 1.0 / SAMPLE_RATE), 20.0)
    alpha = rng.uniform(0.0, 2.0, size=(count, 1))
    noise = np.fft.irfft(spectrum * freqs ** (-alpha / 2.0), n=CLIP_SAMPLES, axis=1)
    noise /= np.sqrt(np.mean(noise**2, axis=1, keepdims=True))
    hummed = np.flatnonzero(rng.random(count) < 0.3)
    t = np.arange(CLIP_SAMPLES) / SAMPLE_RATE
    mains = rng.choice([50.0, 60.0], size=(len(hummed), 1))
    level = rng.uniform(0.2, 1.0, size=(len(hummed), 1))
    for harmonic in (1, 2, 3):
        phase = rng.uniform(0, 2 * np.pi, size=(len(hummed), 1))
        noise[hummed] += level / harmonic * np.sin(2 * np.pi * harmonic * mains * t + phase)
    return noise / np.sqrt(np.mean(noise**2, axis=1, keepdims=True))


def _reverberate(speech: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Convolve each clip with a random room: direct path plus an exponentially decaying tail."""
    rir_samples = SAMPLE_RATE // 2
    t = np.arange(rir_samples) / SAMPLE_RATE
    rt60 = rng.uniform(*_RT60_S, size=(len(speech), 1))
    # A dry fraction of the clips keeps close-talking recordings in the mix.
    direct_to_reverb_db = np.where(
        rng.random((len(speech), 1)) < 0.3, np.inf, rng.uniform(0.0, 15.0, size=(len(speech), 1))
    )
    tail = rng.standard_normal((len(speech), rir_samples)) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
    tail[:, :16] = 0.0  # first reflections arrive after ~1 ms
    tail /= np.sqrt(np.sum(tail**2, axis=1, keepdims=True))
    rir = tail * 10 ** (-direct_to_reverb_db / 20)
    rir[:, 0] += 1.0
    size = scipy.fft.next_fast_len(CLIP_SAMPLES + rir_samples)
    wet = np.fft.irfft(np.fft.rfft(speech, size, axis=1) * np.fft.rfft(rir, size, axis=1), size, axis=1)
    return wet[:, :CLIP_SAMPLES]


def _microphone(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Colour each clip with a random smooth frequency response (about +-6 dB), like cheap mics."""
    freqs = np.fft.rfftfreq(CLIP_SAMPLES, 1.0 / SAMPLE_RATE)
    anchors_hz = np.geomspace(50.0, SAMPLE_RATE / 2, 7)
    anchor_db = rng.normal(0.0, 6.0, size=(len(audio), len(anchors_hz)))
    log_freqs = np.log(np.maximum(freqs, anchors_hz[0]))
    response_db = np.stack([np.interp(log_freqs, np.log(anchors_hz), row) for row in anchor_db])
    return np.fft.irfft(np.fft.rfft(audio, axis=1) * 10 ** (response_db / 20), CLIP_SAMPLES, axis=1)


def _synthesize_keywords(words: Sequence[str], per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scaled MFCC features (clips, 49, 10) and int labels; labels index words, then silence."""
    rng = rng_for(seed, "keywords/synthetic")
    classes = np.repeat(np.arange(len(words) + 1), per_class)
    rng.shuffle(classes)
    # Clips are made and reduced to features a chunk at a time so memory stays bounded at any size.
    features = [
        mfcc_features(synthesize_clips(words, classes[start : start + _CHUNK_CLIPS], rng))
        for start in range(0, len(classes), _CHUNK_CLIPS)
    ]
    return np.concatenate(features), classes


def synthesize_clips(words: Sequence[str], classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(clips, 16000) audio for the given labels: a word in noise, or noise alone for silence."""
    noise = _background_noise(len(classes), rng)
    audio = np.empty((len(classes), CLIP_SAMPLES))
    speech_rows = np.flatnonzero(classes < len(words))
    silence_rows = np.flatnonzero(classes == len(words))

    utterances = [_plan_utterance(words[classes[row]], rng) for row in speech_rows]
    dry = np.zeros((len(speech_rows), CLIP_SAMPLES))
    noise_rms = np.empty((len(speech_rows), 1))
    for index, clip in enumerate(_render_chunk(utterances, rng) if utterances else []):
        clip = clip[:CLIP_SAMPLES]
        speech_rms = 10 ** (rng.uniform(*_SPEECH_RMS_DB) / 20)
        clip = clip * (speech_rms / np.sqrt(np.mean(clip**2)))
        # Speech Commands clips are cut by a 1 s window, which sometimes clips the word's start or
        # end; onsets may put up to 15% of the word outside the clip.
        overhang = int(0.15 * len(clip))
        onset = rng.integers(-overhang, CLIP_SAMPLES - len(clip) + overhang + 1)
        lo, hi = max(onset, 0), min(onset + len(clip), CLIP_SAMPLES)
        dry[index, lo:hi] = clip[lo - onset : hi - onset]
        noise_rms[index] = speech_rms / 10 ** (rng.uniform(*_SNR_DB) / 20)
    audio[speech_rows] = _reverberate(dry, rng) + noise[speech_rows] * noise_rms
    silence_rms = 10 ** (rng.uniform(*_SILENCE_RMS_DB, size=(len(silence_rows), 1)) / 20)
    audio[silence_rows] = noise[silence_rows] * silence_rms
    return np.clip(_microphone(audio, rng), -1.0, 1.0)


# --------------------------------------------------------------------------------------------
# keywords: Speech Commands directory
# --------------------------------------------------------------------------------------------

BACKGROUND_DIR = "_background_noise_"
_SILENCE_GAIN = (0.0, 0.1)  # the TF speech_commands recipe's background volume range


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    try:
        with wave.open(str(path), "rb") as handle:
            channels, width, rate = handle.getnchannels(), handle.getsampwidth(), handle.getframerate()
            raw = handle.readframes(handle.getnframes())
    except (wave.Error, EOFError, OSError) as error:
        raise DatasetError(f"cannot read WAV file: {error}", where=str(path)) from error
    if channels != 1 or width != 2:
        raise DatasetError(
            f"expected 16-bit PCM mono, got {channels} channel(s) of {8 * width}-bit samples", where=str(path)
        )
    return np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0, rate


def to_sample_rate(samples: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return samples
    divisor = math.gcd(SAMPLE_RATE, rate)
    return scipy.signal.resample_poly(samples, SAMPLE_RATE // divisor, rate // divisor, axis=-1)


def _read_clip(path: Path) -> np.ndarray:
    return fit_to_clip(to_sample_rate(*read_wav(path))[None, :])[0]


def _speaker(path: Path) -> str:
    # Speech Commands names files <speaker hash>_nohash_<n>.wav; all clips of one speaker, of any
    # word, stay on one side of the split (as in the data set's own lists), or the test score
    # partly measures recognizing voices already heard in training.
    return path.stem.split("_nohash_")[0]


def _load_speech_commands(
    root: Path, words: Sequence[str], per_class: int, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not root.is_dir():
        raise DatasetError(f"Speech Commands directory not found: {root}", where=where)
    rng = rng_for(seed, "keywords/speech_commands")
    audio: list[np.ndarray] = []
    classes: list[int] = []
    groups: list[str] = []
    for index, word in enumerate(words):
        folder = root / word
        files = sorted(folder.glob("*.wav")) if folder.is_dir() else []
        if not files:
            # What else the directory holds stays out of the message: errors reach logs and
            # results.json, and a suite's path may name any directory the user can read.
            raise DatasetError(
                f"no WAV files for word {word!r} in {folder} (the Speech Commands layout has "
                f"<path>/<word>/*.wav for every word)",
                where=where,
            )
        if 0 < per_class < len(files):
            files = [files[i] for i in sorted(rng.choice(len(files), per_class, replace=False))]
        for path in files:
            audio.append(_read_clip(path))
            classes.append(index)
            groups.append(_speaker(path))
    # As many silence clips as the largest word class, which already respects the cap.
    silence_count = max(classes.count(i) for i in range(len(words)))

    background_dir = root / BACKGROUND_DIR
    bed_files = sorted(background_dir.glob("*.wav")) if background_dir.is_dir() else []
    beds = [bed for bed in (to_sample_rate(*read_wav(p)) for p in bed_files) if len(bed) >= CLIP_SAMPLES]
    if not beds:
        raise DatasetError(
            f"the silence class needs WAV files of at least 1 s in {background_dir}", where=where
        )
    for n in range(silence_count):
        bed = beds[rng.integers(len(beds))]
        offset = rng.integers(0, len(bed) - CLIP_SAMPLES + 1)
        audio.append(bed[offset : offset + CLIP_SAMPLES] * rng.uniform(*_SILENCE_GAIN))
        classes.append(len(words))
        groups.append(f"{BACKGROUND_DIR}/{n}")
    return np.stack(audio), np.asarray(classes, dtype=np.int64), np.asarray(groups)


def _grouped_split(
    features: np.ndarray,
    classes: np.ndarray,
    groups: np.ndarray,
    labels: Sequence[str],
    seed: int,
    where: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    folds = round(1 / TEST_FRACTION)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_rows, test_rows = next(splitter.split(features, classes, groups))
    for index, label in enumerate(labels):
        if not (np.any(classes[train_rows] == index) and np.any(classes[test_rows] == index)):
            raise DatasetError(
                f"class {label!r} has too few speakers to appear in both the train and the test split",
                where=where,
            )
    # The fold comes out grouped by speaker; shuffle so any prefix of the test set is mixed.
    rng = rng_for(seed, "keywords/speech_commands/order")
    train_rows, test_rows = rng.permutation(train_rows), rng.permutation(test_rows)
    return features[train_rows], classes[train_rows], features[test_rows], classes[test_rows]


# --------------------------------------------------------------------------------------------
# keywords loader
# --------------------------------------------------------------------------------------------


def _parse_words(text: str, where: str, synthetic: bool) -> tuple[str, ...]:
    words = tuple(w.strip() for w in text.split(",") if w.strip())
    if not words:
        raise DatasetError("option 'words' names no word", where=where)
    if len(set(words)) != len(words):
        raise DatasetError(f"option 'words' repeats a word: {text!r}", where=where)
    if SILENCE_LABEL in words:
        raise DatasetError(f"option 'words': {SILENCE_LABEL!r} is always added, do not list it", where=where)
    if synthetic:
        unknown = [w for w in words if w not in _WORDS]
        if unknown:
            raise DatasetError(
                f"option 'words': the synthesizer cannot say {unknown[0]!r}; it knows {', '.join(_WORDS)}",
                where=where,
            )
    return words


def load_keywords(options: Mapping[str, object], seed: int, base_dir: Path) -> Dataset:
    where = "dataset 'keywords'"
    source = str(options["source"])
    if source not in ("synthetic", "speech_commands"):
        raise DatasetError(
            f"option 'source' must be 'synthetic' or 'speech_commands', got {source!r}", where=where
        )
    words = _parse_words(str(options["words"]), where, synthetic=source == "synthetic")
    # A directory has a natural size, so 0 ("all clips") only makes sense there.
    per_class = cap_option(options, where, allow_all=source == "speech_commands")
    labels = (*words, SILENCE_LABEL)
    if source == "synthetic":
        features, classes = _synthesize_keywords(words, per_class, seed)
        features = features[..., None]
        description = (
            f"generated: formant-synthesized {', '.join(words)} + noise-only silence, 16 kHz, seed {seed}"
        )
        return stratified_split("keywords", features, classes, labels, "multiclass", description, seed)
    if not str(options["path"]):
        raise DatasetError("option 'path' is required when source is 'speech_commands'", where=where)
    root = resolve_path(str(options["path"]), base_dir)
    audio, classes, groups = _load_speech_commands(root, words, per_class, seed, where)
    features = mfcc_features(audio)[..., None]
    x_train, y_train, x_test, y_test = _grouped_split(features, classes, groups, labels, seed, where)
    return Dataset(
        name="keywords",
        x_train=frozen(x_train, np.float32),
        y_train=frozen(y_train, np.int64),
        x_test=frozen(x_test, np.float32),
        y_test=frozen(y_test, np.int64),
        labels=labels,
        task="multiclass",
        source=f"real: Speech Commands clips from {root}, split by speaker",
    )
