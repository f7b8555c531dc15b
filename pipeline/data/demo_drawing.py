"""Drawing helpers of the synthetic demo data set (pipeline/data/demo.py): colours,
textures, shading, the primitive shapes objects are made of, and the cluttered backgrounds.
"""

from __future__ import annotations

import colorsys

import numpy as np
from scipy.ndimage import gaussian_filter


def hsv(rng: np.random.Generator, hue: tuple[float, float], sat: tuple[float, float],
         val: tuple[float, float]) -> np.ndarray:
    """A random RGB colour (0..255 floats) from HSV ranges, with per-channel jitter."""
    h = rng.uniform(*hue) % 1.0
    rgb = np.array(colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val))) * 255.0
    return np.clip(rgb * rng.uniform(0.92, 1.08, size=3), 0.0, 255.0)


def warm_colour(rng: np.random.Generator) -> np.ndarray:
    """Colour distribution shared by bus and house (reds, oranges, yellows)."""
    return hsv(rng, (-0.04, 0.14), (0.55, 0.95), (0.55, 0.95))


def cool_colour(rng: np.random.Generator) -> np.ndarray:
    """Colour distribution shared by plate and tile (cyans, blues, violets)."""
    return hsv(rng, (0.47, 0.75), (0.5, 0.95), (0.5, 0.95))


def wood_colour(rng: np.random.Generator) -> np.ndarray:
    # Overlaps the warm range on purpose: table vs bus/house is not a colour question.
    return hsv(rng, (0.04, 0.11), (0.45, 0.8), (0.35, 0.7))


def vivid_colour(rng: np.random.Generator) -> np.ndarray:
    return hsv(rng, (0.0, 1.0), (0.7, 1.0), (0.7, 1.0))


def muted_colour(rng: np.random.Generator) -> np.ndarray:
    """Background colour distribution: any hue, low saturation."""
    return hsv(rng, (0.0, 1.0), (0.0, 0.35), (0.25, 0.85))


def luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return yy + 0.5, xx + 0.5


def rotated_grid(h: int, w: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u along, v across) rotated by `angle` radians."""
    yy, xx = grid(h, w)
    c, s = np.cos(angle), np.sin(angle)
    return xx * c + yy * s, -xx * s + yy * c


def smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Low-frequency noise with unit standard deviation."""
    noise = gaussian_filter(rng.standard_normal((h, w)), sigma, mode="wrap")
    return noise / (noise.std() + 1e-8)


def two_colour(pattern: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """Blend two colours by a pattern in [0, 1] (1 = c2)."""
    p = pattern[..., None].astype(np.float64)
    return c1 * (1.0 - p) + c2 * p


def stripes(h: int, w: int, c1: np.ndarray, c2: np.ndarray, period: float,
             angle: float) -> np.ndarray:
    _, v = rotated_grid(h, w, angle)
    return two_colour((v / period) % 1.0 < 0.5, c1, c2)


def bricks(h: int, w: int, brick: np.ndarray, mortar: np.ndarray, row_height: int) -> np.ndarray:
    yy, xx = grid(h, w)
    brick_width = 2 * row_height + 1
    row = np.floor(yy / row_height)
    shifted_x = xx + (row % 2) * (brick_width / 2)  # every other row offset by half a brick
    is_mortar = (yy % row_height < 1.0) | (shifted_x % brick_width < 1.0)
    return two_colour(is_mortar, brick, mortar)


def checker(h: int, w: int, c1: np.ndarray, c2: np.ndarray, cell: float,
             angle: float) -> np.ndarray:
    u, v = rotated_grid(h, w, angle)
    return two_colour((np.floor(u / cell) + np.floor(v / cell)) % 2 == 1, c1, c2)


def dots(h: int, w: int, base: np.ndarray, dot: np.ndarray, spacing: float,
          angle: float) -> np.ndarray:
    u, v = rotated_grid(h, w, angle)
    du = u % spacing - spacing / 2
    dv = v % spacing - spacing / 2
    return two_colour(du ** 2 + dv ** 2 <= (0.3 * spacing) ** 2, base, dot)


def wood(rng: np.random.Generator, h: int, w: int, colour: np.ndarray) -> np.ndarray:
    """Horizontal wood grain: sinusoidal rings warped by smooth noise."""
    yy, _ = grid(h, w)
    warp = smooth_noise(rng, h, w, sigma=3.0)
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * (yy / rng.uniform(2.0, 4.0) + 0.4 * warp))
    return two_colour(grain, colour, colour * rng.uniform(0.55, 0.75))


def texture_bus_house(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Shared texture of the bus/house pair: bricks or stripes in warm colours."""
    colour = warm_colour(rng)
    dark = colour * rng.uniform(0.45, 0.7)
    if rng.random() < 0.5:
        return bricks(h, w, colour, dark, row_height=int(rng.integers(3, 6)))
    return stripes(h, w, colour, dark, period=rng.uniform(3.0, 7.0),
                    angle=rng.uniform(0.0, np.pi))


def texture_plate_tile(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Shared texture of the plate/tile pair: checker or dots in cool colours.

    The pattern angle is random for both classes, so a pattern aligned with
    the object's edges is no cue for "tile".
    """
    colour = cool_colour(rng)
    other = colour * 0.35 + 0.65 * rng.uniform(200.0, 250.0)  # a pale tint of the same hue
    angle = rng.uniform(0.0, np.pi / 2)
    if rng.random() < 0.5:
        return checker(h, w, colour, other, cell=rng.uniform(3.0, 7.0), angle=angle)
    return dots(h, w, other, colour, spacing=rng.uniform(4.0, 8.0), angle=angle)


def shaded(rng: np.random.Generator, rgb: np.ndarray, strength: float) -> np.ndarray:
    """Multiply by a random linear illumination gradient of +-`strength`."""
    h, w = rgb.shape[:2]
    u, _ = rotated_grid(h, w, rng.uniform(0.0, 2 * np.pi))
    span = max(np.ptp(u), 1.0)
    gain = 1.0 + strength * ((u - u.min()) / span * 2.0 - 1.0)
    return rgb * gain[..., None]


def disk(h: int, w: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = grid(h, w)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def convex_polygon(h: int, w: int, vertices: list[tuple[float, float]]) -> np.ndarray:
    """Mask of a convex polygon given as (y, x) vertices in either winding order."""
    yy, xx = grid(h, w)
    sides = []
    for (y0, x0), (y1, x1) in zip(vertices, vertices[1:] + vertices[:1]):
        sides.append((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0))
    sides = np.stack(sides)
    return np.all(sides >= 0, axis=0) | np.all(sides <= 0, axis=0)


def segment(h: int, w: int, p0: np.ndarray, p1: np.ndarray, thickness: float) -> np.ndarray:
    """Mask of a thick line segment between (y, x) points p0 and p1."""
    yy, xx = grid(h, w)
    d = p1 - p0
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(d @ d, 1e-8), 0.0, 1.0)
    dist2 = (yy - p0[0] - t * d[0]) ** 2 + (xx - p0[1] - t * d[1]) ** 2
    return dist2 <= (thickness / 2) ** 2


def centred_coords(h: int, w: int, cy: float, cx: float,
                    angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u, v) relative to (cy, cx), rotated by `angle` radians."""
    yy, xx = grid(h, w)
    c, s = np.cos(angle), np.sin(angle)
    return (xx - cx) * c + (yy - cy) * s, -(xx - cx) * s + (yy - cy) * c


def rotated_rectangle(h: int, w: int, cy: float, cx: float, half_h: float, half_w: float,
                       angle: float) -> np.ndarray:
    u, v = centred_coords(h, w, cy, cx, angle)
    return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)


def ellipse(h: int, w: int, cy: float, cx: float, radius_y: float, radius_x: float,
             angle: float) -> np.ndarray:
    u, v = centred_coords(h, w, cy, cx, angle)
    return (u / radius_x) ** 2 + (v / radius_y) ** 2 <= 1.0


def background_region(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A full-frame fill for one background region: colour, gradient, texture."""
    rgb = shaded(rng, np.broadcast_to(muted_colour(rng), (h, w, 3)), rng.uniform(0.05, 0.3))
    kind = rng.integers(3)
    if kind == 0:  # cloudy
        rgb = rgb + rng.uniform(8.0, 25.0) * smooth_noise(rng, h, w, rng.uniform(2.0, 8.0))[..., None]
    elif kind == 1:  # faint fine stripes (grass, fabric, wallpaper)
        _, v = rotated_grid(h, w, rng.uniform(0.0, np.pi))
        rgb = rgb + rng.uniform(6.0, 15.0) * np.sin(2 * np.pi * v / rng.uniform(2.0, 5.0))[..., None]
    return rgb + rng.normal(0.0, rng.uniform(2.0, 8.0), size=(h, w, 3))


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Two or three regions split by parallel, slightly wavy boundaries."""
    if rng.random() < 0.5:
        angle = rng.uniform(-0.25, 0.25)  # a horizon
    else:
        angle = rng.uniform(0.0, np.pi)  # any diagonal
    along, across = rotated_grid(h, w, angle)
    across = across + rng.uniform(0.0, 0.06 * h) * np.sin(
        2 * np.pi * along / rng.uniform(0.5 * w, 2.0 * w) + rng.uniform(0.0, 2 * np.pi))
    n_regions = int(rng.integers(2, 4))
    cuts = np.sort(rng.uniform(np.quantile(across, 0.2), np.quantile(across, 0.8), n_regions - 1))
    region = np.digitize(across, cuts)
    rgb = np.empty((h, w, 3))
    for k in range(n_regions):
        rgb[region == k] = background_region(rng, h, w)[region == k]
    return rgb


def clutter_colour(rng: np.random.Generator) -> np.ndarray:
    # Half the clutter borrows object colours so colour alone does not identify objects.
    if rng.random() < 0.5:
        sampler = (warm_colour, cool_colour, wood_colour, vivid_colour)[rng.integers(4)]
        return sampler(rng)
    return muted_colour(rng)


def clutter_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    side = min(h, w)
    centre = rng.uniform((0.0, 0.0), (h, w))
    kind = rng.integers(3)
    if kind == 0:  # a short line, as thin as a lamp pole or table leg
        angle = rng.uniform(0.0, 2 * np.pi)
        end = centre + rng.uniform(0.1, 0.35) * side * np.array([np.sin(angle), np.cos(angle)])
        return segment(h, w, centre, end, thickness=rng.uniform(1.0, 2.5))
    if kind == 1:  # an elongated blob, so it is never mistaken for a ball
        radius = rng.uniform(0.03, 0.1) * side + 1.0
        return ellipse(h, w, *centre, radius, radius * rng.uniform(1.8, 3.0), rng.uniform(0.0, np.pi))
    half = rng.uniform(0.02, 0.1, size=2) * side + 1.0  # a rectangle
    return rotated_rectangle(h, w, *centre, *half, rng.uniform(0.0, np.pi))


def add_clutter(rng: np.random.Generator, rgb: np.ndarray) -> None:
    """Paint small background clutter in place.

    Clutter is smaller than any confusable object and never uses the pair
    textures (bricks, checker, dots), so its label "background" is not
    ambiguous; it only uses plain, noisy or striped fills.
    """
    h, w = rgb.shape[:2]
    for _ in range(int(rng.integers(3, 10))):
        mask = clutter_mask(rng, h, w)
        colour = clutter_colour(rng)
        if rng.random() < 0.3:
            striped = stripes(h, w, colour, colour * rng.uniform(0.4, 0.7), rng.uniform(2.0, 5.0),
                                rng.uniform(0.0, np.pi))
            rgb[mask] = striped[mask]
        else:
            rgb[mask] = colour + rng.normal(0.0, 6.0, size=(int(mask.sum()), 3))
