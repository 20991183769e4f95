"""C source of the CPU SparseMAP solver of the segmentation attention (compiled once per user by
:mod:`.cpu_sparsemap`).

The same algorithm, step for step, as the tensor solver ``_solve`` of :mod:`structattn.ops.sparsemap` (whose
docstring states the problem and the method), one row at a time, in float64:

* ``sm_forward``: per compacted row (the ``len`` real scores first), the active set on the vertex form
  max_{α ∈ △} sᵀα − ½ αᵀGα (G_ab = ⟨u_a, u_b⟩, the unary vectors' Gram matrix). The KKT system
  [[G_I, 1], [1ᵀ, 0]]·[β; τ] = [r; c] is solved through a Cholesky factor of G_I (positive definite: the active unary
  vectors stay affinely, hence — all lying on ⟨u, 1⟩ = L — linearly independent) and the Schur complement
  τ = (1ᵀG_I⁻¹r − c) / (1ᵀG_I⁻¹1): O(K²) per solve. The factor is updated, not recomputed, when a structure joins
  (one triangular solve for the new row) or leaves (Givens rotations that restore the triangle), O(K²) each, where the
  tensor solver re-solves the dense (K + 1)² system (O(K³)) every iteration. The MAP oracle, the hard 2-state Viterbi
  argmax with the same tie rules (a tie goes to the lower previous / final state), runs in the same loop. Structures
  are bitsets (64 positions a word), so a Gram entry L − |y_a| − |y_b| + 2⟨y_a, y_b⟩ costs a few popcounts.
  The slots (where a structure joins: the first free slot, or the pivoted one), the tolerance test, the stuck and
  pivot rules and the final stable sort by decreasing α are those of the tensor solver, so that both return the same
  active structures in the same order (they differ by float rounding in α and p only).
  Returns 0, or −1 when a workspace could not be allocated.
* ``sm_backward``: per row, the one KKT solve on the support (α > 0, a prefix of the sorted slots) with right-hand
  side (⟨y_a, g⟩)_a and 0: β; then ∂L/∂s_t = Σ_a β_a y_{a,t} and ∂L/∂T[i, j] = Σ_a β_a n_a[i, j] (transition counts).
  Returns 0, −1 (allocation), or −2 when a support's Gram matrix is not numerically positive definite (the caller
  then uses the tensor backward, whose least-norm fallback handles it).
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

typedef struct {
    int64_t K, W;
    uint64_t *Y, *ys, *bp0, *bp1;
    unsigned char *y0, *act;
    int64_t *ord, *idx;
    double *S, *alpha, *beta, *lam, *col, *G, *Lc, *x, *z, *p, *r;
} ws_t;

static void ws_free(ws_t *w)
{
    free(w->Y); free(w->ys); free(w->bp0); free(w->bp1); free(w->y0); free(w->act); free(w->ord); free(w->idx);
    free(w->S); free(w->alpha); free(w->beta); free(w->lam); free(w->col); free(w->G); free(w->Lc); free(w->x);
    free(w->z); free(w->p); free(w->r);
}

static int ws_alloc(ws_t *w, int64_t K, int64_t T)
{
    memset(w, 0, sizeof *w);
    int64_t W = (T + 63) / 64;
    if (W < 1) W = 1;
    w->K = K; w->W = W;
    w->Y = calloc((size_t)(K * W), sizeof(uint64_t)); w->ys = calloc((size_t)W, sizeof(uint64_t));
    w->bp0 = calloc((size_t)W, sizeof(uint64_t)); w->bp1 = calloc((size_t)W, sizeof(uint64_t));
    w->y0 = calloc((size_t)K, 1); w->act = calloc((size_t)K, 1);
    w->ord = calloc((size_t)K, sizeof(int64_t)); w->idx = calloc((size_t)K, sizeof(int64_t));
    w->S = calloc((size_t)K, sizeof(double)); w->alpha = calloc((size_t)K, sizeof(double));
    w->beta = calloc((size_t)K, sizeof(double)); w->lam = calloc((size_t)K, sizeof(double));
    w->col = calloc((size_t)K, sizeof(double)); w->G = calloc((size_t)(K * K), sizeof(double));
    w->Lc = calloc((size_t)(K * K), sizeof(double)); w->x = calloc((size_t)K, sizeof(double));
    w->z = calloc((size_t)K, sizeof(double)); w->p = calloc((size_t)(T > 0 ? T : 1), sizeof(double));
    w->r = calloc((size_t)K, sizeof(double));
    if (!w->Y || !w->ys || !w->bp0 || !w->bp1 || !w->y0 || !w->act || !w->ord || !w->idx || !w->S || !w->alpha ||
        !w->beta || !w->lam || !w->col || !w->G || !w->Lc || !w->x || !w->z || !w->p || !w->r) {
        ws_free(w);
        return -1;
    }
    return 0;
}

static inline int bit(const uint64_t *y, int64_t t) { return (int)((y[t >> 6] >> (t & 63)) & 1u); }

static inline int64_t popc(const uint64_t *y, int64_t W)
{
    int64_t c = 0;
    for (int64_t k = 0; k < W; ++k) c += __builtin_popcountll(y[k]);
    return c;
}

static inline int64_t popc_and(const uint64_t *a, const uint64_t *b, int64_t W)
{
    int64_t c = 0;
    for (int64_t k = 0; k < W; ++k) c += __builtin_popcountll(a[k] & b[k]);
    return c;
}

/* argmax_y sum_t (unary[t, y_t] + T[y_t, y_{t-1}]), y_{-1} = the free start state, with unary[t] =
   (-(1 - p_t), s_t - p_t) (p = NULL: p = 0): the tensor solver's oracle, same operations, same tie rules. */
static int oracle(int64_t L, int64_t W, const double *s, const double *tr, const double *p, uint64_t *ys,
                  uint64_t *bp0, uint64_t *bp1)
{
    const double T00 = tr[0], T01 = tr[1], T10 = tr[2], T11 = tr[3];
    double v0 = 0.0, v1 = 0.0;
    memset(bp0, 0, (size_t)W * sizeof(uint64_t));
    memset(bp1, 0, (size_t)W * sizeof(uint64_t));
    memset(ys, 0, (size_t)W * sizeof(uint64_t));
    for (int64_t t = 0; t < L; ++t) {
        double pt = p ? p[t] : 0.0;
        double u0 = -(1.0 - pt), u1 = s[t] - pt;
        double a0 = T00 + v0, b0 = T01 + v1, a1 = T10 + v0, b1 = T11 + v1;
        int c0 = b0 > a0, c1 = b1 > a1;
        if (c0) bp0[t >> 6] |= (uint64_t)1 << (t & 63);
        if (c1) bp1[t >> 6] |= (uint64_t)1 << (t & 63);
        v0 = (c0 ? b0 : a0) + u0;
        v1 = (c1 ? b1 : a1) + u1;
    }
    int y = v1 > v0;
    for (int64_t t = L - 1; t >= 0; --t) {
        if (y) ys[t >> 6] |= (uint64_t)1 << (t & 63);
        y = bit(y ? bp1 : bp0, t);
    }
    return y;
}

static double score(int64_t L, const uint64_t *y, int y0, const double *s, const double *tr)
{
    double a = 0.0, b = 0.0;
    int prev = y0;
    for (int64_t t = 0; t < L; ++t) {
        int c = bit(y, t);
        if (c) a += s[t];
        b += tr[2 * c + prev];
        prev = c;
    }
    return a + b;
}

/* <u_y, u> with u = [1 - p; p]: sum_t (y_t ? p_t : 1 - p_t). */
static double inner(int64_t L, const uint64_t *y, const double *p)
{
    double a = 0.0;
    for (int64_t t = 0; t < L; ++t) a += bit(y, t) ? p[t] : 1.0 - p[t];
    return a;
}

/* b := G_I^{-1} b with G_I = Lc Lc^T (n x n, row stride K). */
static void chol_solve(const double *Lc, int64_t n, int64_t K, double *b)
{
    for (int64_t i = 0; i < n; ++i) {
        double v = b[i];
        for (int64_t k = 0; k < i; ++k) v -= Lc[i * K + k] * b[k];
        b[i] = v / Lc[i * K + i];
    }
    for (int64_t i = n - 1; i >= 0; --i) {
        double v = b[i];
        for (int64_t k = i + 1; k < n; ++k) v -= Lc[k * K + i] * b[k];
        b[i] = v / Lc[i * K + i];
    }
}

/* z := G_I^{-1} 1; returns 1^T z. Depends on the factor only: one solve serves every KKT system of one factor. */
static double kkt_ones(const double *Lc, int64_t n, int64_t K, double *z)
{
    double sz = 0.0;
    for (int64_t i = 0; i < n; ++i) z[i] = 1.0;
    chol_solve(Lc, n, K, z);
    for (int64_t i = 0; i < n; ++i) sz += z[i];
    return sz;
}

/* [[G_I, 1], [1^T, 0]] [out; tau] = [r; c] through the factor: out = x - tau z, x = G_I^{-1} r, with z, sz from
   kkt_ones on the same factor. */
static void kkt_z(const double *Lc, int64_t n, int64_t K, const double *r, double c, double *out, const double *z,
                  double sz)
{
    double sx = 0.0;
    for (int64_t i = 0; i < n; ++i) out[i] = r[i];
    chol_solve(Lc, n, K, out);
    for (int64_t i = 0; i < n; ++i) sx += out[i];
    double tau = (sx - c) / sz;
    for (int64_t i = 0; i < n; ++i) out[i] -= tau * z[i];
}

static void kkt(const double *Lc, int64_t n, int64_t K, const double *r, double c, double *out, double *z)
{
    kkt_z(Lc, n, K, r, c, out, z, kkt_ones(Lc, n, K, z));
}

/* Append a row to the factor: g (n) the new structure's Gram entries with the active ones (factor order), d its
   squared norm. Returns 0, or -1 if the new diagonal is not numerically positive. */
static int chol_append(double *Lc, int64_t n, int64_t K, const double *g, double d)
{
    double *row = Lc + n * K;
    double sq = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        double v = g[i];
        for (int64_t k = 0; k < i; ++k) v -= Lc[i * K + k] * row[k];
        row[i] = v / Lc[i * K + i];
        sq += row[i] * row[i];
    }
    double piv = d - sq;
    if (!(piv > 1e-12 * (1.0 + d))) return -1;
    row[n] = sqrt(piv);
    return 0;
}

/* Remove position j of the factor (n x n -> n-1 x n-1): drop row j, then Givens rotations on columns (k, k+1),
   k = j..n-2, zero the superdiagonal that the shifted rows carry. */
static void chol_delete(double *Lc, int64_t n, int64_t K, int64_t j)
{
    for (int64_t i = j; i < n - 1; ++i) memcpy(Lc + i * K, Lc + (i + 1) * K, (size_t)(i + 2) * sizeof(double));
    for (int64_t k = j; k < n - 1; ++k) {
        double a = Lc[k * K + k], b = Lc[k * K + k + 1];
        double h = hypot(a, b), c = a / h, s = b / h;
        for (int64_t i = k; i < n - 1; ++i) {
            double u = Lc[i * K + k], v = Lc[i * K + k + 1];
            Lc[i * K + k] = c * u + s * v;
            Lc[i * K + k + 1] = -s * u + c * v;
        }
        Lc[k * K + k + 1] = 0.0;
    }
}

/* The KKT solve on the active set, in slot space: out[a] = the solution's entry of slot a (0 off the active set,
   for the first `used` slots: no slot beyond them has ever been filled) for the right-hand side [v[ord[0..n-1]]; 1].
   z, sz: kkt_ones of the factor; r, x: scratch of n entries. */
static inline void active_kkt(const double *Lc, int64_t n, int64_t K, int64_t used, const int64_t *ord,
                              const double *v, double *r, double *x, const double *z, double sz, double *out)
{
    for (int64_t i = 0; i < n; ++i) r[i] = v[ord[i]];
    kkt_z(Lc, n, K, r, 1.0, x, z, sz);
    for (int64_t a = 0; a < used; ++a) out[a] = 0.0;
    for (int64_t i = 0; i < n; ++i) out[ord[i]] = x[i];
}

/* Slot a leaves the active set: its factor position is deleted, the later positions move up. Returns the new n. */
static inline int64_t drop_active(double *Lc, int64_t n, int64_t K, int64_t *ord, unsigned char *act, double *alpha,
                                  int64_t a)
{
    int64_t j = 0;
    while (ord[j] != a) ++j;
    chol_delete(Lc, n, K, j);
    for (int64_t i = j; i < n - 1; ++i) ord[i] = ord[i + 1];
    act[a] = 0; alpha[a] = 0.0;
    return n - 1;
}

/* One compacted row. Outputs (sorted by decreasing alpha, stable): alpha (K), Y (K x T bytes), Y0 (K), p (T).
   `used`: slots 0..used-1 are the only ones ever filled (a structure joins in the first free slot or a pivoted one),
   so every per-slot loop stops there, in slot order as before (the slots beyond hold alpha = 0 and no structure:
   the results are the same bits as with loops over all K slots). */
static void solve_row(ws_t *w, int64_t L, int64_t T, const double *s, const double *tr, double tol,
                      int64_t max_iter, double *alpha_out, unsigned char *Y_out, unsigned char *Y0_out, double *p_out,
                      int32_t *iters_out, unsigned char *conv_out)
{
    const int64_t K = w->K, W = w->W;
    uint64_t *Y = w->Y, *ys = w->ys;
    unsigned char *y0 = w->y0, *act = w->act;
    int64_t *ord = w->ord, *idx = w->idx;
    double *S = w->S, *alpha = w->alpha, *beta = w->beta, *lam = w->lam, *col = w->col, *G = w->G, *Lc = w->Lc;
    double *x = w->x, *z = w->z, *p = w->p, *r = w->r;
    const double Ld = (double)L;
    memset(Y, 0, (size_t)(K * W) * sizeof(uint64_t));
    memset(y0, 0, (size_t)K);
    memset(act, 0, (size_t)K);
    for (int64_t a = 0; a < K; ++a) { alpha[a] = 0.0; S[a] = 0.0; }
    int32_t iters = 0;
    int conv = L == 0, done = conv;
    int64_t n = 0; /* active structures = factor size; ord[i] the slot of factor position i */
    int64_t used = 0;
    if (!done) {
        int y0s = oracle(L, W, s, tr, NULL, Y, w->bp0, w->bp1);
        y0[0] = (unsigned char)y0s;
        S[0] = score(L, Y, y0s, s, tr);
        alpha[0] = 1.0; act[0] = 1;
        G[0] = Ld;
        Lc[0] = sqrt(Ld);
        ord[0] = 0; n = 1; used = 1;
    }
    for (int64_t it = 0; it < max_iter && !done; ++it) {
        ++iters;
        /* beta: the KKT solution on the active set (z = G_I^{-1} 1 serves the second solve below too) */
        double sz = kkt_ones(Lc, n, K, z);
        active_kkt(Lc, n, K, used, ord, S, r, x, z, sz, beta);
        /* 1. a negative entry: step towards beta until the first alpha_a hits 0, drop that structure */
        int blocked = 0;
        int64_t drop = -1;
        double best = INFINITY;
        for (int64_t a = 0; a < used; ++a)
            if (act[a] && beta[a] < 0) {
                double den = alpha[a] - beta[a];
                double q = alpha[a] / (den > 1e-300 ? den : 1e-300);
                blocked = 1;
                if (q < best) { best = q; drop = a; }
            }
        double step = blocked ? (best < 0 ? 0.0 : (best > 1 ? 1.0 : best)) : 1.0;
        for (int64_t a = 0; a < used; ++a) {
            double v = alpha[a] + step * (beta[a] - alpha[a]);
            alpha[a] = act[a] && v > 0 ? v : 0.0;
        }
        if (blocked) n = drop_active(Lc, n, K, ord, act, alpha, drop);
        double tot = 0.0;
        for (int64_t a = 0; a < used; ++a) tot += alpha[a];
        for (int64_t a = 0; a < used; ++a) alpha[a] /= tot;
        if (blocked) { conv = 0; continue; }
        /* 2. alpha = beta: the oracle at u = sum_a alpha_a u_a, and the Frank-Wolfe gap */
        /* p_t = sum_a alpha_a y_a,t in slot order, visiting the set bits only (the terms alpha_a * 0 add +0 to a
           sum that is never -0: the same bits) */
        for (int64_t t = 0; t < L; ++t) p[t] = 0.0;
        for (int64_t a = 0; a < used; ++a) {
            if (!act[a]) continue;
            const uint64_t *ya = Y + a * W;
            const double al = alpha[a];
            for (int64_t k = 0; k < W; ++k)
                for (uint64_t m = ya[k]; m; m &= m - 1) p[64 * k + __builtin_ctzll(m)] += al;
        }
        int y0s = oracle(L, W, s, tr, p, ys, w->bp0, w->bp1);
        double ss = score(L, ys, y0s, s, tr);
        double val_new = ss - inner(L, ys, p);
        /* cur = sum_a alpha_a (S_a - <u_a, u>) = sum_a alpha_a S_a - ||u||^2 (u = sum_a alpha_a u_a, sum alpha = 1):
           O(L), not O(nL) (the dominant loop before); it differs from the per-structure sums by rounding (~1e-15
           relative), far below the tolerance of the gap test, the only place it enters */
        double cur = 0.0, uu = 0.0;
        for (int64_t a = 0; a < used; ++a)
            if (act[a]) cur += alpha[a] * S[a];
        for (int64_t t = 0; t < L; ++t) uu += p[t] * p[t] + (1.0 - p[t]) * (1.0 - p[t]);
        cur -= uu;
        double gap = val_new - cur;
        if (gap <= tol * (1.0 + fabs(cur))) { conv = 1; done = 1; break; }
        conv = 0;
        /* y* already active, or no free slot for an affinely independent y*: stop, not converged */
        int64_t ny = popc(ys, W);
        int same = 0;
        for (int64_t i = 0; i < n; ++i) {
            const int64_t a = ord[i];
            const uint64_t *ya = Y + a * W;
            col[a] = Ld - (double)popc(ya, W) - (double)ny + 2.0 * (double)popc_and(ya, ys, W);
            if (col[a] == Ld && y0[a] == y0s) same = 1;
        }
        /* lambda: the projection of u* on the affine hull of the active unary vectors; r2 its squared distance */
        active_kkt(Lc, n, K, used, ord, col, r, x, z, sz, lam);
        double lc = 0.0, lgl = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            double gi = 0.0;
            const double *Gi = G + ord[i] * K;
            for (int64_t k = 0; k < n; ++k) gi += Gi[ord[k]] * x[k];
            lc += x[i] * r[i];
            lgl += gi * x[i];
        }
        double r2 = Ld - 2.0 * lc + lgl;
        int dep = r2 <= 1e-8 * (1.0 + Ld);
        int full = n == K;
        if (same || (full && !dep)) { done = 1; break; }
        /* add y*: with weight 0 in the first free slot, or by a pivot that swaps it for one active structure */
        int64_t target = -1;
        double tp = 0.0;
        if (dep) {
            double bt = INFINITY;
            int64_t pd = -1;
            for (int64_t a = 0; a < used; ++a)
                if (act[a] && lam[a] > 1e-12) {
                    double q = alpha[a] / lam[a];
                    if (q < bt) { bt = q; pd = a; }
                }
            if (pd < 0) { done = 1; break; } /* cannot happen (sum lambda = 1); never add a singular structure */
            tp = bt;
            for (int64_t a = 0; a < used; ++a) {
                double v = alpha[a] - tp * lam[a];
                alpha[a] = v > 0 ? v : 0.0;
            }
            n = drop_active(Lc, n, K, ord, act, alpha, pd);
            target = pd;
        } else {
            for (int64_t a = 0; a < K; ++a)
                if (!act[a]) { target = a; break; }
        }
        if (target >= used) used = target + 1;
        memcpy(Y + target * W, ys, (size_t)W * sizeof(uint64_t));
        y0[target] = (unsigned char)y0s;
        S[target] = ss;
        alpha[target] = tp;
        /* the new structure's Gram entries with the active ones (the only ones ever read) and itself */
        for (int64_t i = 0; i < n; ++i) {
            const int64_t a = ord[i];
            const uint64_t *ya = Y + a * W;
            double g = Ld - (double)popc(ya, W) - (double)ny + 2.0 * (double)popc_and(ya, ys, W);
            G[target * K + a] = g;
            G[a * K + target] = g;
        }
        G[target * K + target] = Ld;
        for (int64_t i = 0; i < n; ++i) r[i] = G[target * K + ord[i]];
        if (chol_append(Lc, n, K, r, Ld) != 0) { alpha[target] = 0.0; done = 1; break; } /* numerically singular */
        act[target] = 1;
        ord[n++] = target;
    }
    /* the filled slots by decreasing alpha (stable: insertion sort); the never-filled ones (alpha = 0, no structure)
       stay after them in slot order, as a stable sort of all K slots puts them */
    for (int64_t a = 0; a < used; ++a) {
        int64_t j = a;
        while (j > 0 && alpha[idx[j - 1]] < alpha[a]) { idx[j] = idx[j - 1]; --j; }
        idx[j] = a;
    }
    for (int64_t t = 0; t < T; ++t) p_out[t] = 0.0;
    for (int64_t k = 0; k < used; ++k) {
        int64_t a = idx[k];
        const uint64_t *ya = Y + a * W;
        unsigned char *yo = Y_out + k * T;
        alpha_out[k] = alpha[a];
        Y0_out[k] = y0[a];
        for (int64_t t = 0; t < L; ++t) yo[t] = (unsigned char)bit(ya, t);
        memset(yo + L, 0, (size_t)(T - L));
        if (alpha[a] != 0.0)
            for (int64_t t = 0; t < L; ++t) p_out[t] += alpha[a] * (double)yo[t];
    }
    for (int64_t k = used; k < K; ++k) alpha_out[k] = 0.0;
    memset(Y0_out + used, 0, (size_t)(K - used));
    memset(Y_out + used * T, 0, (size_t)((K - used) * T));
    *iters_out = iters;
    *conv_out = (unsigned char)conv;
}

int sm_forward(int64_t N, int64_t T, int64_t K, const double *s, const double *trans, int64_t tstride,
               const int64_t *lengths, double tol, int64_t max_iter, double *alpha, unsigned char *Y,
               unsigned char *Y0, double *p, int32_t *iters, unsigned char *conv)
{
    ws_t w;
    if (ws_alloc(&w, K, T) != 0) return -1;
    for (int64_t b = 0; b < N; ++b)
        solve_row(&w, lengths[b], T, s + b * T, trans + b * tstride, tol, max_iter, alpha + b * K, Y + b * K * T,
                  Y0 + b * K, p + b * T, iters + b, conv + b);
    ws_free(&w);
    return 0;
}

int sm_backward(int64_t N, int64_t T, int64_t K, const double *gp, const unsigned char *Y, const unsigned char *Y0,
                const double *alpha, const int64_t *lengths, double *gs, double *gT)
{
    const int64_t W = T > 0 ? (T + 63) / 64 : 1;
    double *G = malloc((size_t)(K * K + 3 * K + 1) * sizeof(double));
    uint64_t *Yb = malloc((size_t)(K * W) * sizeof(uint64_t)); /* the support's structures as bitsets */
    if (!G || !Yb) { free(G); free(Yb); return -1; }
    double *r = G + K * K, *b = r + K, *z = b + K;
    int rc = 0;
    for (int64_t row = 0; row < N && rc == 0; ++row) {
        const int64_t L = lengths[row];
        const unsigned char *Yr = Y + row * K * T, *Y0r = Y0 + row * K;
        const double *g = gp + row * T, *al = alpha + row * K;
        double *gsr = gs + row * T, *gTr = gT + 4 * row;
        int64_t k = 0;
        while (k < K && al[k] > 0) ++k;
        for (int64_t t = 0; t < T; ++t) gsr[t] = 0.0;
        for (int i = 0; i < 4; ++i) gTr[i] = 0.0;
        if (k == 0 || L == 0) continue;
        /* Gram matrix of the support, factorised in place (lower triangle): the agreement counts
           #{t < L : y_a,t = y_c,t} = L - |y_a| - |y_c| + 2|y_a & y_c| by popcounts of bitsets (exact integers) */
        for (int64_t a = 0; a < k; ++a) {
            const unsigned char *ya = Yr + a * T;
            uint64_t *ba = Yb + a * W;
            memset(ba, 0, (size_t)W * sizeof(uint64_t));
            for (int64_t t = 0; t < L; ++t) ba[t >> 6] |= (uint64_t)(ya[t] != 0) << (t & 63);
            r[a] = 0.0;
        }
        /* r_a = sum_t y_a,t g_t, each in t order as before, the k sums advancing together (independent chains) and
           without data-dependent branches; adding +0 to a sum that is never -0 changes no bit */
        for (int64_t t = 0; t < L; ++t) {
            const double gt = g[t];
            for (int64_t a = 0; a < k; ++a) r[a] += Yr[a * T + t] ? gt : 0.0;
        }
        for (int64_t a = 0; a < k; ++a) {
            const uint64_t *ba = Yb + a * W;
            const int64_t na = popc(ba, W);
            for (int64_t c = 0; c <= a; ++c) {
                const uint64_t *bc = Yb + c * W;
                G[a * K + c] = (double)(L - na - popc(bc, W) + 2 * popc_and(ba, bc, W));
            }
        }
        for (int64_t j = 0; j < k && rc == 0; ++j) {
            double d = G[j * K + j];
            for (int64_t m = 0; m < j; ++m) d -= G[j * K + m] * G[j * K + m];
            if (!(d > 1e-12 * (1.0 + (double)L))) { rc = -2; break; }
            d = sqrt(d);
            G[j * K + j] = d;
            for (int64_t i = j + 1; i < k; ++i) {
                double v = G[i * K + j];
                for (int64_t m = 0; m < j; ++m) v -= G[i * K + m] * G[j * K + m];
                G[i * K + j] = v / d;
            }
        }
        if (rc) break;
        kkt(G, k, K, r, 0.0, b, z);
        for (int64_t a = 0; a < k; ++a) {
            const unsigned char *ya = Yr + a * T;
            const double ba_ = b[a];
            for (int64_t t = 0; t < L; ++t) gsr[t] += ya[t] ? ba_ : 0.0;
            /* transition counts c4[2 y_t + y_{t-1}] by popcounts: v the bits y_t, u the bits y_{t-1} (y_{-1} the
               start state), both over t < L */
            const uint64_t *bv = Yb + a * W;
            uint64_t carry = Y0r[a] ? 1u : 0u;
            int64_t c4[4] = {0, 0, 0, 0};
            for (int64_t kw = 0; kw < W; ++kw) {
                const int64_t left = L - 64 * kw;
                if (left <= 0) break;
                const uint64_t m = left >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << left) - 1);
                const uint64_t v = bv[kw], u = ((v << 1) | carry) & m;
                carry = v >> 63;
                c4[3] += __builtin_popcountll(v & u);
                c4[2] += __builtin_popcountll(v & ~u & m);
                c4[1] += __builtin_popcountll(~v & u & m);
                c4[0] += __builtin_popcountll(~v & ~u & m);
            }
            for (int i = 0; i < 4; ++i) gTr[i] += ba_ * (double)c4[i];
        }
    }
    free(G);
    free(Yb);
    return rc;
}
"""


def source() -> str:
    """The full C translation unit (float64 only: the solver works in float64 whatever the scores' dtype)."""
    return SOURCE
