"""C source of the CPU DTW_Ω kernels (compiled once per user by :mod:`structattn.ops.kernels.cpu_dtw`).

Anti-diagonal wavefront (ICML 2018 App. B.3, Alg. 5, reordered): all cells (i, d − i) of a diagonal d depend only on
diagonals d − 1 and d − 2, so one diagonal is one ``#pragma omp simd`` loop (libmvec's vector exp/log where glibc
has them, as in :mod:`._cpu_source`). Values are stored by diagonals (``dtw_rows``: each diagonal's cells plus one
guard slot on each side, about one number per cell); indexed through a row pointer whose slot i + 1 holds row i,
the parents of slot i + 1 are slot i + 1 of row d − 1 (left), slot i of row d − 2 (diag) and slot i of row d − 1
(up); rows −2, −1 are the borders (−∞ everywhere but the start node v_{0,0} = 0). After each diagonal its two guard
slots are set to −∞, which is all the reads outside the diagonal's cells ever see. Each pair uses its own lengths
(n, m) inside a block sized for the batch's (N, M), N ≤ M. The backward and HVP sweeps keep their per-pair scratch
(one pair at a time) dense, stride N + 2.

The body is instantiated for float and double like the Viterbi kernels (``real``/``SFX``/``EXP``/``LOG``).
"""

_BODY = r"""
/* q = grad max_Omega(a, b, c) (left, diag, up), written once for the weight sweeps below. Macros, not inline
   functions: GCC vectorises the loops that expand them. Entropy: softmax((x - max)/g). l2: sparsemax of 3 without
   sorting (the largest z is 0, s2 the median, s3 the smallest; supports of size 1, 2, 3 have thresholds -1,
   (s2 - 1)/2, (s2 + s3 - 1)/3, nested tests); -inf entries get weight 0. */
#define Q3_ENT(a, b, c, ig, qa, qb, qc) do {                                                                       \
        real mx_ = (a) > (b) ? (a) : (b);                                                                          \
        mx_ = mx_ > (c) ? mx_ : (c);                                                                               \
        real ea_ = EXP(((a) - mx_) * (ig)), eb_ = EXP(((b) - mx_) * (ig)), ec_ = EXP(((c) - mx_) * (ig));          \
        real inv_ = (real)1 / (ea_ + eb_ + ec_);                                                                   \
        qa = ea_ * inv_; qb = eb_ * inv_; qc = ec_ * inv_;                                                         \
    } while (0)
#define Q3_L2(a, b, c, ig, qa, qb, qc) do {                                                                        \
        real mx_ = (a) > (b) ? (a) : (b);                                                                          \
        mx_ = mx_ > (c) ? mx_ : (c);                                                                               \
        real za_ = ((a) - mx_) * (ig), zb_ = ((b) - mx_) * (ig), zc_ = ((c) - mx_) * (ig);                         \
        real mn_ = za_ < zb_ ? za_ : zb_, mab_ = za_ < zb_ ? zb_ : za_;                                            \
        real t_ = mab_ < zc_ ? mab_ : zc_;                                                                         \
        real s2_ = mn_ > t_ ? mn_ : t_, s3_ = mn_ < zc_ ? mn_ : zc_;                                               \
        real t2_ = (s2_ - (real)1) * (real)0.5;                                                                    \
        real tau_ = s3_ > t2_ ? (s2_ + s3_ - (real)1) / (real)3 : (s2_ > (real)-1 ? t2_ : (real)-1);                \
        real ra_ = za_ - tau_, rb_ = zb_ - tau_, rc_ = zc_ - tau_;                                                 \
        qa = ra_ > 0 ? ra_ : 0; qb = rb_ > 0 ? rb_ : 0; qc = rc_ > 0 ? rc_ : 0;                                    \
    } while (0)
/* Zero the padded cells of a pair's (N, M) block of an output allocated uninitialised (rows i < n: columns j >= m;
   rows i >= n: all), so that the outputs need no separate zero-filling pass. */
static void zero_padding_SFX(int64_t n, int64_t m, int64_t N, int64_t M, real *X)
{
    if (m < M)
        for (int64_t i = 0; i < n; i++) memset(X + i * M + m, 0, sizeof(real) * (size_t)(M - m));
    if (N > n) memset(X + n * M, 0, sizeof(real) * (size_t)((N - n) * M));
}

/* Alg. 5 forward over one pair: W (its packed block, see dtw_rows) and the value v_{n,m}. */
VEC_CLONES
static real dtw_fwd_pair_SFX(int64_t n, int64_t m, int64_t M, const int64_t *X, const real *th, int l2, real g,
                             real *W)
{
    const real ig = (real)1 / g; /* multiply by 1/γ: a division per use costs more than the exp it feeds */
    const int64_t D = n + m - 1;
    const int64_t st = M - 1; /* theta[i][d - i] = th[d + i * (M - 1)] */
    for (int64_t k = 0; k < 6; k++) W[k] = -INFINITY;
    W[0] = 0; /* the start node: diag parent of cell (0, 0) */
    for (int64_t d = 0; d < D; d++) {
        const int64_t lo = d - m + 1 > 0 ? d - m + 1 : 0, hi = d < n - 1 ? d : n - 1;
        real *cur = W + X[d + 2];
        const real *p1 = W + X[d + 1], *p2 = W + X[d], *thd = th + d;
        cur[lo] = -INFINITY;
        cur[hi + 2] = -INFINITY;
        if (!l2) {
            #pragma omp simd
            for (int64_t i = lo; i <= hi; i++) {
                real a = p1[i + 1], b = p2[i], c = p1[i];
                real mx = a > b ? a : b;
                mx = mx > c ? mx : c;
                real s = EXP((a - mx) * ig) + EXP((b - mx) * ig) + EXP((c - mx) * ig);
                cur[i + 1] = thd[i * st] + (mx + g * LOG(s));
            }
        } else {
            #pragma omp simd
            for (int64_t i = lo; i <= hi; i++) {
                real a = p1[i + 1], b = p2[i], c = p1[i];
                real mx = a > b ? a : b;
                mx = mx > c ? mx : c;
                real za = (a - mx) * ig, zb = (b - mx) * ig, zc = (c - mx) * ig;
                /* sparsemax of 3 without sorting: the largest is 0, s2 the median, s3 the smallest; support sizes
                   1, 2, 3 have thresholds -1, (s2 - 1)/2, (s2 + s3 - 1)/3 (nested tests). -inf entries never enter. */
                real mn = za < zb ? za : zb, mxab = za < zb ? zb : za;
                real t = mxab < zc ? mxab : zc;
                real s2 = mn > t ? mn : t;
                real s3 = mn < zc ? mn : zc;
                real t2 = (s2 - (real)1) * (real)0.5;
                real tau = s3 > t2 ? (s2 + s3 - (real)1) / (real)3 : (s2 > (real)-1 ? t2 : (real)-1);
                real qa = za - tau, qb = zb - tau, qc = zc - tau;
                qa = qa > 0 ? qa : 0; qb = qb > 0 ? qb : 0; qc = qc > 0 ? qc : 0;
                /* <q, z> - |q|^2/2 = tau + |q|^2/2 on the support (sum q = 1): no 0 * (-inf) */
                cur[i + 1] = thd[i * st] + (mx + g * (tau + (real)0.5 * (qa * qa + qb * qb + qc * qc)));
            }
        }
    }
    return W[X[D + 1] + n];
}

/* Alg. 5 forward over one pair, also storing q = grad max_Omega of every cell in Ql, Qd, Qu (packed like W, zero in
   the guard slots), so that the backward sweep of the fused marginals reads the weights instead of recomputing them
   (three exponentials per cell fewer). */
VEC_CLONES
static real dtw_fwdq_pair_SFX(int64_t n, int64_t m, int64_t M, const int64_t *X, const real *th, int l2, real g,
                              real *W, real *Ql, real *Qd, real *Qu)
{
    const real ig = (real)1 / g;
    const int64_t D = n + m - 1;
    const int64_t st = M - 1;
    for (int64_t k = 0; k < 6; k++) W[k] = -INFINITY;
    W[0] = 0;
    for (int64_t d = 0; d < D; d++) {
        const int64_t lo = d - m + 1 > 0 ? d - m + 1 : 0, hi = d < n - 1 ? d : n - 1;
        real *cur = W + X[d + 2], *ql = Ql + X[d + 2], *qd = Qd + X[d + 2], *qu = Qu + X[d + 2];
        const real *p1 = W + X[d + 1], *p2 = W + X[d], *thd = th + d;
        cur[lo] = -INFINITY;
        cur[hi + 2] = -INFINITY;
        ql[lo] = qd[lo] = qu[lo] = 0;
        ql[hi + 2] = qd[hi + 2] = qu[hi + 2] = 0;
        if (!l2) {
            #pragma omp simd
            for (int64_t i = lo; i <= hi; i++) {
                real a = p1[i + 1], b = p2[i], c = p1[i];
                real mx = a > b ? a : b;
                mx = mx > c ? mx : c;
                real ea = EXP((a - mx) * ig), eb = EXP((b - mx) * ig), ec = EXP((c - mx) * ig);
                real s = ea + eb + ec, inv = (real)1 / s;
                cur[i + 1] = thd[i * st] + (mx + g * LOG(s));
                ql[i + 1] = ea * inv; qd[i + 1] = eb * inv; qu[i + 1] = ec * inv;
            }
        } else {
            #pragma omp simd
            for (int64_t i = lo; i <= hi; i++) {
                real a = p1[i + 1], b = p2[i], c = p1[i];
                real mx = a > b ? a : b;
                mx = mx > c ? mx : c;
                real za = (a - mx) * ig, zb = (b - mx) * ig, zc = (c - mx) * ig;
                real mn = za < zb ? za : zb, mxab = za < zb ? zb : za;
                real t = mxab < zc ? mxab : zc;
                real s2 = mn > t ? mn : t;
                real s3 = mn < zc ? mn : zc;
                real t2 = (s2 - (real)1) * (real)0.5;
                real tau = s3 > t2 ? (s2 + s3 - (real)1) / (real)3 : (s2 > (real)-1 ? t2 : (real)-1);
                real qa = za - tau, qb = zb - tau, qc = zc - tau;
                qa = qa > 0 ? qa : 0; qb = qb > 0 ? qb : 0; qc = qc > 0 ? qc : 0;
                cur[i + 1] = thd[i * st] + (mx + g * (tau + (real)0.5 * (qa * qa + qb * qb + qc * qc)));
                ql[i + 1] = qa; qd[i + 1] = qb; qu[i + 1] = qc;
            }
        }
    }
    return W[X[D + 1] + n];
}

/* Alg. 5 backward over one pair from the weights stored by dtw_fwdq_pair (rows d + 1, d + 2 read in place; a zero
   row past the last diagonal). Eb: (n + m + 3) x R scratch, z: a zero row of R. */
VEC_CLONES
static void dtw_bwdq_pair_SFX(int64_t n, int64_t m, int64_t M, int64_t R, const int64_t *X, const real *Ql,
                              const real *Qd, const real *Qu, real *E, real *Eb, const real *z)
{
    const int64_t D = n + m - 1;
    memset(Eb, 0, sizeof(real) * (size_t)((D + 4) * R));
    for (int64_t d = D - 1; d >= 0; d--) {
        const int64_t lo = d - m + 1 > 0 ? d - m + 1 : 0, hi = d < n - 1 ? d : n - 1;
        real *e = Eb + (d + 2) * R;
        const real *e1 = Eb + (d + 3) * R, *e2 = Eb + (d + 4) * R;
        const real *ql1 = d + 1 < D ? Ql + X[d + 3] : z, *qu1 = d + 1 < D ? Qu + X[d + 3] : z;
        const real *qd2 = d + 2 < D ? Qd + X[d + 4] : z;
        #pragma omp simd
        for (int64_t i = lo; i <= hi; i++)
            e[i + 1] = e1[i + 1] * ql1[i + 1] + e1[i + 2] * qu1[i + 2] + e2[i + 2] * qd2[i + 2];
        if (d == D - 1) e[n] = 1;
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < m; j++)
            E[i * M + j] = Eb[(i + j + 2) * R + i + 1];
}

/* q = grad max_Omega(left, diag, up) of the cells of diagonal d (slots lo+1..hi+1), zero in the two guard slots */
VEC_CLONES
static void dtw_q_row_SFX(int64_t lo, int64_t hi, const real *p1, const real *p2, int l2, real g,
                          real *ql, real *qd, real *qu)
{
    const real ig = (real)1 / g; /* multiply by 1/γ: a division per use costs more than the exp it feeds */
    ql[lo] = qd[lo] = qu[lo] = 0;
    ql[hi + 2] = qd[hi + 2] = qu[hi + 2] = 0;
    if (!l2) {
        #pragma omp simd
        for (int64_t i = lo; i <= hi; i++) Q3_ENT(p1[i + 1], p2[i], p1[i], ig, ql[i + 1], qd[i + 1], qu[i + 1]);
    } else {
        #pragma omp simd
        for (int64_t i = lo; i <= hi; i++) Q3_L2(p1[i + 1], p2[i], p1[i], ig, ql[i + 1], qd[i + 1], qu[i + 1]);
    }
}

/* q as above and q_dot = J_Omega(q) x_dot, x_dot = (v_dot left, diag, up) from the tangent rows t1 (d-1), t2 (d-2) */
VEC_CLONES
static void dtw_qdot_row_SFX(int64_t lo, int64_t hi, const real *p1, const real *p2, const real *t1,
                             const real *t2, int l2, real g, real *ql, real *qd, real *qu, real *tl, real *td,
                             real *tu)
{
    const real ig = (real)1 / g; /* multiply by 1/γ: a division per use costs more than the exp it feeds */
    ql[lo] = qd[lo] = qu[lo] = tl[lo] = td[lo] = tu[lo] = 0;
    ql[hi + 2] = qd[hi + 2] = qu[hi + 2] = tl[hi + 2] = td[hi + 2] = tu[hi + 2] = 0;
    if (!l2) {
        #pragma omp simd
        for (int64_t i = lo; i <= hi; i++) {
            real a, b, c;
            Q3_ENT(p1[i + 1], p2[i], p1[i], ig, a, b, c);
            real xa = t1[i + 1], xb = t2[i], xc = t1[i];
            real s = a * xa + b * xb + c * xc;
            ql[i + 1] = a; qd[i + 1] = b; qu[i + 1] = c;
            tl[i + 1] = a * (xa - s) * ig; td[i + 1] = b * (xb - s) * ig; tu[i + 1] = c * (xc - s) * ig;
        }
    } else {
        #pragma omp simd
        for (int64_t i = lo; i <= hi; i++) {
            real a, b, c;
            Q3_L2(p1[i + 1], p2[i], p1[i], ig, a, b, c);
            real xa = t1[i + 1], xb = t2[i], xc = t1[i];
            real sa = a > 0 ? (real)1 : (real)0, sb = b > 0 ? (real)1 : (real)0, sc = c > 0 ? (real)1 : (real)0;
            real mean = (sa * xa + sb * xb + sc * xc) / (sa + sb + sc);
            ql[i + 1] = a; qd[i + 1] = b; qu[i + 1] = c;
            tl[i + 1] = sa * (xa - mean) * ig; td[i + 1] = sb * (xb - mean) * ig; tu[i + 1] = sc * (xc - mean) * ig;
        }
    }
}

/* Alg. 5 backward over one pair from its packed W: E (natural layout, row stride M). Eb: (n + m + 3) x R scratch,
   q: 6 x R scratch. The weights q of a diagonal are recomputed from W (the forward stores values only: memory
   one number per cell). e(i,j) = e(i,j+1) ql(i,j+1) + e(i+1,j) qu(i+1,j) + e(i+1,j+1) qd(i+1,j+1). */
VEC_CLONES
static void dtw_bwd_pair_SFX(int64_t n, int64_t m, int64_t M, int64_t R, const int64_t *X, const real *W, int l2,
                             real g, real *E, real *Eb, real *q)
{
    const int64_t D = n + m - 1;
    memset(Eb, 0, sizeof(real) * (size_t)((D + 4) * R));
    memset(q, 0, sizeof(real) * (size_t)(6 * R));
    real *ql1 = q, *qd1 = q + R, *qu1 = q + 2 * R, *ql2 = q + 3 * R, *qd2 = q + 4 * R, *qu2 = q + 5 * R;
    for (int64_t d = D - 1; d >= 0; d--) {
        const int64_t lo = d - m + 1 > 0 ? d - m + 1 : 0, hi = d < n - 1 ? d : n - 1;
        real *e = Eb + (d + 2) * R;
        const real *e1 = Eb + (d + 3) * R, *e2 = Eb + (d + 4) * R;
        #pragma omp simd
        for (int64_t i = lo; i <= hi; i++)
            e[i + 1] = e1[i + 1] * ql1[i + 1] + e1[i + 2] * qu1[i + 2] + e2[i + 2] * qd2[i + 2];
        if (d == D - 1) e[n] = 1; /* the end cell (n-1, m-1) seeds the sweep */
        real *t;
        t = ql2; ql2 = ql1; ql1 = t;
        t = qd2; qd2 = qd1; qd1 = t;
        t = qu2; qu2 = qu1; qu1 = t;
        dtw_q_row_SFX(lo, hi, W + X[d + 1], W + X[d], l2, g, ql1, qd1, qu1);
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < m; j++)
            E[i * M + j] = Eb[(i + j + 2) * R + i + 1];
}

/* Alg. 6 over one pair from its packed W: the forward tangent sweep v_dot = z + <q, x_dot> (stored skewed in Vd),
   then one reverse sweep computing e (Alg. 5) and e_dot = sum over children of (q e_dot + q_dot e) together, with q
   and q_dot of each diagonal recomputed from W and Vd. Returns <E, Z> = v_dot at the end cell; E_dot natural layout.
   Scratch: Vd (n + m + 1) x R, Eb and Ed (n + m + 3) x R each, q 12 x R. */
VEC_CLONES
static real dtw_hvp_pair_SFX(int64_t n, int64_t m, int64_t M, int64_t R, const int64_t *X, const real *W,
                             const real *Z, int l2, real g, real *Ed_out, real *Vd, real *Eb, real *Ed, real *q)
{
    const real ig = (real)1 / g; /* multiply by 1/γ: a division per use costs more than the exp it feeds */
    const int64_t D = n + m - 1, st = M - 1;
    memset(Vd, 0, sizeof(real) * (size_t)((D + 2) * R));
    for (int64_t d = 0; d < D; d++) {
        const int64_t lo = d - m + 1 > 0 ? d - m + 1 : 0, hi = d < n - 1 ? d : n - 1;
        const real *p1 = W + X[d + 1], *p2 = W + X[d], *t1 = Vd + (d + 1) * R, *t2 = Vd + d * R, *zd = Z + d;
        real *cur = Vd + (d + 2) * R;
        cur[lo] = 0;
        cur[hi + 2] = 0;
        if (!l2) {
            #pragma omp simd
            for (int64_t i = lo; i <= hi; i++) {
                real a, b, c;
                Q3_ENT(p1[i + 1], p2[i], p1[i], ig, a, b, c);
                cur[i + 1] = zd[i * st] + (a * t1[i + 1] + b * t2[i] + c * t1[i]);
            }
        } else {
            #pragma omp simd
            for (int64_t i = lo; i <= hi; i++) {
                real a, b, c;
                Q3_L2(p1[i + 1], p2[i], p1[i], ig, a, b, c);
                cur[i + 1] = zd[i * st] + (a * t1[i + 1] + b * t2[i] + c * t1[i]);
            }
        }
    }
    const real dot = Vd[(D + 1) * R + n];
    memset(Eb, 0, sizeof(real) * (size_t)((D + 4) * R));
    memset(Ed, 0, sizeof(real) * (size_t)((D + 4) * R));
    memset(q, 0, sizeof(real) * (size_t)(12 * R));
    real *ql1 = q, *qd1 = q + R, *qu1 = q + 2 * R, *tl1 = q + 3 * R, *td1 = q + 4 * R, *tu1 = q + 5 * R;
    real *ql2 = q + 6 * R, *qd2 = q + 7 * R, *qu2 = q + 8 * R, *tl2 = q + 9 * R, *td2 = q + 10 * R, *tu2 = q + 11 * R;
    for (int64_t d = D - 1; d >= 0; d--) {
        const int64_t lo = d - m + 1 > 0 ? d - m + 1 : 0, hi = d < n - 1 ? d : n - 1;
        real *e = Eb + (d + 2) * R, *ed = Ed + (d + 2) * R;
        const real *e1 = Eb + (d + 3) * R, *e2 = Eb + (d + 4) * R, *ed1 = Ed + (d + 3) * R, *ed2 = Ed + (d + 4) * R;
        #pragma omp simd
        for (int64_t i = lo; i <= hi; i++) {
            e[i + 1] = e1[i + 1] * ql1[i + 1] + e1[i + 2] * qu1[i + 2] + e2[i + 2] * qd2[i + 2];
            ed[i + 1] = (ed1[i + 1] * ql1[i + 1] + e1[i + 1] * tl1[i + 1]) + (ed1[i + 2] * qu1[i + 2]
                        + e1[i + 2] * tu1[i + 2]) + (ed2[i + 2] * qd2[i + 2] + e2[i + 2] * td2[i + 2]);
        }
        if (d == D - 1) e[n] = 1;
        real *t;
        t = ql2; ql2 = ql1; ql1 = t;
        t = qd2; qd2 = qd1; qd1 = t;
        t = qu2; qu2 = qu1; qu1 = t;
        t = tl2; tl2 = tl1; tl1 = t;
        t = td2; td2 = td1; td1 = t;
        t = tu2; tu2 = tu1; tu1 = t;
        dtw_qdot_row_SFX(lo, hi, W + X[d + 1], W + X[d], Vd + (d + 1) * R, Vd + d * R, l2, g, ql1, qd1, qu1,
                         tl1, td1, tu1);
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < m; j++)
            Ed_out[i * M + j] = Ed[(i + j + 2) * R + i + 1];
    return dot;
}

/* One call per pass over all B pairs (pairs of their own lengths). W: (B, DTW_BLOCK(N, M)). Returns -1 if the
   scratch cannot be allocated. */
int dtw_forward_SFX(int64_t B, int64_t N, int64_t M, const real *th, const int64_t *lx, const int64_t *ly, int l2,
                    double g, real *value, real *W)
{
    const int64_t blk = DTW_BLOCK(N, M);
    int64_t *X = (int64_t *)malloc(sizeof(int64_t) * (size_t)(N + M + 1));
    if (!X) return -1;
    for (int64_t b = 0; b < B; b++) {
        dtw_rows(lx[b], ly[b], X);
        value[b] = dtw_fwd_pair_SFX(lx[b], ly[b], M, X, th + b * N * M, l2, (real)g, W + b * blk);
    }
    free(X);
    return 0;
}

/* E may be uninitialised: every cell is written (padding 0). Returns -1 if the scratch cannot be allocated. */
int dtw_backward_SFX(int64_t B, int64_t N, int64_t M, const real *W, const int64_t *lx, const int64_t *ly, int l2,
                     double g, real *E)
{
    const int64_t R = N + 2, blk = DTW_BLOCK(N, M);
    real *Eb = (real *)malloc(sizeof(real) * (size_t)((N + M + 3) * R + 6 * R));
    int64_t *X = (int64_t *)malloc(sizeof(int64_t) * (size_t)(N + M + 1));
    if (!Eb || !X) { free(Eb); free(X); return -1; }
    for (int64_t b = 0; b < B; b++) {
        dtw_rows(lx[b], ly[b], X);
        dtw_bwd_pair_SFX(lx[b], ly[b], M, R, X, W + b * blk, l2, (real)g, E + b * N * M, Eb, Eb + (N + M + 3) * R);
        zero_padding_SFX(lx[b], ly[b], N, M, E + b * N * M);
    }
    free(Eb);
    free(X);
    return 0;
}

/* Alg. 5 forward and backward in one call, pair by pair: the forward stores the weights q of the pair (3 numbers per
   cell, one pair at a time, in cache for small pairs) and the backward sweep reads them. value (B,), W (B, DTW_BLOCK(N, M)), E (B, N, M) as in the two calls above. Returns -1 if the scratch
   cannot be allocated. */
int dtw_marginals_SFX(int64_t B, int64_t N, int64_t M, const real *th, const int64_t *lx, const int64_t *ly, int l2,
                      double g, real *value, real *W, real *E)
{
    const int64_t R = N + 2, blk = DTW_BLOCK(N, M);
    /* Stored weights while a pair's 3 x blk of them stay cache-sized (up to 256 x 256 cells: 1.5 MiB in double);
       beyond, streaming them through memory would cost about what recomputing them does, so recompute. */
    const int store_q = N * M <= 65536;
    /* Eb, a zero row, then either the weights of one pair (3 x blk) or the 6 x R scratch of dtw_bwd_pair */
    real *Eb = (real *)malloc(sizeof(real) * (size_t)((N + M + 4) * R + (store_q ? 3 * blk : 6 * R)));
    int64_t *X = (int64_t *)malloc(sizeof(int64_t) * (size_t)(N + M + 1));
    if (!Eb || !X) { free(Eb); free(X); return -1; }
    real *z = Eb + (N + M + 3) * R, *Q = z + R;
    memset(z, 0, sizeof(real) * (size_t)R);
    for (int64_t b = 0; b < B; b++) {
        dtw_rows(lx[b], ly[b], X);
        if (store_q) {
            value[b] = dtw_fwdq_pair_SFX(lx[b], ly[b], M, X, th + b * N * M, l2, (real)g, W + b * blk, Q, Q + blk,
                                         Q + 2 * blk);
            dtw_bwdq_pair_SFX(lx[b], ly[b], M, R, X, Q, Q + blk, Q + 2 * blk, E + b * N * M, Eb, z);
        } else {
            value[b] = dtw_fwd_pair_SFX(lx[b], ly[b], M, X, th + b * N * M, l2, (real)g, W + b * blk);
            dtw_bwd_pair_SFX(lx[b], ly[b], M, R, X, W + b * blk, l2, (real)g, E + b * N * M, Eb, Q);
        }
        zero_padding_SFX(lx[b], ly[b], N, M, E + b * N * M);
    }
    free(Eb);
    free(X);
    return 0;
}

/* Alg. 6: dot (B,), E_dot (B, N, M) (every cell written, padding 0); Z natural layout (B, N, M), zero on padding or not. */
int dtw_hvp_SFX(int64_t B, int64_t N, int64_t M, const real *W, const real *Z, const int64_t *lx, const int64_t *ly,
                int l2, double g, real *dot, real *E_dot)
{
    const int64_t R = N + 2, blk = DTW_BLOCK(N, M), vd = (N + M + 1) * R, big = (N + M + 3) * R;
    real *buf = (real *)malloc(sizeof(real) * (size_t)(vd + 2 * big + 12 * R));
    int64_t *X = (int64_t *)malloc(sizeof(int64_t) * (size_t)(N + M + 1));
    if (!buf || !X) { free(buf); free(X); return -1; }
    for (int64_t b = 0; b < B; b++) {
        dtw_rows(lx[b], ly[b], X);
        dot[b] = dtw_hvp_pair_SFX(lx[b], ly[b], M, R, X, W + b * blk, Z + b * N * M, l2, (real)g,
                                  E_dot + b * N * M, buf, buf + vd, buf + vd + big, buf + vd + 2 * big);
        zero_padding_SFX(lx[b], ly[b], N, M, E_dot + b * N * M);
    }
    free(buf);
    free(X);
    return 0;
}
"""

_HEADER = r"""#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
/* glibc >= 2.35 on x86-64: vector exp/log from libmvec, as in the Viterbi kernels (_cpu_source.py). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
__attribute__((simd("notinbranch"))) float expf(float);
__attribute__((simd("notinbranch"))) float logf(float);
__attribute__((simd("notinbranch"))) double exp(double);
__attribute__((simd("notinbranch"))) double log(double);
#endif
/* The saved values W of a pair, packed: rows -2 and -1 (the borders, 3 slots each), then each diagonal d with its
   cells and one guard slot on each side (len_d + 2 slots): n*m + 2*(n + m - 1) + 6 numbers, about one per cell.
   dtw_rows fills X[r + 2] (r = -2 .. n + m - 2) with the offset of "row r shifted so that slot i + 1 is row i":
   W + X[r + 2] is then indexed exactly like a dense row of stride n + 2 with one slot in front. */
#define DTW_BLOCK(N, M) ((N) * (M) + 2 * ((N) + (M) - 1) + 6)
static void dtw_rows(int64_t n, int64_t m, int64_t *X)
{
    X[0] = 0; /* row -2 (lo = 0): slots i = -1, 0, 1 */
    X[1] = 3; /* row -1 */
    int64_t off = 6;
    for (int64_t d = 0; d < n + m - 1; d++) {
        const int64_t lo = d - m + 1 > 0 ? d - m + 1 : 0, hi = d < n - 1 ? d : n - 1;
        X[d + 2] = off - lo;
        off += hi - lo + 3;
    }
}
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35)) && !defined(STRUCTATTN_NO_CLONES)
#define VEC_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define VEC_CLONES
#endif
"""


def source() -> str:
    """The C translation unit: the body for float (``_f32``) and double (``_f64``)."""
    parts = [_HEADER]
    for real, sfx, exp, log in (("float", "f32", "expf", "logf"), ("double", "f64", "exp", "log")):
        body = _BODY.replace("_SFX", "_" + sfx).replace("EXP(", exp + "(").replace("LOG(", log + "(")
        parts.append(f"#define real {real}\n{body}\n#undef real\n")
    return "".join(parts)
