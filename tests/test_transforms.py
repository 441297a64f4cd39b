"""Cook-Toom transforms against direct correlation and Lavin's published matrices."""
import numpy as np
import pytest

from wa_tf import transforms

# Lavin & Gray (2016), F(2x2, 3x3) and F(4x4, 3x3).
LAVIN = {
    2: (np.array([[1, 1, 1, 0], [0, 1, -1, -1]]),
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]])),
    4: (np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]]),
        np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])),
}


def direct_1d(d, g):
    r = len(g)
    return np.array([np.dot(d[i:i + r], g) for i in range(len(d) - r + 1)])


def direct_2d(d, g):
    r = g.shape[0]
    n = d.shape[0] - r + 1
    return np.array([[np.sum(d[i:i + r, j:j + r] * g) for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("m", [2, 4])
def test_defaults_equal_lavin(m):
    for ours, lavin in zip(transforms.winograd_matrices(m, 3), LAVIN[m]):
        np.testing.assert_allclose(ours, lavin, atol=1e-15)


CASES = [(2, 3, None), (4, 3, None), (6, 3, None), (2, 5, None), (4, 5, None), (1, 3, None),
         (3, 1, None), (3, 3, None), (8, 3, None),
         (2, 3, [0.5, -1, 3]), (4, 3, [0, 1, -1, 0.5, -0.5]), (6, 3, [0, 1, -1, 2, -2, 3, -3]),
         (4, 5, [0, 1, -1, 2, -2, 0.5, -0.5])]


@pytest.mark.parametrize("m,r,points", CASES)
def test_exact_correlation_float64(m, r, points):
    rng = np.random.default_rng(0)
    a_t, b_t, g_mat = transforms.winograd_matrices(m, r, points)
    t = m + r - 1
    tol = 1e-12 if t <= 8 else 1e-10  # rounding grows with the points' magnitude
    assert a_t.shape == (m, t) and b_t.shape == (t, t) and g_mat.shape == (t, r)
    for _ in range(5):
        d, g = rng.standard_normal(t), rng.standard_normal(r)
        np.testing.assert_allclose(transforms.winograd_correlate_1d(d, g, a_t, b_t, g_mat),
                                   direct_1d(d, g), atol=tol, rtol=0)
        d2, g2 = rng.standard_normal((t, t)), rng.standard_normal((r, r))
        out = transforms.winograd_correlate_2d(d2, g2, a_t, b_t, g_mat)
        np.testing.assert_allclose(out, direct_2d(d2, g2), atol=10 * tol, rtol=0)


def test_f6_is_a_convolution_and_well_conditioned():
    """The default F(6x6, 3x3), tiled over a multi-channel image, is its correlation."""
    a_t, b_t, g_mat = transforms.winograd_matrices(6, 3)
    rng = np.random.default_rng(6)
    m, r, t, channels = 6, 3, 8, 3
    size = 3 * m + r - 1  # 3 x 3 output tiles
    image = rng.standard_normal((size, size, channels))
    kernel = rng.standard_normal((r, r, channels))
    # Direct correlation, summed over channels, by loops.
    direct = np.zeros((size - r + 1, size - r + 1))
    for i in range(size - r + 1):
        for j in range(size - r + 1):
            for c in range(channels):
                for u in range(r):
                    for v in range(r):
                        direct[i, j] += image[i + u, j + v, c] * kernel[u, v, c]
    # Winograd: each m x m output tile from its t x t input tile; the element-wise
    # products are summed over channels in the Winograd domain, as a layer does.
    tiled = np.zeros_like(direct)
    for i in range(0, size - r + 1, m):
        for j in range(0, size - r + 1, m):
            acc = np.zeros((t, t))
            for c in range(channels):
                u_mat = g_mat @ kernel[:, :, c] @ g_mat.T
                v_mat = b_t @ image[i:i + t, j:j + t, c] @ b_t.T
                acc += u_mat * v_mat
            tiled[i:i + m, j:j + m] = a_t @ acc @ a_t.T
    assert np.abs(direct).max() > 1  # a non-trivial image
    np.testing.assert_allclose(tiled, direct, atol=1e-10, rtol=0)
    # The default F6 points keep B_t far better conditioned than e.g. 0..+-3.
    worse = transforms.winograd_matrices(6, 3, [0, 1, -1, 2, -2, 3, -3])[1]
    assert np.linalg.cond(b_t) < np.linalg.cond(worse)


@pytest.mark.parametrize("m,r,points,match", [
    (4, 3, [0, 1, -1, 2], "needs 5 finite points"),
    (4, 3, [0, 1, 1, 2, -2], "distinct"),
    (2, 3, [0, 1, float("nan")], "finite"),
    (2, 3, ["a", 1, 2], "sequence of numbers"),
    (0, 3, None, "tile size m"),
    (2, 4, None, "odd"),
    (2, 0, None, "odd"),
])
def test_bad_arguments(m, r, points, match):
    with pytest.raises(ValueError, match=match):
        transforms.winograd_matrices(m, r, points)


def test_multiplies():
    assert transforms.multiplies(4, 3) == (36, 144)
