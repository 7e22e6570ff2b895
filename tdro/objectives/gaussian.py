"""Per-class batch moments and squared 2-Wasserstein (Bures–Wasserstein) distances between Gaussians.

W₂²(N(m₁,S₁), N(m₂,S₂)) = ‖m₁ − m₂‖² + tr S₁ + tr S₂ − 2 tr (S₁^½ S₂ S₁^½)^½ with principal roots.
Every cross term here uses one identity: for ANY factor F with F Fᵀ = S₁, the matrix Fᵀ S₂ F is
similar to S₁^½ S₂ S₁^½, so tr (S₁^½ S₂ S₁^½)^½ = Σ √eig(Fᵀ S₂ F). Eigenvalues come from
``eigvalsh``, whose backward is V diag(g) Vᵀ: no division by eigenvalue gaps, so gradients stay
finite when eigenvalues repeat (the reference's ``eigh`` roots did not; its first version even
took the trace of a Cholesky factor of the product, which is not the Bures term).

A batch class covariance Ŝ = XᵀX/(n−1) (X centred, n×k) has rank ≤ n−1 and needs no ridge:
the principal root of a PSD matrix is well defined, so +εI appears only where a full-rank matrix
is needed (the anchor covariance already carries it). With F = Xᵀ/√(n−1), the cross term against
an anchor S = L̃L̃ᵀ + εI is Σ √eig(G) with the small n×n matrix G = (YYᵀ + εXXᵀ)/(n−1), Y = XL̃;
against a low-rank anchor S = UUᵀ + diag(d) + εI it is G = (YYᵀ + X diag(d + ε) Xᵀ)/(n−1), Y = XU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassMoments:
    """Batch moments of each (group,) class with at least ``min_count`` samples, padded for batching.

    Row p describes one class (or one (group, class) pair): ``centred[p, :counts[p]]`` holds its
    centred latents, the rest is zero padding marked False in ``mask``.
    """

    means: torch.Tensor  # (P, k)
    centred: torch.Tensor  # (P, n_max, k), zero in padded slots
    mask: torch.Tensor  # (P, n_max) bool, True for real samples
    counts: torch.Tensor  # (P,) int64
    classes: torch.Tensor  # (P,) int64
    groups: torch.Tensor | None  # (P,) int64 when computed per group, else None

    @property
    def num(self) -> int:
        """Number of moment rows P."""
        return self.means.shape[0]

    def covariance(self) -> torch.Tensor:
        """Unbiased covariances Ŝ (P,k,k), without ridge (rank ≤ n_c − 1)."""
        dof = (self.counts - 1).to(self.centred.dtype)[:, None, None]
        return self.centred.transpose(1, 2) @ self.centred / dof

    def variance(self) -> torch.Tensor:
        """Unbiased per-dimension variances (P,k), the diagonal of ``covariance()``."""
        dof = (self.counts - 1).to(self.centred.dtype)[:, None]
        return self.centred.square().sum(1) / dof


def class_moments(
    latents: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    group_ids: torch.Tensor | None = None,
    min_count: int = 2,
) -> ClassMoments:
    """Per-class means and centred samples by one sort and one scatter, pooled or per (group, class).

    Classes with fewer than ``min_count`` samples (default 2: a covariance needs two) are left
    out. Pass ``group_ids`` to get moments per (group, class) instead of pooled over groups.
    Rows are sorted by (group, class) key. Sizing the padded tensor reads a few numbers back from
    the device in one transfer (besides ``torch.unique``).
    """
    if latents.dim() != 2:
        raise ValueError(f"latents must have shape (N, k), got {tuple(latents.shape)}")
    if labels.shape != latents.shape[:1]:
        raise ValueError(f"labels must have shape ({latents.shape[0]},), got {tuple(labels.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 2:
        raise ValueError(f"min_count must be an integer >= 2, got {min_count!r}")
    if group_ids is not None and group_ids.shape != labels.shape:
        raise ValueError(f"group_ids must have shape {tuple(labels.shape)}, got {tuple(group_ids.shape)}")
    n, k = latents.shape
    device = latents.device
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        mask = torch.zeros(0, 0, dtype=torch.bool, device=device)
        groups = None if group_ids is None else empty
        means, centred = latents.new_zeros(0, k), latents.new_zeros(0, 0, k)
        return ClassMoments(means, centred, mask, empty, empty, groups)
    labels = labels.long()
    key = labels if group_ids is None else group_ids.long() * num_classes + labels
    keys, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    enough = counts >= min_count
    lowest_group = key.new_zeros(()) if group_ids is None else group_ids.min().long()
    largest = torch.where(enough, counts, 0).max()
    summary = torch.stack([enough.sum(), largest, labels.min(), labels.max(), lowest_group]).tolist()
    num, n_max, lowest_label, highest_label, lowest_group = summary
    if lowest_label < 0 or highest_label >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for num_classes={num_classes}, "
            f"got values from {lowest_label} to {highest_label}"
        )
    if lowest_group < 0:
        raise ValueError(f"group_ids must be >= 0, got {lowest_group}")
    kept = torch.nonzero_static(enough, size=num).squeeze(1)
    kept_counts = counts[kept]
    # Row of every unique key among the kept ones; dropped keys go to a scratch row `num`.
    row_of_key = torch.full_like(counts, num).index_copy_(0, kept, torch.arange(num, device=device))
    order = torch.argsort(inverse, stable=True)
    start = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(n, device=device) - start[inverse[order]]
    rank = torch.empty_like(rank_sorted).index_copy_(0, order, rank_sorted)
    width = max(n_max, min_count)  # dropped keys have rank < min_count − 1
    flat = row_of_key[inverse] * width + rank
    padded = latents.new_zeros((num + 1) * width, k).index_copy(0, flat, latents)
    padded = padded.view(num + 1, width, k)[:num, :n_max]
    mask = torch.arange(n_max, device=device) < kept_counts[:, None]
    means = padded.sum(1) / kept_counts[:, None].to(latents.dtype)
    centred = (padded - means[:, None, :]) * mask[..., None]
    kept_keys = keys[kept]
    if group_ids is None:
        return ClassMoments(means, centred, mask, kept_counts, kept_keys, None)
    return ClassMoments(means, centred, mask, kept_counts, kept_keys % num_classes, kept_keys // num_classes)


def _precise(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float64: the small matrices whose eigenvalues are taken are formed and solved there.

    Their spectra are products of two covariances' spectra (squared condition numbers): in float32
    eigenvalues a few orders below the largest are round-off, and an anchor whose spectrum spreads
    loses them all (its W₂² came out 14–65 % wrong). The matrices are n×n or k×k, so float64 is cheap.
    """
    return tensor.to(torch.promote_types(tensor.dtype, torch.float64))


def symmetric_eigh(matrix: torch.Tensor, vectors: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``eigh`` (or ``eigvalsh``) of a batch of small symmetric matrices, solved in host memory when on CUDA.

    cuSOLVER's batched eigh is fast only up to n = 32 and loops per matrix above (pytorch#175585,
    #174674), and cu130 builds are 30–130× slower than older ones even at 3×3 (pytorch#183806).
    The matrices here are at most 1.25·k wide (the n×n route up to n_max = 1.25·k, the k×k one
    above), a few kB to MB in float64, so the round trip to the CPU's LAPACK is the safer choice.
    Chosen from those reports: no GPU was lent to measure it (see the issue 15 note).
    """
    solve = torch.linalg.eigh if vectors else torch.linalg.eigvalsh
    if matrix.device.type != "cuda":
        return solve(matrix)
    result = solve(matrix.cpu())
    return tuple(t.to(matrix.device) for t in result) if vectors else result.to(matrix.device)


def _sqrt_eigenvalue_sum(matrix: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Σ √λ over the eigenvalues of symmetric PSD matrices (…,n,n); λ at round-off level counts as 0.

    ``scale`` (…) bounds the largest eigenvalue (a trace): eigenvalues below n·eps·scale are
    indistinguishable from 0, and would otherwise give √'s infinite derivative at 0. Pass float64
    matrices (``_precise``): in float32 that floor is above real eigenvalues of spread spectra.
    """
    eigenvalues = symmetric_eigh(matrix, vectors=False)
    info = torch.finfo(matrix.dtype)
    floor = (matrix.shape[-1] * info.eps * scale.detach()).clamp_min(info.tiny)[..., None]
    real = eigenvalues > floor
    return torch.where(real, torch.where(real, eigenvalues, 1.0).sqrt(), 0.0).sum(-1)


def _trace(matrix: torch.Tensor) -> torch.Tensor:
    return matrix.diagonal(dim1=-2, dim2=-1).sum(-1)


def factored_bures_wasserstein_sq(
    m1: torch.Tensor, S1: torch.Tensor, m2: torch.Tensor, S2: torch.Tensor, factor2: torch.Tensor
) -> torch.Tensor:
    """W₂² given any F₂ with F₂F₂ᵀ = S₂, so a Cholesky factor per anchor serves every pair it is in.

    Computed in float64 whatever the inputs' dtype, returned in it (float32 at least).
    """
    dtype = torch.promote_types(m1.dtype, torch.float32)
    m1, S1, m2, S2, factor2 = map(_precise, (m1, S1, m2, S2, factor2))
    inner = factor2.transpose(-1, -2) @ S1 @ factor2
    cross = _sqrt_eigenvalue_sum(inner, _trace(inner))
    return ((m1 - m2).square().sum(-1) + _trace(S1) + _trace(S2) - 2 * cross).to(dtype)


def bures_wasserstein_sq(m1: torch.Tensor, S1: torch.Tensor, m2: torch.Tensor, S2: torch.Tensor) -> torch.Tensor:
    """Batched W₂² between N(m1,S1) and N(m2,S2) (means (…,k), covariances (…,k,k)).

    Covariances must be symmetric PSD, and in each call one of the two arguments positive
    definite throughout the batch (it supplies the Cholesky factor of the identity above; taken
    in float64, so an anchor with a tiny ridge still has one).
    """
    if S1.shape != S2.shape or S1.shape[-1] != S1.shape[-2] or m1.shape != S1.shape[:-1] or m2.shape != m1.shape:
        raise ValueError(
            "expected means (..., k) and covariances (..., k, k) of matching shapes, got "
            f"m1 {tuple(m1.shape)}, S1 {tuple(S1.shape)}, m2 {tuple(m2.shape)}, S2 {tuple(S2.shape)}"
        )
    factor2, info2 = torch.linalg.cholesky_ex(_precise(S2))
    if not bool((info2 == 0).all()):
        factor1, info1 = torch.linalg.cholesky_ex(_precise(S1))
        if not bool((info1 == 0).all()):
            raise ValueError("bures_wasserstein_sq needs S1 or S2 positive definite in every pair of the batch")
        return factored_bures_wasserstein_sq(m2, S2, m1, S1, factor1)
    return factored_bures_wasserstein_sq(m1, S1, m2, S2, factor2)


def diagonal_bures_wasserstein_sq(
    m1: torch.Tensor, v1: torch.Tensor, m2: torch.Tensor, v2: torch.Tensor
) -> torch.Tensor:
    """Closed-form W₂² for diagonal covariances given as variances (…,k): ‖m1−m2‖² + ‖√v1 − √v2‖²."""
    return (m1 - m2).square().sum(-1) + (v1.sqrt() - v2.sqrt()).square().sum(-1)


class _GramCrossTerm(torch.autograd.Function):
    """tr Ŝ − 2 tr (S^½ Ŝ S^½)^½ per row from the n×n matrix G, in float64, with a hand-chained backward.

    G = (Y Yᵀ + X diag(w) Xᵀ)/(n−1) (Y = X·F̃, S = F̃F̃ᵀ + diag(w)); the centring null vector and
    padded slots are lifted to exactly τ (see ``lowrank_bures_wasserstein_sq``). Autograd through the
    ~40 small ops this takes cost more than the products themselves; the backward here is
    eigvalsh's V diag(g) Vᵀ chained into Y, X and w by hand, the same gradient in a few ops.
    """

    @staticmethod
    def forward(ctx, y, x, weights, counts, mask):  # noqa: D102 (autograd.Function protocol)
        y64, x64, counts64 = _precise(y), _precise(x), _precise(counts)
        weighted = x64 * (weights if isinstance(weights, float) else _precise(weights).unsqueeze(1))
        dof = counts64 - 1
        gram = torch.bmm(y64, y64.transpose(1, 2)).baddbmm_(weighted, x64.transpose(1, 2)).div_(dof.view(-1, 1, 1))
        trace_gram = _trace(gram)
        tau = (trace_gram / counts64).clamp_min(torch.finfo(gram.dtype).tiny)
        valid = _precise(mask)
        lifted = valid * (tau / counts64).unsqueeze(1)  # (τ/n)·𝟙 on the real slots: + τ𝟙𝟙ᵀ/n there
        gram.baddbmm_(lifted.unsqueeze(2), valid.unsqueeze(1))
        gram.diagonal(dim1=1, dim2=2).add_((1 - valid) * tau.unsqueeze(1))  # + τ on the padded slots
        eigenvalues, vectors = symmetric_eigh(gram)
        floor = (gram.shape[-1] * torch.finfo(gram.dtype).eps * trace_gram).clamp_min(torch.finfo(gram.dtype).tiny)
        real = eigenvalues > floor.unsqueeze(1)
        roots = torch.where(real, eigenvalues, 0.0).sqrt_()
        cross = roots.sum(-1) - (gram.shape[-1] - counts64 + 1) * tau.sqrt()
        ctx.save_for_backward(y64, x64, weighted, vectors, roots, dof)
        ctx.dtypes = (y.dtype, x.dtype, None if isinstance(weights, float) else weights.dtype)
        return x64.square().sum((1, 2)) / dof - 2 * cross

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        y64, x64, weighted, vectors, roots, dof = ctx.saved_tensors
        y_dtype, x_dtype, w_dtype = ctx.dtypes
        grad = grad.to(y64.dtype) / dof
        # d(−2 Σ√λ)/dλ = −1/√λ on real eigenvalues, 0 on the round-off ones (√ has no derivative there);
        # dG carries the 2 of d(YYᵀ)/dY, which d_w (linear in diag(w)) halves back
        real = roots > 0
        coefficient = torch.where(real, grad.unsqueeze(1) / torch.where(real, roots, 1.0), 0.0).mul_(-2)
        d_gram = torch.bmm(vectors * coefficient.unsqueeze(1), vectors.transpose(1, 2))  # 2·∂L/∂(YYᵀ), symmetric
        d_y = d_x = d_w = None
        if ctx.needs_input_grad[0]:
            d_y = torch.bmm(d_gram, y64).to(y_dtype)
        if ctx.needs_input_grad[1]:
            d_x = torch.bmm(d_gram, weighted).addcmul_(grad.view(-1, 1, 1), x64, value=2).to(x_dtype)
        if w_dtype is not None and ctx.needs_input_grad[2]:
            d_w = (torch.bmm(d_gram, x64) * x64).sum(1).mul_(0.5).to(w_dtype)
        return d_y, d_x, d_w, None, None


def anchor_rows(moments: ClassMoments, num_anchors: int) -> torch.Tensor | None:
    """The anchor of each moment row; None when the rows are the anchors in order (no gather needed).

    Pooled rows are sorted unique in-range classes, so P = C means row c is class c.
    """
    return None if moments.groups is None and moments.num == num_anchors else moments.classes


def gram_route(moments: ClassMoments) -> bool:
    """Whether the cross term goes through the n×n matrix G (n_max ≤ 1.25·k) rather than the k×k one.

    The n×n route is right for any n, but its cost grows with n and the k×k one's does not: on
    CPU (1 and 2 threads, full and low-rank anchors, k = 32…256, 10 classes) at n_max = 1.25·k the
    n×n route is 2 % slower to 30 % faster, at 1.5·k the k×k one is 3–23 % faster (``bench/fit_routes.py``).
    """
    _, n_max, k = moments.centred.shape
    return 4 * n_max <= 5 * k


def lowrank_bures_wasserstein_sq(
    moments: ClassMoments,
    anchor_means: torch.Tensor,
    anchor_factor: torch.Tensor,
    eps: float,
    factor_scale: torch.Tensor | None = None,
    anchor_diagonal: torch.Tensor | None = None,
    factor_norm_sq: torch.Tensor | None = None,
    batch_product: torch.Tensor | None = None,
) -> torch.Tensor:
    """W₂² (P,) from each batch class Gaussian to its anchor N(m_c, S_c), from small matrices.

    S_c = F̃_c F̃_cᵀ + diag(d_c) + εI with F̃_c = s_c·F_c: F = ``anchor_factor`` (C,k,k) for full
    anchors or (C,k,r) for low-rank ones, s = ``factor_scale`` (C,) (default 1: no product with it
    at all), d = ``anchor_diagonal`` (C,k) (default 0). ``factor_norm_sq`` (C,) is ‖F̃_c‖²_F when the
    caller has it (the anchors compute it for their norm clip); else it is computed here.
    ``batch_product`` is X·F[rows] (unscaled, rows from ``anchor_rows``) when the caller has it
    (``GaussianAnchors.factor_parts(batch=…)`` computes it with the factor's other products).
    The scale is applied to the small products, so F is only read by matrix products.
    When n_max ≤ 1.25·k (``gram_route``) the cross term is Σ √eig of the n×n matrix
    G = X S Xᵀ/(n−1); G·𝟙 = 0 (centring), so τ𝟙𝟙ᵀ/n on the real slots and τ on the diagonal of
    padded slots turn those zero eigenvalues into exactly τ without touching the others, and
    their √τ are subtracted (a class of n − 1 > k samples leaves n − 1 − k more zeros, which count
    as 0). Otherwise (few dimensions, many samples) the k×k route with chol(S) is cheaper. Either
    small matrix is formed and solved in float64 (``_precise``); the product X·F̃ is not.
    """
    x = moments.centred
    k = x.shape[-1]
    anchors = anchor_rows(moments, anchor_factor.shape[0])

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if anchors is None else tensor.index_select(0, anchors)

    if factor_norm_sq is None:
        factor_norm_sq = (anchor_factor * anchor_factor).sum((1, 2))
        if factor_scale is not None:
            factor_norm_sq = factor_norm_sq * factor_scale.square()
    scale = None if factor_scale is None else rows(factor_scale)[:, None, None]
    diagonal = None if anchor_diagonal is None else rows(anchor_diagonal)
    trace_anchor = rows(factor_norm_sq) + k * eps
    if diagonal is not None:
        trace_anchor = trace_anchor + diagonal.sum(-1)
    mean_term = (moments.means - rows(anchor_means)).square().sum(-1)
    if gram_route(moments):
        # the one (n×k)·(k×k or k×r) product stays in the training dtype
        y = batch_product if batch_product is not None else x @ rows(anchor_factor)
        if scale is not None:
            y = y * scale
        weights = eps if diagonal is None else diagonal + eps
        batch_minus_cross = _GramCrossTerm.apply(y, x, weights, moments.counts, moments.mask)
    else:
        factor = _precise(rows(anchor_factor))
        factor = factor if scale is None else factor * _precise(scale)
        ridge = eps * torch.eye(k, dtype=factor.dtype, device=factor.device)
        if diagonal is not None:
            ridge = ridge + torch.diag_embed(_precise(diagonal))
        chol = torch.linalg.cholesky(factor @ factor.transpose(1, 2) + ridge)
        x = _precise(x)
        dof = _precise(moments.counts - 1)
        inner = chol.transpose(1, 2) @ (x.transpose(1, 2) @ x / dof[:, None, None]) @ chol
        cross = _sqrt_eigenvalue_sum(inner, _trace(inner))
        batch_minus_cross = x.square().sum((1, 2)) / dof - 2 * cross
    return (_precise(mean_term + trace_anchor) + batch_minus_cross).to(moments.centred.dtype)


def diagonal_moments_bures_wasserstein_sq(
    moments: ClassMoments, anchor_means: torch.Tensor, anchor_variance: torch.Tensor
) -> torch.Tensor:
    """W₂² (P,) from each batch class's diagonal Gaussian (per-dimension variances) to its diagonal anchor.

    √v̂ is computed as ‖X_{:,j}‖/√(n−1), a norm, so its gradient stays finite (zero) at v̂ = 0.
    """
    classes = moments.classes
    dof = (moments.counts - 1).to(moments.centred.dtype)
    batch_std = torch.linalg.vector_norm(moments.centred, dim=1) / dof.sqrt()[:, None]
    mean_term = (moments.means - anchor_means.index_select(0, classes)).square().sum(-1)
    return mean_term + (batch_std - anchor_variance.index_select(0, classes).sqrt()).square().sum(-1)
