"""vibration: a simulated bearing accelerometer and its log-FFT front end."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from .base import Dataset, cap_option, rng_for, stratified_split

VIBRATION_RATE = 1000.0  # Hz, accelerometer sampling
VIBRATION_WINDOW = 256
VIBRATION_BINS = 128
# Fixed scaling of log1p(|rfft|) so features sit roughly in [0, 1.5] for any machine.
VIBRATION_SCALE = 4.0
VIBRATION_LABELS = ("normal", "fault")


@dataclass(frozen=True)
class _Bearing:
    balls: int
    ball_mm: float
    pitch_mm: float
    contact_deg: float

    def defect_orders(self) -> tuple[float, float]:
        """(BPFO, BPFI) as multiples of shaft speed."""
        ratio = self.ball_mm / self.pitch_mm * math.cos(math.radians(self.contact_deg))
        return self.balls / 2 * (1 - ratio), self.balls / 2 * (1 + ratio)


# Deep-groove 6203/6205/6206 and an angular-contact 7205: enough spread that the defect
# frequencies are not one fixed multiple of shaft speed.
_BEARINGS = (
    _Bearing(8, 6.75, 28.5, 0.0),
    _Bearing(9, 7.94, 39.04, 0.0),
    _Bearing(9, 9.53, 46.0, 0.0),
    _Bearing(12, 7.5, 38.5, 25.0),
)
_SHAFT_HZ = (15.0, 45.0)
_RESONANCE_HZ = (250.0, 400.0)
# Broadband forcing that rings the structural resonance on every machine, and the peak
# acceleration of one defect impact at fault_severity 1; log-uniform ranges. The overlap between
# weak impacts and strong forcing is what keeps the task from being trivially separable.
_FORCING_G = (0.01, 0.1)
_IMPACT_G = (0.2, 2.0)


def vibration_features(signal: np.ndarray) -> np.ndarray:
    """The vibration front end: 256 accelerometer samples (g) -> 128 scaled log-magnitude bins.

    Hann window, |rfft|, bins 0..127 (DC..496 Hz in 3.9 Hz steps), log1p, / VIBRATION_SCALE.
    1-D input gives (128,); 2-D (windows, 256) gives (windows, 128). float32.
    """
    signal = np.asarray(signal, dtype=np.float64)
    if signal.shape[-1] != VIBRATION_WINDOW or signal.ndim not in (1, 2):
        raise DatasetError(
            f"vibration_features expects (..., {VIBRATION_WINDOW}) samples, got {signal.shape}"
        )
    window = np.hanning(VIBRATION_WINDOW + 1)[:-1]
    magnitude = np.abs(np.fft.rfft(signal * window, axis=-1))[..., :VIBRATION_BINS]
    return (np.log1p(magnitude) / VIBRATION_SCALE).astype(np.float32)


def simulate_vibration(faulty: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """(windows, 256) accelerometer signals in g for the given fault flags."""
    count = len(faulty)
    t = np.arange(VIBRATION_WINDOW) / VIBRATION_RATE
    col = (count, 1)
    shaft = rng.uniform(*_SHAFT_HZ, size=col)
    shaft_phase = rng.uniform(0, 2 * np.pi, size=col)

    # Imbalance (1x), misalignment (2x) and looseness (3x) harmonics.
    imbalance = 10 ** rng.uniform(np.log10(0.05), np.log10(0.5), size=col)
    signal = imbalance * np.sin(2 * np.pi * shaft * t + shaft_phase)
    for order, relative in ((2, (0.1, 0.6)), (3, (0.05, 0.3))):
        signal += (
            imbalance
            * rng.uniform(*relative, size=col)
            * np.sin(2 * np.pi * order * shaft * t + rng.uniform(0, 2 * np.pi, size=col))
        )

    # Gear mesh at teeth x shaft speed with shaft-rate sidebands; <= 10 teeth keeps it below Nyquist.
    teeth = rng.integers(5, 11, size=col)
    mesh = teeth * shaft
    mesh_level = 10 ** rng.uniform(np.log10(0.02), np.log10(0.3), size=col)
    sideband = rng.uniform(0.0, 0.4, size=col)
    mesh_phase = rng.uniform(0, 2 * np.pi, size=col)
    signal += (
        mesh_level
        * np.sin(2 * np.pi * mesh * t + mesh_phase)
        * (1 + sideband * np.cos(2 * np.pi * shaft * t + shaft_phase))
    )

    # Structural resonance, rung by broadband forcing on every machine (so energy near the
    # resonance alone does not reveal a fault) and by the defect impacts on faulty ones.
    resonance = rng.uniform(*_RESONANCE_HZ, size=col)
    damping = rng.uniform(0.02, 0.08, size=col)
    omega = 2 * np.pi * resonance
    omega_damped = omega * np.sqrt(1 - damping**2)

    forcing_level = 10 ** rng.uniform(*np.log10(_FORCING_G), size=col)
    # 160 samples is 5 decay time constants at the lightest damping; forcing starts that early so
    # the window sees the steady state.
    ring = 160
    forcing = rng.standard_normal((count, VIBRATION_WINDOW + ring)) * forcing_level
    kernel_t = np.arange(ring) / VIBRATION_RATE
    kernels = np.exp(-damping * omega * kernel_t) * np.sin(omega_damped * kernel_t)
    for i in range(count):
        signal[i] += np.convolve(forcing[i], kernels[i])[ring : ring + VIBRATION_WINDOW]

    # Bearing defect impacts. Outer race: fixed load zone, steady impacts at BPFO. Inner race:
    # the defect rotates through the load zone, so impacts at BPFI are modulated at shaft speed.
    rows = np.flatnonzero(faulty)
    if len(rows):
        orders = np.array([b.defect_orders() for b in _BEARINGS])
        bearing = rng.integers(len(_BEARINGS), size=len(rows))
        inner = rng.random(len(rows)) < 0.5
        defect_hz = orders[bearing, inner.astype(int)] * shaft[rows, 0]
        amplitude = severity * 10 ** rng.uniform(*np.log10(_IMPACT_G), size=len(rows))
        period = 1.0 / defect_hz
        # Start early enough that ring-down from impacts before the window is included.
        lead_in = 0.16
        impacts = int(np.ceil((VIBRATION_WINDOW / VIBRATION_RATE + lead_in) * defect_hz.max())) + 2
        k = np.arange(impacts)
        start = -lead_in - rng.uniform(0, 1, size=(len(rows), 1)) * period[:, None]
        # Rolling elements slip, so impacts wander by ~1% of a period around the ideal train.
        times = start + k * period[:, None] + rng.normal(0, 0.01, (len(rows), impacts)) * period[:, None]
        strength = amplitude[:, None] * rng.uniform(0.8, 1.2, (len(rows), impacts))
        load_zone = 0.5 * (1 + np.cos(2 * np.pi * shaft[rows] * times + shaft_phase[rows]))
        strength = np.where(inner[:, None], strength * load_zone, strength)
        delays = t[None, None, :] - times[:, :, None]
        damping_rows, omega_rows, omega_d_rows = damping[rows], omega[rows], omega_damped[rows]
        response = np.where(
            delays >= 0,
            np.exp(-damping_rows[:, :, None] * omega_rows[:, :, None] * np.maximum(delays, 0))
            * np.sin(omega_d_rows[:, :, None] * delays),
            0.0,
        )
        signal[rows] += np.einsum("ik,ikt->it", strength, response)

    noise_level = 10 ** rng.uniform(np.log10(0.02), np.log10(0.15), size=col)
    signal += noise_level * rng.standard_normal((count, VIBRATION_WINDOW))
    return signal


def load_vibration(options: Mapping[str, object], seed: int, base_dir: Path) -> Dataset:
    where = "dataset 'vibration'"
    per_class = cap_option(options, where, allow_all=False)
    severity = float(options["fault_severity"])  # type: ignore[arg-type]
    if not (severity >= 0 and math.isfinite(severity)):
        raise DatasetError(
            f"option 'fault_severity' must be a finite number >= 0, got {severity}", where=where
        )
    rng = rng_for(seed, "vibration")
    classes = np.repeat(np.arange(2), per_class)
    rng.shuffle(classes)
    signals = np.concatenate(
        [
            simulate_vibration(classes[start : start + 256] == 1, severity, rng)
            for start in range(0, len(classes), 256)
        ]
    )
    features = vibration_features(signals)
    description = (
        f"generated: simulated bearing accelerometer at 1 kHz, fault_severity {severity}, seed {seed}"
    )
    return stratified_split("vibration", features, classes, VIBRATION_LABELS, "binary", description, seed)
