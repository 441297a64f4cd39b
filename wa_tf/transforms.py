"""Winograd (Cook-Toom) transform matrices, in pure numpy float64.

A 1-D Winograd correlation F(m, r) computes ``m`` outputs of a length-``r``
filter ``g`` over an input tile ``d`` of length ``t = m + r - 1`` as::

    y = A_t @ ((G @ g) * (B_t @ d))

and the 2-D nested form F(m x m, r x r) as ``Y = A_t [(G g G^T) * (B_t d B_t^T)] A_t^T``.

The matrices come from evaluating polynomials at ``t - 1`` finite points and
at infinity (the modified Toom-Cook construction of Lavin & Gray, 2016, and
Barabasz et al., 2018).  With ``V_k`` the ``t x k`` matrix that evaluates a
polynomial of ``k`` coefficients at the points (the point at infinity picks the
leading coefficient: the row ``[0, ..., 0, 1]``) and ``V = V_t``::

    A_t = V_m^T                   (m x t)
    G   = diag(1/f) V_r           (t x r)
    B_t = diag(f) V^-T            (t x t)

where ``f_k = prod_{l != k} (p_k - p_l)`` over the finite points (``f = 1`` at
infinity).  The scaling by ``f`` keeps ``B_t`` integer for integer points, as in
Lavin's published matrices; it does not change the product, so the algorithm is
exact for any distinct points.
"""

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

# Winograd-domain tensors of the 2-D pipeline that can carry a quantizer, in
# pipeline order: U = G g G^T, V = B_t d B_t^T and the element-wise stage M = U * V.
STAGES = ("weights_winograd", "input_winograd", "hadamard")

# Default interpolation points (the point at infinity is always appended).
# F2 and F4 use Lavin & Gray's points; F6 uses 0, +-1, +-2, +-1/2, the
# best-conditioned well-known choice for 8-point Winograd (Barabasz et al.,
# 2018).  The reference implementation's F6 used 0, +-1, +-2, +-3/2 with a
# hand-made diagonal scaling that does not compute a convolution at all.
DEFAULT_POINTS = {
    2: (0.0, 1.0, -1.0),
    4: (0.0, 1.0, -1.0, 2.0, -2.0),
    6: (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5),
}

# Lavin & Gray's F(2x2, 3x3) differs from the generic scaling by signs only:
# scale rows of G and columns of A_t by these, rows of B_t by their product.
_F2_SIGNS = (np.array([-1.0, 1.0, 1.0, 1.0]), np.array([1.0, 1.0, 1.0, -1.0]))


def default_points(m: int, r: int) -> Tuple[float, ...]:
    """Returns the default finite interpolation points for F(m, r).

    Known tile sizes use the tables above; any other (m, r) uses
    ``0, 1, -1, 2, -2, 1/2, -1/2, 3, -3, 1/3, -1/3, ...`` (small integers and
    their reciprocals keep the transforms well conditioned).

    Args:
      m: Output tile size.
      r: Filter size.

    Returns:
      A tuple of ``m + r - 2`` distinct floats.
    """
    n = m + r - 2
    if r == 3 and m in DEFAULT_POINTS:
        return DEFAULT_POINTS[m]
    pts = [0.0]
    k = 1
    while len(pts) < n:
        for p in (k, -k) if k == 1 else (k, -k, 1.0 / k, -1.0 / k):
            if len(pts) < n:
                pts.append(float(p))
        k += 1
    return tuple(pts)


def is_int(value) -> bool:
    """True for a Python or NumPy integer, False for anything else (bools included)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_tile_size(m, name: str = "tile size m") -> int:
    """Returns the output tile size ``m`` as an int, or raises ValueError unless it is >= 1."""
    if not is_int(m) or m < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {m!r}")
    return int(m)


def _check_sizes(m, r):
    check_tile_size(m)
    if not is_int(r) or r < 1 or r % 2 == 0:
        raise ValueError(f"filter size r must be an odd integer >= 1, got {r!r}")


def _vandermonde(pts: np.ndarray, cols: int) -> np.ndarray:
    """Evaluation matrix of polynomials with ``cols`` coefficients at ``pts`` and infinity.

    At infinity a polynomial "evaluates" to its leading coefficient.
    """
    V = np.zeros((pts.size + 1, cols))
    V[:-1] = pts[:, None] ** np.arange(cols)[None, :]
    V[-1, -1] = 1.0
    return V


def winograd_matrices(m: int, r: int, points: Optional[Sequence[float]] = None
                      ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Builds the Winograd transforms of F(m x m, r x r) by Cook-Toom.

    Args:
      m: Output tile size (``m >= 1``).
      r: Filter size (odd, ``r >= 1``).
      points: ``m + r - 2`` distinct finite interpolation points; the point at
        infinity is added.  ``None`` uses :func:`default_points`.

    Returns:
      ``(A_t, B_t, G)`` as float64 arrays of shapes ``(m, t)``, ``(t, t)`` and
      ``(t, r)`` with ``t = m + r - 1``.

    Raises:
      ValueError: for bad sizes, a wrong number of points, repeated or
        non-finite points.
    """
    _check_sizes(m, r)
    t = m + r - 1
    use_defaults = points is None
    if use_defaults:
        points = default_points(m, r)
    try:
        pts = np.asarray(points, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"points must be a sequence of numbers, got {points!r}") from None
    if pts.size != t - 1:
        raise ValueError(
            f"F({m}, {r}) needs {t - 1} finite points (the point at infinity is "
            f"added), got {pts.size}: {list(pts)}")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"points must be finite numbers, got {list(pts)}")
    if len(np.unique(pts)) != pts.size:
        raise ValueError(f"points must be distinct, got {list(pts)}")

    V = _vandermonde(pts, t)
    f = np.ones(t)
    f[:-1] = [np.prod([p - q for q in pts if q != p]) for p in pts]
    cond = np.linalg.cond(V)
    if not np.isfinite(cond) or cond > 1e12:
        raise ValueError(f"points {list(pts)} give a singular Vandermonde matrix")

    A_t = _vandermonde(pts, m).T
    G = _vandermonde(pts, r) / f[:, None]
    B_t = f[:, None] * np.linalg.inv(V).T
    if use_defaults and (m, r) == (2, 3):
        sg, sa = _F2_SIGNS
        G, A_t, B_t = sg[:, None] * G, A_t * sa[None, :], (sg * sa)[:, None] * B_t
    # Cancel rounding noise so integer entries are exact (Lavin's matrices).
    B_t = np.where(np.abs(B_t - np.round(B_t)) < 1e-9, np.round(B_t), B_t)
    # `+ 0.0` turns negative zeros into zeros, for readable printouts.
    return A_t + 0.0, B_t + 0.0, G + 0.0


def winograd_correlate_1d(d: np.ndarray, g: np.ndarray, A_t, B_t, G) -> np.ndarray:
    """1-D Winograd correlation of one tile ``d`` (length t) with ``g``."""
    return A_t @ ((G @ g) * (B_t @ d))


def winograd_correlate_2d(d: np.ndarray, g: np.ndarray, A_t, B_t, G) -> np.ndarray:
    """2-D nested Winograd correlation of one ``t x t`` tile with an ``r x r`` filter."""
    return A_t @ ((G @ g @ G.T) * (B_t @ d @ B_t.T)) @ A_t.T


def multiplies(m: int, r: int) -> Tuple[int, int]:
    """Returns (Winograd, direct) multiplies for one m x m output tile, per channel pair."""
    return (m + r - 1) ** 2, (m * r) ** 2


class TileGeometry(NamedTuple):
    """How F(m x m, r x r) tiles an input (see :func:`tile_geometry`)."""

    out_h: int  # output height
    out_w: int  # output width
    n_h: int  # tile rows, ceil(out_h / m)
    n_w: int  # tile columns
    pad_top: int  # zero rows above the input
    pad_left: int  # zero columns left of the input
    extra: int  # m-blocks a t x t tile reaches past its own, ceil((r - 1) / m)


def tile_geometry(height, width, m: int, r: int, padding: str) -> TileGeometry:
    """Output size, tile counts and padding of a stride-1 Winograd convolution.

    Tile (i, j) reads the padded input rows ``i*m .. i*m + t - 1`` (and the same
    columns), ``t = m + r - 1``; 'same' pads ``(r - 1) // 2`` zeros before the
    input, as ``tf.nn.conv2d``.  ``height`` and ``width`` may be scalar tensors.

    Args:
      height, width: Input spatial size.
      m: Output tile size.
      r: Filter size (odd).
      padding: 'same' or 'valid'.

    Returns:
      A :class:`TileGeometry`.
    """
    if padding == "same":
        out_h, out_w, pad = height, width, (r - 1) // 2
    else:
        out_h, out_w, pad = height - r + 1, width - r + 1, 0
    n_h = (out_h + m - 1) // m
    n_w = (out_w + m - 1) // m
    extra = -(-(r - 1) // m)
    return TileGeometry(out_h, out_w, n_h, n_w, pad, pad, extra)
