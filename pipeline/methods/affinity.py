"""Learned affinity (AffinityNet, Ahn & Kwak, CVPR 2018) and the random walk that spreads CAMs with it.

* **Affinity labels.** From a pseudo mask with its unsure label 255, brought to the
  embedding map's size (``label_downsample``: ``pool``, PSA's way, averages each label's
  one-hot map over the block and takes the most frequent label, so thin and small regions
  survive while they fill most of a block; ``nearest`` samples one pixel per block): a pair
  of pixels closer than ``radius`` gets label 1 when both carry the same confident label
  (split into background-positive and foreground-positive pairs), 0 when they carry
  different confident labels, and is ignored when either is unsure or outside the image.
* **Affinity.** ``a(i, j) = exp(-mean_c |e_i - e_j|)`` over the embedding channels
  (PSA's form, psa@9493e59 network/resnet38_aff.py:58): 1 for identical embeddings,
  towards 0 for distant ones; symmetric.
* **Loss.** Cross-entropy of the affinities against the labels, averaged separately over
  background-positive, foreground-positive and negative pairs and combined
  ``bg/4 + fg/4 + neg/2`` (PSA's balance, train_aff.py:113), so the abundant background
  pairs do not drown the others.
* **Random walk.** Transition probabilities ``T = D^-1 A^beta`` between every pixel and
  the pixels within ``radius`` (itself included, affinity 1), ``D`` the row sums; the maps
  are updated ``t`` times by ``x <- T x``, each pixel taking the transition-weighted mean
  of its neighbours' scores. PSA computes the same product as ``x T^(2^logt)`` with a
  column-normalised dense matrix (infer_aff.py:103-114; A is symmetric, so the two agree).
  ``T`` is built from one weight per (pixel, offset) as a sparse matrix, so memory is linear
  in the image size, and a step is one sparse product, on the GPU when there is one.
  ``pairs="psa"`` keeps only the pairs PSA's index function makes (tool/pyutils.py:125-159):
  a pair (p, p + o), o in the half-plane, exists only when p lies outside the last
  ``radius - 1`` rows and the first and last ``radius - 1`` columns, so pixels near the
  left, right and bottom borders have fewer neighbours; ``pairs="all"`` keeps every pair
  inside the image. ``tests/test_affinity.py`` checks the walk against values computed by
  PSA's own code.

Offsets are ``(dy, dx)`` with ``dy^2 + dx^2 < radius^2``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from pipeline.data.dataset import IGNORE

# Codes of the pair labels.
NEGATIVE, BACKGROUND_POSITIVE, FOREGROUND_POSITIVE = 0, 1, 2


def neighbour_offsets(radius: int, half: bool) -> list[tuple[int, int]]:
    """Offsets within ``radius``, (0, 0) excluded. ``half``: one of each pair +-(dy, dx)
    (the loss counts a pair once); otherwise all of them (the walk's neighbourhood)."""
    offsets = []
    for dy in range(-radius + 1, radius):
        for dx in range(-radius + 1, radius):
            if (dy, dx) == (0, 0) or dy * dy + dx * dx >= radius * radius:
                continue
            if half and (dy < 0 or (dy == 0 and dx < 0)):
                continue
            offsets.append((dy, dx))
    return offsets


def _reach(offsets: list[tuple[int, int]]) -> int:
    """The padding every offset's neighbour needs."""
    return max(max(abs(dy), abs(dx)) for dy, dx in offsets)


def _shifted(padded: torch.Tensor, pad: int, dy: int, dx: int, height: int, width: int) -> torch.Tensor:
    """The neighbour at (y + dy, x + dx) of every position of a map padded by ``pad``."""
    return padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width]


def affinity_labels(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Pair labels of a B x h x w long mask (0 background, classes, 255 unsure): B x O x h x w
    uint8 codes (NEGATIVE, BACKGROUND_POSITIVE, FOREGROUND_POSITIVE, or 255 ignored) for the
    pairs (p, p + offset), offsets from ``neighbour_offsets(radius, half=True)``."""
    height, width = mask.shape[-2:]
    pad = radius
    padded = F.pad(mask, (pad, pad, pad, pad), value=IGNORE)  # outside the image: unsure
    labels = []
    for dy, dx in neighbour_offsets(radius, half=True):
        other = _shifted(padded, pad, dy, dx, height, width)
        code = torch.full_like(mask, IGNORE)
        sure = (mask != IGNORE) & (other != IGNORE)
        code[sure & (mask != other)] = NEGATIVE
        code[sure & (mask == other) & (mask == 0)] = BACKGROUND_POSITIVE
        code[sure & (mask == other) & (mask != 0)] = FOREGROUND_POSITIVE
        labels.append(code)
    return torch.stack(labels, dim=1).to(torch.uint8)


def pair_affinities(embeddings: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """B x D x h x w embeddings -> B x O x h x w affinities between p and p + offset (values
    for neighbours outside the image are meaningless: callers mask them)."""
    height, width = embeddings.shape[-2:]
    pad = _reach(offsets)
    padded = F.pad(embeddings, (pad, pad, pad, pad))
    return torch.stack([
        torch.exp(-(embeddings - _shifted(padded, pad, dy, dx, height, width)).abs().mean(dim=1))
        for dy, dx in offsets
    ], dim=1)


def downsample_mask(mask: torch.Tensor, size: tuple[int, int], how: str) -> torch.Tensor:
    """A B x H x W long mask (classes, 255 unsure) brought to ``size``: ``nearest``, the pixel
    at the centre of each block (torch's ``nearest-exact``, which is PIL's NEAREST, the resize
    IRNet's labels get: irn@a2ece00 voc12/dataloader.py:269; torch's ``nearest`` takes the
    block's top-left pixel, half a block off the map it supervises), or ``pool``: each label's
    share of the block (adaptive average pooling of its one-hot map), the largest share winning;
    ties go to the lower label, background first and unsure last. PSA pools the CRF's score
    maps (voc12/data.py:222-229); the cached pseudo masks hold hard labels, whose one-hot maps
    stand in for the scores."""
    if how == "nearest":
        return F.interpolate(mask[:, None].float(), size=size, mode="nearest-exact")[:, 0].long()
    sure = mask != IGNORE
    unsure_code = int(mask[sure].max()) + 1 if sure.any() else 0
    codes = torch.where(sure, mask, torch.full_like(mask, unsure_code))
    shares = F.adaptive_avg_pool2d(F.one_hot(codes, unsure_code + 1).permute(0, 3, 1, 2).float(), size)
    pooled = shares.argmax(dim=1)
    return torch.where(pooled == unsure_code, torch.full_like(pooled, IGNORE), pooled)


def affinity_loss(embeddings: torch.Tensor, mask: torch.Tensor, radius: int,
                  label_downsample: str = "pool") -> dict:
    """The balanced pair loss of B x D x h x w embeddings against a B x H x W pseudo mask
    (brought to h x w by :func:`downsample_mask`): see :func:`pair_loss`."""
    mask = downsample_mask(mask, embeddings.shape[-2:], label_downsample)
    affinity = pair_affinities(embeddings, neighbour_offsets(radius, half=True))
    return pair_loss(affinity, affinity_labels(mask, radius))


def boundary_loss(boundary: torch.Tensor, mask: torch.Tensor, radius: int,
                  label_downsample: str = "nearest") -> dict:
    """IRNet's inter-pixel relation loss (irn@a2ece00 net/resnet50_irn.py:198-213,
    step/train_irn.py:186-197) of a B x 1 x h x w boundary probability map against a pseudo
    mask: the affinity of a pair is 1 minus the highest boundary value on the path between
    them (:func:`path_affinities`), with :func:`pair_loss`'s balance ((bg/2 + fg/2) / 2 +
    neg / 2 there). IRNet brings its labels to the map by nearest neighbour."""
    mask = downsample_mask(mask, boundary.shape[-2:], label_downsample)
    affinity = path_affinities(boundary, neighbour_offsets(radius, half=True))
    return pair_loss(affinity, affinity_labels(mask, radius))


def pair_loss(affinity: torch.Tensor, labels: torch.Tensor) -> dict:
    """Cross-entropy of B x O x h x w pair affinities against :func:`affinity_labels`, averaged
    separately over background-positive, foreground-positive and negative pairs and combined
    ``bg/4 + fg/4 + neg/2``; terms "bg", "fg", "neg", the total "loss", and "neg_affinity",
    the mean affinity of the negative pairs (a diagnostic, not trained on: near 1 means the
    network has not yet learnt to separate regions)."""
    eps = 1e-5

    def mean_over(code: int, values: torch.Tensor) -> torch.Tensor:
        chosen = labels == code
        # No pair of this kind in the batch: 0, with a gradient path.
        return values[chosen].mean() if chosen.any() else values.sum() * 0.0

    terms = {
        "bg": mean_over(BACKGROUND_POSITIVE, -torch.log(affinity + eps)),
        "fg": mean_over(FOREGROUND_POSITIVE, -torch.log(affinity + eps)),
        "neg": mean_over(NEGATIVE, -torch.log(1.0 + eps - affinity)),
    }
    negative = labels == NEGATIVE
    neg_affinity = affinity[negative].detach().mean() if negative.any() else affinity.new_tensor(float("nan"))
    loss = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2
    return {"loss": loss} | terms | {"neg_affinity": neg_affinity}


def path_points(dy: int, dx: int) -> list[tuple[int, int]]:
    """The pixels between (0, 0) and (dy, dx), both included: those of the pair's bounding box
    whose distance to the line through the two is below 1 (IRNet's paths, misc/indexing.py:32-49)."""
    length = (dy * dy + dx * dx) ** 0.5
    points = []
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            if length == 0 or abs(y * dx - x * dy) / length < 1:
                points.append((y, x))
    return points


def path_affinities(boundary: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """B x 1 x h x w boundary probabilities -> B x O x h x w affinities between p and p + offset:
    1 minus the highest boundary value on the path between them, and 1 for a pixel with itself
    (IRNet adds the identity, misc/indexing.py:112-129). Outside the image the boundary is 1
    (IRNet pads its map with 1, misc/indexing.py:150), so a pair leaving the image has affinity 0."""
    height, width = boundary.shape[-2:]
    pad = _reach(offsets)
    padded = F.pad(boundary, (pad, pad, pad, pad), value=1.0)
    return torch.cat([
        torch.ones_like(boundary) if (dy, dx) == (0, 0) else
        1 - torch.stack([_shifted(padded, pad, y, x, height, width)
                         for y, x in path_points(dy, dx)]).amax(dim=0)
        for dy, dx in offsets
    ], dim=1)


def walk_offsets(radius: int) -> list[tuple[int, int]]:
    """The walk's offsets: (0, 0) first, then every neighbour within ``radius``."""
    return [(0, 0)] + neighbour_offsets(radius, half=False)


def transition_weights(embeddings: torch.Tensor, radius: int, beta: float,
                       pairs: str = "all") -> tuple[torch.Tensor, list]:
    """The walk's transitions along AffinityNet embeddings: see :func:`normalized_transitions`."""
    offsets = walk_offsets(radius)
    return normalized_transitions(pair_affinities(embeddings, offsets), offsets, beta, radius, pairs), offsets


def normalized_transitions(affinities: torch.Tensor, offsets: list, beta: float, radius: int,
                           pairs: str = "all") -> torch.Tensor:
    """Row-normalised transition probabilities of the walk from B x O x h x w affinities for
    ``walk_offsets(radius)``: each position's weights sum to 1 and are 0 towards positions
    outside the image, and with ``pairs="psa"`` towards the pairs PSA's index function leaves
    out (module docstring)."""
    height, width = affinities.shape[-2:]
    weights = affinities.pow(beta)
    pad = _reach(offsets)
    origins = F.pad(_pair_origins(affinities, radius, pairs), (pad, pad, pad, pad))
    in_image = F.pad(affinities.new_ones(1, 1, height, width), (pad, pad, pad, pad))
    exists = [affinities.new_ones(1, 1, height, width)]  # (0, 0): every pixel keeps its own score
    for dy, dx in offsets[1:]:
        # (p, p + o) with o in the half-plane exists when p may start a pair; for the other
        # half, (p, p + o) is the transpose of (p + o, p): it exists when p + o may start one.
        first = (0, 0) if dy > 0 or (dy == 0 and dx > 0) else (dy, dx)
        exists.append(_shifted(origins, pad, *first, height, width)
                      * _shifted(in_image, pad, dy, dx, height, width))
    weights = weights * torch.cat(exists, dim=1)
    return weights / weights.sum(dim=1, keepdim=True)


def _pair_origins(like: torch.Tensor, radius: int, pairs: str) -> torch.Tensor:
    """1 x 1 x h x w, h x w those of ``like``: 1 where a pixel may be the first pixel of a half-plane pair."""
    height, width = like.shape[-2:]
    origins = like.new_ones(1, 1, height, width)
    if pairs == "psa":  # tool/pyutils.py:145-146: full_indices[:-(r-1), (r-1):-(r-1)]
        cut = radius - 1
        origins.zero_()
        origins[..., :max(height - cut, 0), cut:max(width - cut, cut)] = 1
    return origins


def random_walk(maps: torch.Tensor, weights: torch.Tensor, offsets: list[tuple[int, int]],
                iterations: int) -> torch.Tensor:
    """``iterations`` steps of ``x <- T x`` for B x K x h x w maps, T given by
    :func:`transition_weights` (weights and offsets), as one sparse matrix product a step."""
    batch, channels, height, width = maps.shape
    transitions = transition_matrix(weights, offsets)
    walked = maps.to(weights.dtype).permute(0, 2, 3, 1).reshape(batch * height * width, channels)
    for _ in range(iterations):
        walked = transitions @ walked
    return walked.view(batch, height, width, channels).permute(0, 3, 1, 2)


def transition_matrix(weights: torch.Tensor, offsets: list[tuple[int, int]]) -> torch.Tensor:
    """B x O x h x w transition weights as one sparse CSR matrix over the B * h * w positions
    (row-major, image after image: block diagonal), row p holding the weights towards p + offset
    for the neighbours inside the image. A step is then one sparse product, a few dozen times
    faster than a shifted product per offset on small maps (docs/results.md, "Random walk
    speed"), and cuSPARSE's on a GPU; int32 indices halve the memory each step reads."""
    batch, _, height, width = weights.shape
    order = sorted(range(len(offsets)), key=lambda index: offsets[index])  # columns ascending in a row
    device = weights.device
    dy = torch.tensor([offsets[index][0] for index in order], device=device)
    dx = torch.tensor([offsets[index][1] for index in order], device=device)
    rows = torch.arange(height, device=device).view(height, 1, 1) + dy  # h x 1 x O
    cols = torch.arange(width, device=device).view(1, width, 1) + dx    # 1 x w x O
    inside = ((rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)).reshape(-1)
    image_starts = height * width * torch.arange(batch, device=device).view(batch, 1)
    targets = (rows * width + cols).reshape(1, -1) + image_starts
    values = weights[:, order].permute(0, 2, 3, 1).reshape(batch, -1)
    per_row = inside.view(height * width, len(order)).sum(dim=1).repeat(batch)
    row_starts = F.pad(per_row.cumsum(0), (1, 0))
    size = batch * height * width
    index = torch.int32 if size * len(order) < 2 ** 31 else torch.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(row_starts.to(index), targets[:, inside].reshape(-1).to(index),
                                       values[:, inside].reshape(-1), size=(size, size),
                                       check_invariants=False)
