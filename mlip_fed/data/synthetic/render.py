"""SynthCXR rendering: one exposure of one patient, its pixels and its masks.

Geometry is written in normalised body coordinates (``u`` right on the image, ``v`` down, both in
[0, 1]), so 64² and 224² images show the same patient. Patient right is image left (PA convention).
Rendering is vectorised numpy over the pixel grid; loops run over anatomical parts (ribs, line
segments), never over pixels. A difficulty tier changes how visible findings are, never what is drawn
from the exposure's random stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter

from mlip_fed.data.synthetic.findings import (
    DIFFICULTY_TIERS,
    MASK_CLASS_NAMES,
    MASK_INDEX,
    ZONE_OF_LOBE,
    DifficultyTier,
    Finding,
    difficulty_tier,
)
from mlip_fed.data.synthetic.sampling import PatientAnatomy, SiteProfile


@dataclass
class RenderedStudy:
    """Pixels and spatial truth of one study."""

    image: np.ndarray  # uint8 [S, S]
    label_mask: np.ndarray  # uint8 [S, S], 0 = background, k = MASK_CLASS_NAMES[k - 1]
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # kind → bool [S, S] (full, before overlap)
    bboxes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # kind → (x0, y0, x1, y1)


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pose:
    """Where the body sits in the image for one exposure."""

    scale: float
    shift_x: float
    shift_y: float
    rotation: float
    inspiration: float


def sample_pose(profile: SiteProfile, view: str, rng: np.random.Generator) -> Pose:
    jitter = profile.position_jitter
    return Pose(
        scale=profile.fov_scale * rng.uniform(0.95, 1.05) * (1.04 if view == "AP" else 1.0),
        shift_x=float(np.clip(rng.normal(0.0, jitter), -2.5 * jitter, 2.5 * jitter)),
        shift_y=float(np.clip(rng.normal(0.0, jitter), -2.5 * jitter, 2.5 * jitter)),
        rotation=float(np.clip(rng.normal(0.0, 0.03), -0.08, 0.08)),
        inspiration=float(rng.uniform(0.94, 1.05)),
    )


@lru_cache(maxsize=4)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float64) + 0.5) / size
    x, y = np.meshgrid(c, c)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _inside(signed_distance: np.ndarray, width: float) -> np.ndarray:
    """Soft indicator of ``signed_distance < 0`` with a linear edge ``2 * width`` wide (anti-aliasing)."""
    return np.clip(0.5 - signed_distance * (0.5 / width), 0.0, 1.0)


def _segment_distance(u: np.ndarray, v: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    t = np.clip(((u - p0[0]) * d[0] + (v - p0[1]) * d[1]) / max(float(d @ d), 1e-12), 0.0, 1.0)
    return np.hypot(u - (p0[0] + t * d[0]), v - (p0[1] + t * d[1]))


def _polyline_distance(u: np.ndarray, v: np.ndarray, points: np.ndarray) -> np.ndarray:
    dist = _segment_distance(u, v, points[0], points[1])
    for p0, p1 in zip(points[1:-1], points[2:], strict=True):
        dist = np.minimum(dist, _segment_distance(u, v, p0, p1))
    return dist


def _unit_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    field_ = gaussian_filter(rng.standard_normal((size, size)), sigma_px, mode="reflect")
    return field_ / max(float(field_.std()), 1e-8)


class _Body:
    """The pixel grid mapped into body coordinates, with the patient's fixed structures laid out."""

    def __init__(
        self,
        anatomy: PatientAnatomy,
        pose: Pose,
        size: int,
        view: str,
        findings: dict[str, Finding],
        tier: DifficultyTier = DIFFICULTY_TIERS["standard"],
    ):
        self.tier = tier
        x, y = _pixel_centres(size)
        rotation, shift_x, shift_y = (v * tier.pose for v in (pose.rotation, pose.shift_x, pose.shift_y))
        c, s = math.cos(rotation), math.sin(rotation)
        dx, dy = x - 0.5 - shift_x, y - 0.5 - shift_y
        self.u = 0.5 + (c * dx + s * dy) / pose.scale
        self.v = 0.5 + (-s * dx + c * dy) / pose.scale
        self.size = size
        self.px = 1.0 / (size * pose.scale)  # body units per pixel
        self.edge = 0.6 * self.px
        a = anatomy
        self.anatomy = a
        self.top = a.lung_top
        self.thorax = a.thorax_half_width
        mediastinum_factor = 1.0
        widened = findings.get("enlarged_cardiomediastinum")
        if widened is not None:
            mediastinum_factor = 1.4 + 0.35 * widened.severity_rank + (-0.12 if widened.hedged else 0.0)
            mediastinum_factor *= tier.scale("enlarged_cardiomediastinum").size
        self.med_hw = a.mediastinum_half_width
        self.med_factor = mediastinum_factor
        self.inner = a.mediastinum_half_width + 0.012
        self.domes = {"right": self.top + (a.dome_right - self.top) * pose.inspiration}
        self.domes["left"] = self.domes["right"] + (a.dome_left - a.dome_right)
        ctr = a.ctr
        cardiomegaly = findings.get("cardiomegaly")
        if cardiomegaly is not None:
            ctr = 0.53 + 0.12 * cardiomegaly.severity_rank + (-0.02 if cardiomegaly.hedged else 0.0)
            ctr += _shape_rng(cardiomegaly).uniform(0.0, 0.03)
            ctr *= tier.scale("cardiomegaly").size
        self.ctr = ctr * (1.07 if view == "AP" else 1.0)
        self.lung_fields: dict[str, np.ndarray] = {}
        self.lung_ellipses: dict[str, np.ndarray] = {}
        self.lung_radius: dict[str, np.ndarray] = {}
        for side in ("right", "left"):
            self._lung(side)

    def sign(self, side: str) -> float:
        return -1.0 if side == "right" else 1.0

    def size_scale(self, finding: Finding) -> float:
        """The tier's size scale of this finding's kind (1.0 in ``standard``)."""
        return self.tier.scale(finding.kind).size

    def lung_box(self, side: str) -> tuple[float, float, float, float]:
        """(centre u, half-width, centre v, half-height) of one lung's superellipse."""
        cx = 0.5 + self.sign(side) * (self.inner + self.thorax) / 2
        a = (self.thorax - self.inner) / 2
        bottom = self.domes[side] + 0.07
        return cx, a, (self.top + bottom) / 2, (bottom - self.top) / 2

    def dome(self, side: str) -> np.ndarray:
        cx, a, _, _ = self.lung_box(side)
        return self.domes[side] + 0.09 * ((self.u - cx) / a) ** 2

    def lateral(self, side: str) -> np.ndarray:
        """0 at the lung's medial edge, 1 at the chest wall."""
        return np.clip((self.sign(side) * (self.u - 0.5) - self.inner) / (self.thorax - self.inner), 0.0, 1.0)

    def _lung(self, side: str) -> None:
        cx, a, cy, b = self.lung_box(side)
        r = (np.abs((self.u - cx) / a) ** 2.4 + np.abs((self.v - cy) / b) ** 2.4) ** (1 / 2.4)
        ellipse = _inside((r - 1.0) * min(a, b), self.edge)
        self.lung_radius[side] = r
        self.lung_ellipses[side] = ellipse
        self.lung_fields[side] = ellipse * _inside(self.v - self.dome(side), self.edge)

    def lung_height(self, side: str) -> float:
        return self.domes[side] - self.top

    def heart(self) -> tuple[float, float, float, float]:
        width = self.ctr * 2 * self.thorax
        hh = self.anatomy.heart_half_height * (1.0 + 0.8 * max(0.0, self.ctr - self.anatomy.ctr))
        return 0.5 + 0.14 * width, width / 2, self.domes["left"] - 0.45 * hh, hh


def _shape_rng(finding: Finding) -> np.random.Generator:
    return np.random.default_rng(finding.shape_seed)


def _sides(finding: Finding) -> tuple[str, ...]:
    return ("right", "left") if finding.laterality == "bilateral" else (str(finding.laterality),)


def _zone_centre(body: _Body, side: str, zone: str, rng: np.random.Generator) -> tuple[float, float]:
    cx, a, _, _ = body.lung_box(side)
    height = body.lung_height(side)
    v_frac = {"upper": 0.22, "mid": 0.5, "lower": 0.76}[zone] + rng.uniform(-0.07, 0.07)
    u = cx + body.sign(side) * a * rng.uniform(-0.05, 0.45)
    return float(u), float(body.top + v_frac * height)


class _FindingLayer:
    """Density added by one finding, its truth mask and where it suppresses lung texture."""

    def __init__(self, density: np.ndarray, mask: np.ndarray, no_texture: np.ndarray | None = None):
        self.density = density
        self.mask = mask
        self.no_texture = no_texture


def _draw_effusion(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    frac = {"trace": 0.06, "small": 0.11, "moderate": 0.19, "large": 0.3}[str(f.severity)] * rng.uniform(0.85, 1.2)
    frac *= body.size_scale(f)
    density = np.zeros_like(body.u)
    mask = np.zeros(body.u.shape, dtype=bool)
    for side in _sides(f):
        height = body.lung_height(side)
        level = body.domes[side] - frac * height
        surface = level - rng.uniform(0.2, 0.5) * frac * height * body.lateral(side) ** 2
        fluid = body.lung_ellipses[side] * _inside(surface - body.v, 1.5 * body.px)
        lung = body.lung_fields[side]
        amount = fluid * np.clip(lung * 1.15, 0.0, 1.0)
        density += body.anatomy.lung_darkness * rng.uniform(0.55, 0.8) * amount
        mask |= amount > 0.5
    return _FindingLayer(density, mask)


def _draw_pneumothorax(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    (side,) = _sides(f)
    gap = {"tiny": 0.06, "small": 0.1, "moderate": 0.17}[str(f.severity)] * rng.uniform(0.85, 1.15)
    gap *= body.size_scale(f)
    cx, a, cy, b = body.lung_box(side)
    a2, b2 = a * (1 - gap), b * (1 - 0.6 * gap)
    cx2 = cx - body.sign(side) * (a - a2)
    cy2 = cy + (b - b2)
    r2 = (np.abs((body.u - cx2) / a2) ** 2.4 + np.abs((body.v - cy2) / b2) ** 2.4) ** (1 / 2.4)
    collapsed = _inside((r2 - 1.0) * min(a2, b2), body.edge)
    upper = _inside(body.v - (cy + 0.35 * b), 2 * body.px)
    region = np.clip(body.lung_fields[side] - collapsed, 0.0, 1.0) * upper
    line_width = max(0.5 * body.px, 0.004)
    pleural_line = np.exp(-(((r2 - 1.0) * min(a2, b2) / line_width) ** 2)) * upper * body.lung_fields[side]
    density = -0.06 * region + rng.uniform(0.09, 0.13) * pleural_line
    return _FindingLayer(density, region > 0.5, no_texture=region)


def _blob(body: _Body, centre: tuple[float, float], radius: float, rng: np.random.Generator) -> np.ndarray:
    field_ = np.zeros_like(body.u)
    for _ in range(4):
        du, dv = rng.normal(0.0, 0.35 * radius, size=2)
        sigma = radius * rng.uniform(0.4, 0.65)
        field_ += np.exp(-((body.u - centre[0] - du) ** 2 + (body.v - centre[1] - dv) ** 2) / (2 * sigma**2))
    return field_ / max(float(field_.max()), 1e-8)


def _draw_airspace(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    (side,) = _sides(f)
    zone = ZONE_OF_LOBE[str(f.location)][1]
    centre = _zone_centre(body, side, zone, rng)
    radius = (0.045 + 0.035 * f.severity_rank) * rng.uniform(0.85, 1.2)
    radius *= body.size_scale(f)
    shape = _blob(body, centre, radius, rng)
    lung = body.lung_fields[side]
    patchy = 1.0 + 0.35 * _unit_noise(rng, body.size, max(0.8, 0.01 / body.px))
    amp = (0.07 + 0.07 * f.severity_rank) * (body.anatomy.lung_darkness / 0.35) * rng.uniform(0.8, 1.15)
    core = np.clip((shape - 0.35) / 0.4, 0.0, 1.0)
    density = amp * core * np.clip(patchy, 0.3, 1.7) * lung
    return _FindingLayer(density, (shape > 0.5) & (lung > 0.5))


def _draw_lesion(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    (side,) = _sides(f)
    zone = ZONE_OF_LOBE[str(f.location)][1]
    u0, v0 = _zone_centre(body, side, zone, rng)
    radius = max((0.01 + 0.0009 * float(f.size_mm or 0)) * body.size_scale(f), 0.75 * body.px)
    r = np.hypot(body.u - u0, (body.v - v0) * rng.uniform(0.85, 1.15))
    amp = (0.11 if f.kind == "nodule" else 0.14) * rng.uniform(0.85, 1.3)
    disk = _inside(r - radius, body.edge)
    density = amp * disk * (0.55 + 0.45 * np.clip(1 - (r / radius) ** 2, 0.0, 1.0))
    return _FindingLayer(density, r < radius)


def _draw_atelectasis(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    density = np.zeros_like(body.u)
    mask = np.zeros(body.u.shape, dtype=bool)
    for side in _sides(f):
        cx, a, _, _ = body.lung_box(side)
        level = body.domes[side] - rng.uniform(0.035, 0.08)
        slope = rng.uniform(-0.2, 0.2)
        half = max((0.008 + 0.006 * f.severity_rank) * rng.uniform(0.85, 1.2) * body.size_scale(f), 0.75 * body.px)
        centre_line = level + slope * (body.u - cx)
        across = _inside(np.abs(body.u - cx) - 0.6 * a, 2 * body.px)
        band = _inside(np.abs(body.v - centre_line) - half, body.edge) * across * body.lung_fields[side]
        density += (0.09 + 0.05 * f.severity_rank) * rng.uniform(0.8, 1.2) * band
        mask |= band > 0.5
    return _FindingLayer(density, mask)


def _draw_edema(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    lungs = np.clip(body.lung_fields["right"] + body.lung_fields["left"], 0.0, 1.0)
    haze = np.zeros_like(body.u)
    for side in ("right", "left"):
        hu = 0.5 + body.sign(side) * (body.inner + 0.045)
        hv = body.top + 0.45 * body.lung_height(side)
        su, sv = rng.uniform(0.08, 0.11), rng.uniform(0.1, 0.14)
        su, sv = su * body.size_scale(f), sv * body.size_scale(f)
        haze = np.maximum(haze, np.exp(-(((body.u - hu) / su) ** 2 + ((body.v - hv) / sv) ** 2) / 2))
    reticular = 1.0 + 0.4 * _unit_noise(rng, body.size, max(0.6, 0.006 / body.px))
    amp = (0.05 + 0.06 * f.severity_rank) * rng.uniform(0.85, 1.15)
    density = amp * haze * np.clip(reticular, 0.2, 1.8) * lungs
    return _FindingLayer(density, (haze > 0.45) & (lungs > 0.5))


def _line_layer(body: _Body, points: np.ndarray, width: float, amp: float) -> _FindingLayer:
    dist = _polyline_distance(body.u, body.v, points)
    width = max(width, 0.45 * body.px)
    return _FindingLayer(amp * np.exp(-((dist / width) ** 2)), dist < max(1.6 * width, 0.75 * body.px))


def _draw_tube(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    carina = body.top + 0.2 * body.lung_height("right")
    tip = carina - rng.uniform(0.03, 0.08)
    x0 = 0.5 + rng.normal(0.0, 0.006)
    points = np.array([[x0 + rng.normal(0, 0.01), -0.05], [x0, (tip - 0.05) / 2], [x0 + rng.normal(0, 0.004), tip]])
    return _line_layer(body, points, 0.006 * body.size_scale(f), rng.uniform(0.2, 0.3))


def _draw_line(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    clav = body.anatomy.clavicle_height
    tip_v = body.top + rng.uniform(0.25, 0.38) * body.lung_height("right")
    if f.laterality == "right":  # internal jugular approach
        pts = [[0.5 - 0.12, -0.05], [0.5 - 0.07, clav], [0.5 - 0.035, clav + 0.08], [0.5 - 0.03, tip_v]]
    else:  # left subclavian approach
        pts = [[0.5 + 0.3, clav + 0.02], [0.5 + 0.13, clav + 0.05], [0.5 - 0.01, clav + 0.1], [0.5 - 0.03, tip_v]]
    points = np.array(pts) + rng.normal(0.0, 0.008, size=(4, 2))
    return _line_layer(body, points, 0.0045 * body.size_scale(f), rng.uniform(0.15, 0.22))


def _rib_centre(body: _Body, side: str, k: int) -> np.ndarray:
    a = body.anatomy
    t = body.sign(side) * (body.u - 0.5) / body.thorax
    v0 = a.rib_start + k * a.rib_spacing * (0.85 + 0.15 * body.lung_height("right") / 0.5)
    return v0 + 0.07 * t + 0.1 * a.rib_curve * t**2


def _fracture_point(body: _Body, f: Finding) -> tuple[str, int, float, float, float]:
    rng = _shape_rng(f)
    side = str(f.laterality)
    t_break = rng.uniform(0.45, 0.85)
    step = rng.uniform(0.004, 0.009) * (1.0 if f.severity == "acute" else 0.5) * body.size_scale(f)
    return side, int(f.rib or 5) - 1, t_break, step, rng.uniform(0.8, 1.2)


def _draw_fracture(body: _Body, f: Finding) -> _FindingLayer:
    side, k, t_break, _, amp = _fracture_point(body, f)
    a = body.anatomy
    v0 = a.rib_start + k * a.rib_spacing * (0.85 + 0.15 * body.lung_height("right") / 0.5)
    ub = 0.5 + body.sign(side) * t_break * body.thorax
    vb = v0 + 0.07 * t_break + 0.1 * a.rib_curve * t_break**2
    r = np.hypot(body.u - ub, body.v - vb)
    callus = (0.03 if f.severity == "acute" else 0.08) * amp
    density = callus * np.exp(-((r / (0.012 * body.size_scale(f))) ** 2))
    return _FindingLayer(density, r < max(0.028 * body.size_scale(f), 1.5 * body.px))


def _draw_thickening(body: _Body, f: Finding) -> _FindingLayer:
    rng = _shape_rng(f)
    (side,) = _sides(f)
    _, a, cy, b = body.lung_box(side)
    width = max(rng.uniform(0.012, 0.02) * body.size_scale(f), 0.8 * body.px) / min(a, b)
    r = body.lung_radius[side]
    rim = _inside(np.abs(r - 1.0 + width / 2) - width / 2, body.edge / min(a, b))
    cap = _inside(body.v - (body.top + rng.uniform(0.18, 0.3) * body.lung_height(side)), 2 * body.px)
    region = rim * cap * (body.lung_ellipses[side] > 0.05)
    return _FindingLayer(rng.uniform(0.08, 0.13) * region, region > 0.5)


def _draw_cardiomegaly(body: _Body, f: Finding) -> _FindingLayer:
    hx, hw, hy, hh = body.heart()
    r = np.hypot((body.u - hx) / hw, (body.v - hy) / hh)
    return _FindingLayer(np.zeros_like(body.u), r < 1.0)


def _draw_mediastinum(body: _Body, f: Finding) -> _FindingLayer:
    _, _, hy, hh = body.heart()
    width = body.med_hw * body.med_factor
    band = (np.abs(body.u - 0.5) < width) & (body.v < hy - 0.5 * hh) & (body.v > body.top - 0.04)
    return _FindingLayer(np.zeros_like(body.u), band)


_DRAW = {
    "cardiomegaly": _draw_cardiomegaly,
    "enlarged_cardiomediastinum": _draw_mediastinum,
    "pleural_effusion": _draw_effusion,
    "pneumothorax": _draw_pneumothorax,
    "consolidation": _draw_airspace,
    "pneumonia": _draw_airspace,
    "nodule": _draw_lesion,
    "mass": _draw_lesion,
    "atelectasis": _draw_atelectasis,
    "edema": _draw_edema,
    "endotracheal_tube": _draw_tube,
    "central_line": _draw_line,
    "rib_fracture": _draw_fracture,
    "pleural_thickening": _draw_thickening,
}


def _anatomy_density(body: _Body, fracture: Finding | None, no_texture: np.ndarray) -> np.ndarray:
    """Soft tissue, lungs, heart, mediastinum, spine, ribs, clavicles and lung texture."""
    a = body.anatomy
    u, v, edge = body.u, body.v, body.edge
    tex_rng = np.random.default_rng(a.texture_seed)
    size = body.size
    soft_texture = _unit_noise(tex_rng, size, max(1.0, 0.08 / body.px))
    lung_texture = _unit_noise(tex_rng, size, max(0.55, 0.009 / body.px))
    body_r = (np.abs((u - 0.5) / a.body_half_width) ** 2.2 + np.abs((v - 0.7) / 0.66) ** 2.2) ** (1 / 2.2)
    neck = _inside(np.abs(u - 0.5) - 0.09, edge) * _inside(v - 0.25, edge)
    torso = np.maximum(_inside((body_r - 1.0) * a.body_half_width, edge), neck)
    density = 0.03 + a.soft_tissue * torso * (1.0 + 0.07 * soft_texture)

    hx, hw, hy, hh = body.heart()
    heart = _inside((np.hypot((u - hx) / hw, (v - hy) / hh) - 1.0) * hh, edge)
    width = body.med_hw * np.where(v < hy - 0.5 * hh, body.med_factor, 1.0)
    knob = 0.018 * np.exp(-(((v - (body.top + 0.12)) / 0.04) ** 2)) * (u > 0.5)
    mediastinum = _inside(np.abs(u - 0.5) - width - knob, edge) * _inside(v - hy, edge)
    lungs = (body.lung_fields["right"] + body.lung_fields["left"]) * (1 - mediastinum) * (1 - 0.7 * heart)
    density -= a.lung_darkness * lungs
    density += 0.04 * heart + 0.06 * mediastinum

    carina = body.top + 0.2 * body.lung_height("right")
    trachea = _inside(np.abs(u - 0.5) - 0.011, edge) * _inside(v - carina, edge)
    density -= 0.09 * trachea
    vertebrae = 1.0 + 0.3 * np.cos(2 * math.pi * v / a.rib_spacing)
    density += 0.06 * _inside(np.abs(u - 0.5) - 0.028, edge) * vertebrae * torso

    bones = np.zeros_like(u)
    for side in ("right", "left"):
        t = body.sign(side) * (u - 0.5) / body.thorax
        span = _inside(np.abs(t - 0.55) - 0.5, 0.02)
        for k in range(10):
            centre = _rib_centre(body, side, k)
            gap = 1.0
            if fracture is not None and fracture.laterality == side and int(fracture.rib or 0) - 1 == k:
                _, _, t_break, step, _ = _fracture_point(body, fracture)
                centre = centre + step * (t > t_break)
                gap = 1.0 - _inside(np.abs(t - t_break) * body.thorax - 0.5 * body.px, 0.3 * body.px)
            half = a.rib_thickness / 2
            bones = np.maximum(bones, _inside(np.abs(v - centre) - half, edge) * span * gap)
        clav_mid = np.array([0.5 + body.sign(side) * 0.035, a.clavicle_height + 0.04])
        clav_lat = np.array([0.5 + body.sign(side) * 0.3, a.clavicle_height])
        clavicle = _inside(_segment_distance(u, v, clav_mid, clav_lat) - 0.011, edge)
        bones = np.maximum(bones, 1.4 * clavicle)
    density += 0.075 * bones * (0.55 + 0.45 * lungs) * torso

    hila = np.zeros_like(u)
    for side in ("right", "left"):
        hu, hv = 0.5 + body.sign(side) * (body.inner + 0.03), body.top + 0.45 * body.lung_height(side)
        hila = np.maximum(hila, np.exp(-np.hypot(u - hu, v - hv) / 0.12))
    markings = (0.03 + 0.05 * hila) * (0.6 + 0.4 * np.clip(lung_texture, -1.5, 1.5)) * body.tier.texture
    density += lungs * markings * (1.0 - no_texture)
    return density


def _marker_glyph(letter: str) -> np.ndarray:
    rows = _GLYPHS.get(letter)
    if rows is None:
        raise ValueError(f"no glyph for laterality marker {letter!r}; expected one of {sorted(_GLYPHS)}")
    return np.array([[ch == "#" for ch in row] for row in rows], dtype=bool)


_GLYPHS = {
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
}


def _burn_marker(image: np.ndarray, letter: str, corner: str) -> None:
    size = image.shape[0]
    scale = max(1, round(size / 64))
    glyph = np.kron(_marker_glyph(letter), np.ones((scale, scale), dtype=bool))
    gh, gw = glyph.shape
    pad = 2 * scale
    if corner not in ("top_left", "top_right", "bottom_left", "bottom_right"):
        raise ValueError(f"unknown marker corner {corner!r}")
    y0 = pad if corner.startswith("top") else size - pad - gh
    x0 = pad if corner.endswith("left") else size - pad - gw
    patch = image[y0 : y0 + gh, x0 : x0 + gw]
    patch[glyph] = 0.95


def render_study(
    anatomy: PatientAnatomy,
    findings: Sequence[Finding],
    profile: SiteProfile,
    view: str,
    image_size: int,
    rng: np.random.Generator,
    difficulty: str = "standard",
) -> RenderedStudy:
    """Draw one radiograph and its masks; ``rng`` drives only this exposure (pose, noise).

    ``difficulty`` names a tier of ``DIFFICULTY_TIERS``; it changes how visible findings are, never
    what is drawn from ``rng`` (same pose and noise stream in every tier).
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    tier = difficulty_tier(difficulty)
    by_kind = {f.kind: f for f in findings}
    if len(by_kind) != len(findings):
        raise ValueError(f"one finding per kind per study, got {[f.kind for f in findings]}")
    pose = sample_pose(profile, view, rng)
    body = _Body(anatomy, pose, image_size, view, by_kind, tier)
    layers = {kind: _DRAW[kind](body, f) for kind, f in by_kind.items()}
    no_texture = np.zeros_like(body.u)
    for layer in layers.values():
        if layer.no_texture is not None:
            no_texture = np.maximum(no_texture, layer.no_texture)
    density = _anatomy_density(body, by_kind.get("rib_fracture"), no_texture)
    for kind, layer in layers.items():
        density = density + layer.density * tier.scale(kind).contrast

    image = np.clip((density - 0.3) * profile.contrast + 0.3 + profile.brightness, 0.0, 1.0) ** profile.gamma
    image = gaussian_filter(image, profile.blur_sigma * tier.blur * image_size / 64, mode="nearest")
    image = image + rng.normal(0.0, profile.noise_std * tier.noise, size=image.shape)
    image = np.clip(image, 0.0, 1.0)
    _burn_marker(image, profile.marker_text, profile.marker_corner)
    pixels = np.round(image * 255).astype(np.uint8)

    masks = {kind: _at_least_one_pixel(layer) for kind, layer in layers.items()}
    label_mask = np.zeros((image_size, image_size), dtype=np.uint8)
    bboxes: dict[str, tuple[int, int, int, int]] = {}
    for kind in sorted(masks, key=lambda k: (-int(masks[k].sum()), MASK_INDEX[k])):
        mask = masks[kind]
        if not mask.any():
            raise RuntimeError(f"finding {by_kind[kind]} left an empty mask at {image_size}²; geometry bug")
        label_mask[mask] = MASK_INDEX[kind]
        ys, xs = np.nonzero(mask)
        bboxes[kind] = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    for kind in masks:
        if not (label_mask == MASK_INDEX[kind]).any():
            raise RuntimeError(f"finding {kind!r} is hidden under smaller findings in the label mask")
    return RenderedStudy(pixels, label_mask, masks, bboxes)


def _at_least_one_pixel(layer: _FindingLayer) -> np.ndarray:
    """A finding thinner than a pixel (small images) keeps its most affected pixel as its mask."""
    if layer.mask.any():
        return layer.mask
    effect = np.abs(layer.density)
    if layer.no_texture is not None:
        effect = effect + np.abs(layer.no_texture)
    if not effect.any():
        return layer.mask
    mask = np.zeros_like(layer.mask)
    mask[np.unravel_index(int(np.argmax(effect)), effect.shape)] = True
    return mask


def decode_label_mask(label_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Label PNG → {finding kind: bool mask} for the kinds present."""
    return {kind: label_mask == MASK_INDEX[kind] for kind in MASK_CLASS_NAMES if (label_mask == MASK_INDEX[kind]).any()}
