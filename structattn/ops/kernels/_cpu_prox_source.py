"""C source of the CPU kernels of fusedmax and oscarmax (compiled once per user by :mod:`.cpu_prox`).

One call runs one pass over all rows of an (N, T) array, row by row (both proxes are sequential within a row):

* ``psm_forward``: per row, the real positions (``mask`` False) are taken in order — read and written in place when
  they form one block (no padding, left or right padding), else compacted into a buffer and scattered back —, then

  - kind 0, prox_TV: Condat's direct algorithm (L. Condat, "A direct algorithm for 1D total variation denoising",
    IEEE SPL 20(11), 2013), argmin_x ½‖x − y‖² + λ Σ|x_{i+1} − x_i|, written out by segments;
  - kind 1, fusedmax = sparsemax(prox_TV(y)), in the same pass over the row: the TV routine writes the group labels
    and finds the maximum as it writes each segment, and sparsemax's threshold needs no sort (Michelot's iteration
    from the entries within 1 of the maximum);
  - kind 2, oscarmax = sparsemax(v), v = the non-increasing isotonic regression (pool adjacent violators) of
    y_sorted − w, w_k = λ(n − 1 − k) (k = 0…n−1, y sorted decreasingly, stable), put back in the original order
    (:mod:`structattn.ops.structured_sparsemax` derives why this is the exact OSCAR argmin over the simplex);

  and writes P (the prox for kind 0, the weights otherwise; 0 on padding) and G, an int32 group label per position
  (−1 on padding): positions of one row with equal label form one fused group (a run of equal prox values for TV,
  a pooled block for OSCAR). Returns the number of rows with a non-finite real entry (their outputs: 0, labels −1).
* ``psm_backward``: the vector-Jacobian product from (∂L/∂P, P, G): for kind ≥ 1, sparsemax's
  h = s ⊙ (g − mean_s g) with s = {P > 0}, then (every kind) the average of h over each group.

* ``entmax15_forward``: 1.5-entmax of each row over its real positions (mask False; −inf entries get weight 0 as
  if padded): p = [z − τ]₊² with z = (x − max x)/2 and τ the exact threshold (closed form on the support, the
  support found by Newton's method from below; see the routine). Returns the number of rows with a NaN or +inf real
  entry, or whose real entries are all −inf (their real outputs are NaN, as torch.softmax gives).
* ``entmax15_backward``: the vector-Jacobian product g ⊙ s − (⟨g, s⟩ / Σ s)·s with s = √p (Peters, Niculae &
  Martins 2019, Prop. 2 at α = 1.5); 0 where p = 0 (padding included).

All are written once with ``real``/``SFX`` placeholders, instantiated for float and double.
"""

_HEADER = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

/* The rank sort's counting loop also as an AVX2 clone (GCC's target_clones, chosen at load time by the CPU; 8 floats
   per comparison instead of 4; comparisons only, so the results are the same). As in the Viterbi kernels
   (_cpu_source.py): GCC on x86-64 with glibc >= 2.35 only, and a compiler that refuses the attribute gets a second
   try with -DSTRUCTATTN_NO_CLONES (kernels/cpu_prox.py). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35)) && !defined(STRUCTATTN_NO_CLONES)
#define RANK_CLONES __attribute__((target_clones("default", "avx2")))
#else
#define RANK_CLONES
#endif
"""

_BODY = r"""
/* Condat (2013), "A direct algorithm for 1D total variation denoising", the published C routine TV1D_denoise
   (objective 1/2 ||x - y||^2 + lambda sum |x_{k+1} - x_k|), with his variable names: u is the dual variable,
   [vmin, vmax] the bounds of the current segment's value, k0 the start of the current segment, kminus/kplus the
   last positions where umin = lambda / umax = -lambda. Linear time in practice. Needs lambda > 0 and width >= 1.
   Additions to the published routine, in EMIT, where it writes a finished segment's value to its positions: each
   position also gets its group label (the compacted index where its group starts; groups = maximal runs of equal
   prox value, so a segment whose value equals the previous one's exactly joins that group), and the largest value
   is returned (sparsemax's maximum, one comparison per segment instead of a pass). The arithmetic is the
   routine's: the values are bit for bit its. */
#define EMIT(val, kend) do { \
        const real v_ = (val); \
        const int32_t l_ = (k0 > 0 && v_ == prev) ? plab : (int32_t)k0; \
        do { output[k0] = v_; label[k0++] = l_; } while (k0 <= (kend)); \
        prev = v_; \
        plab = l_; \
        if (v_ > top) top = v_; \
    } while (0)
static real tv1d_SFX(const real *input, real *output, int32_t *label, int64_t width, real lambda)
{
    int64_t k = 0, k0 = 0, kplus = 0, kminus = 0;
    real umin = lambda, umax = -lambda;
    real vmin = input[0] - lambda, vmax = input[0] + lambda;
    const real twolambda = (real)2.0 * lambda, minlambda = -lambda;
    real prev = 0, top = -INFINITY;
    int32_t plab = 0;
    for (;;) {
        while (k == width - 1) {  /* the right boundary */
            if (umin < (real)0.0) {  /* vmin too high: negative jump */
                EMIT(vmin, kminus);
                umax = (vmin = input[kminus = k = k0]) + (umin = lambda) - vmax;
            } else if (umax > (real)0.0) {  /* vmax too low: positive jump */
                EMIT(vmax, kplus);
                umin = (vmax = input[kplus = k = k0]) + (umax = minlambda) - vmin;
            } else {
                vmin += umin / (real)(k - k0 + 1);
                EMIT(vmin, k);
                return top;
            }
        }
        if ((umin += input[k + 1] - vmin) < minlambda) {  /* negative jump */
            EMIT(vmin, kminus);
            vmax = (vmin = input[kplus = kminus = k = k0]) + twolambda;
            umin = lambda;
            umax = minlambda;
        } else if ((umax += input[k + 1] - vmax) > lambda) {  /* positive jump */
            EMIT(vmax, kplus);
            vmin = (vmax = input[kplus = kminus = k = k0]) - twolambda;
            umin = lambda;
            umax = minlambda;
        } else {  /* no jump */
            k++;
            if (umin >= lambda) {
                vmin += (umin - lambda) / (real)((kminus = k) - k0 + 1);
                umin = lambda;
            }
            if (umax <= minlambda) {
                vmax += (umax + lambda) / (real)((kplus = k) - k0 + 1);
                umax = minlambda;
            }
        }
    }
}
#undef EMIT

typedef struct { real v; int64_t i; } pair_SFX;

/* Stable sort of a[0..n) by decreasing v (ties keep their order): insertion sort on short runs, then merges through
   tmp. Rows are short (attention lengths), where this beats qsort's indirect comparisons. */
static void sort_pairs_SFX(pair_SFX *a, pair_SFX *tmp, int64_t n)
{
    const int64_t RUN = 16;
    for (int64_t s = 0; s < n; s += RUN) {
        int64_t e = s + RUN < n ? s + RUN : n;
        for (int64_t i = s + 1; i < e; i++) {
            pair_SFX key = a[i];
            int64_t j = i - 1;
            while (j >= s && a[j].v < key.v) { a[j + 1] = a[j]; j--; }
            a[j + 1] = key;
        }
    }
    for (int64_t w = RUN; w < n; w *= 2) {
        for (int64_t s = 0; s < n; s += 2 * w) {
            int64_t m = s + w < n ? s + w : n, e = s + 2 * w < n ? s + 2 * w : n, i = s, j = m, o = s;
            while (i < m && j < e) tmp[o++] = (a[j].v > a[i].v) ? a[j++] : a[i++];
            while (i < m) tmp[o++] = a[i++];
            while (j < e) tmp[o++] = a[j++];
        }
        memcpy(a, tmp, (size_t)n * sizeof(pair_SFX));
    }
}

/* sparsemax of v[0..n) in place, m = max v: threshold tau by Michelot's (1986) iteration on the shifted values
   d = v - m. In exact arithmetic the support {d > tau} only shrinks from pass to pass; in floating point an entry
   lying exactly at the threshold (a weight of 0) can re-enter when tau is recomputed with a rounding error one ulp
   lower, and the plain iteration then cycles for ever (e.g. prox_TV of (.5, -.5, -2, -1.5, 0, -.5, 1, -1, 1.5, 0) at
   lambda = 0.3). So each pass filters only the survivors of the previous one (compacted into the scratch c): the
   support size strictly decreases until it is stable, at most n passes, a handful in practice. The max (d = 0)
   survives every pass: it exceeds tau < 0 (s <= 0). The final weights are nonzero exactly on the final support, whose
   entries exceed every tau seen (tmax) while each dropped entry was <= the tau that dropped it: max(d - tau, 0)
   alone would give a dropped entry lying at the threshold a weight of 1e-16 and put it into the support that the
   backward pass reads from P > 0. */
static void sparsemax_row_SFX(real *v, int64_t n, real m, real *c)
{
    /* tau >= -1 (no weight exceeds 1), so an entry with d <= -1 is never in the support: the first pass keeps
       only d > -1 (a few entries of an attention row), and Michelot's iteration started from any superset of the
       support converges to the same tau (Condat, "Fast projection onto the simplex and the l1 ball", 2016).
       Written without a branch (store every d, advance only past the kept ones): which entries are kept is random,
       and a branch on it mispredicts; the sum runs over the kept ones afterwards, in row order. */
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++) {
        const real d = v[i] - m;
        c[k] = d;
        k += d > (real)-1.0;
    }
    real s = 0;
    for (int64_t i = 0; i < k; i++) s += c[i];
    real tau = (s - (real)1.0) / (real)k, tmax = tau > (real)-1.0 ? tau : (real)-1.0;
    for (;;) {
        real s2 = 0;
        int64_t k2 = 0;
        for (int64_t i = 0; i < k; i++) {
            real d = c[i];
            if (d > tau) { s2 += d; c[k2++] = d; }
        }
        if (k2 == k || k2 == 0) break;  /* k2 = 0 cannot happen (the max survives); a guard, not a case */
        tau = (s2 - (real)1.0) / (real)k2;
        if (tau > tmax) tmax = tau;
        k = k2;
    }
    for (int64_t i = 0; i < n; i++) {  /* both sides computed: a select the compiler vectorises, not a branch */
        const real d = v[i] - m, w = d - tau;
        v[i] = d > tmax ? w : (real)0.0;
    }
}

/* The same stable decreasing order for short rows by ranks: rank_i = #{j : y_j > y_i} + #{j < i : y_j = y_i}, then
   a[rank_i] = (y_i, i). O(n^2) comparisons, but branch-free loops the compiler vectorises: at attention lengths
   (n <= RANK_SORT_MAX) several times faster than the merge sort, whose data-dependent branches mispredict. The
   count runs over the whole row for every i (the same trip count each time: its loop exit is predicted, and the
   vectorised loop has no short remainders), and the ties come after: c_i = #{j : y_j > y_i} is equal for two entries
   exactly when they are equal (y_i > y_j makes c_j >= c_i + 1), so the i-th entry of a tie class seen in row order
   goes to c_i + (the number seen before it), counted in used[] (n ints of scratch). */
#define RANK_SORT_MAX 96
RANK_CLONES static void rank_sort_SFX(const real *y, pair_SFX *a, int32_t *used, real *ypad, int64_t n)
{
    /* the row padded with -inf (never > a finite y_i) to a multiple of 8: the vectorised count has no remainder */
    const int32_t np = (int32_t)((n + 7) & ~(int64_t)7);
    for (int64_t i = 0; i < n; i++) { ypad[i] = y[i]; used[i] = 0; }
    for (int64_t i = n; i < np; i++) ypad[i] = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        const real yi = y[i];
        int32_t r = 0;
        for (int32_t j = 0; j < np; j++) r += ypad[j] > yi;
        r += used[r]++;
        a[r].v = yi;
        a[r].i = i;
    }
}

int64_t psm_forward_SFX(int64_t N, int64_t T, const real *X, const uint8_t *mask, int kind, double lamd,
                        real *P, int32_t *G)
{
    real lam = (real)lamd;
    if (T <= 0) return 0;
    /* workspace: the compacted row y, its outputs pc/gc (rows whose real positions are not one block), sparsemax's
       scratch c (also OSCAR's sorted fit v), the PAV blocks, the rank sort's padded row; the sort pairs; the real
       positions idx; the rank sort's tie counts */
    real *y = (real *)malloc(((size_t)T * 5 + 8) * sizeof(real));
    pair_SFX *srt = (pair_SFX *)malloc((size_t)T * 2 * sizeof(pair_SFX));
    int64_t *idx = (int64_t *)malloc((size_t)T * 2 * sizeof(int64_t));
    int32_t *gc = (int32_t *)malloc((size_t)T * 2 * sizeof(int32_t));
    if (!y || !srt || !idx || !gc) {
        free(y); free(srt); free(idx); free(gc);
        return -1;
    }
    real *pc = y + T, *c = y + 2 * T, *v = c, *bsum = y + 3 * T, *ypad = y + 4 * T;
    int64_t *bstart = idx + T;
    int32_t *used = gc + T;
    int64_t bad = 0;
    for (int64_t b = 0; b < N; b++) {
        const real *x = X + b * T;
        const uint8_t *mk = mask ? mask + b * T : NULL;
        real *Pb = P + b * T;
        int32_t *Gb = G + b * T;
        /* The real positions. When they are one block [first, first + n) (no padding, left or right padding: the
           usual layouts) the row is read and the outputs written in place; otherwise the real entries are compacted
           in order and the outputs scattered back. Either way the problem is solved on the same compacted row. */
        int64_t n = T, first = 0, last = T - 1;
        if (mk) {
            int32_t pads = 0;  /* mask bytes are 0 or 1 (torch.bool): a plain sum the compiler vectorises */
            for (int64_t t = 0; t < T; t++) pads += mk[t];
            n = T - pads;
            if (n > 0) {
                while (mk[first]) first++;
                while (mk[last]) last--;
            }
        }
        if (n == 0) {
            for (int64_t t = 0; t < T; t++) { Pb[t] = 0; Gb[t] = -1; }
            continue;
        }
        const int block = last - first + 1 == n;
        const real *yr;
        real *po;
        int32_t *go;
        if (block) {
            yr = x + first;
            po = Pb + first;
            go = Gb + first;
            for (int64_t t = 0; t < first; t++) { Pb[t] = 0; Gb[t] = -1; }
            for (int64_t t = last + 1; t < T; t++) { Pb[t] = 0; Gb[t] = -1; }
        } else {
            int64_t k = 0;
            for (int64_t t = 0; t < T; t++) {
                Pb[t] = 0;
                Gb[t] = -1;
                if (!mk[t]) { idx[k] = t; y[k++] = x[t]; }
            }
            yr = y;
            po = pc;
            go = gc;
        }
        /* NaN or +-inf: the exponent bits all set (an integer test the compiler vectorises) */
        int nonfinite = 0;
        for (int64_t i = 0; i < n; i++) {
            UINT u;
            memcpy(&u, yr + i, sizeof u);
            nonfinite |= (u & EXPMASK) == EXPMASK;
        }
        if (nonfinite) {
            bad++;
            if (block) for (int64_t i = 0; i < n; i++) { po[i] = 0; go[i] = -1; }
            continue;
        }
        if (kind <= 1) {
            real top;
            if (lam > 0) top = tv1d_SFX(yr, po, go, n, lam);
            else {
                /* lambda = 0: the prox is the identity (Jacobian I), so every position is its own group even where
                   inputs tie: else fusedmax's gradient at lambda = 0 would average tied neighbours and differ from
                   sparsemax's */
                top = yr[0];
                for (int64_t i = 0; i < n; i++) {
                    po[i] = yr[i];
                    go[i] = (int32_t)i;
                    if (yr[i] > top) top = yr[i];
                }
            }
            if (kind == 1) sparsemax_row_SFX(po, n, top, c);
        } else {
            if (n <= RANK_SORT_MAX) rank_sort_SFX(yr, srt, used, ypad, n);
            else {
                for (int64_t i = 0; i < n; i++) { srt[i].v = yr[i]; srt[i].i = i; }
                sort_pairs_SFX(srt, srt + T, n);
            }
            /* PAV for a non-increasing fit of u_k = y_(k) - lam (n - 1 - k): blocks on a stack (start, sum);
               merge while the previous block's mean is strictly below the new one's (strict: at lam = 0 tied
               entries stay separate and v = y exactly). */
            int64_t nb = 0;
            for (int64_t k = 0; k < n; k++) {
                bstart[nb] = k;
                bsum[nb] = srt[k].v - lam * (real)(n - 1 - k);
                nb++;
                while (nb > 1) {
                    int64_t c1 = bstart[nb - 1] - bstart[nb - 2], c2 = k + 1 - bstart[nb - 1];
                    if (bsum[nb - 2] * (real)c2 < bsum[nb - 1] * (real)c1) {
                        bsum[nb - 2] += bsum[nb - 1];
                        nb--;
                    } else break;
                }
            }
            /* v (sorted frame, non-increasing) and sparsemax's threshold from the sorted prefix sums */
            real cs = 0, tau = 0;
            for (int64_t q = 0; q < nb; q++) {
                int64_t e = q + 1 < nb ? bstart[q + 1] : n;
                real mean = bsum[q] / (real)(e - bstart[q]);
                for (int64_t k = bstart[q]; k < e; k++) {
                    v[k] = mean;
                    go[srt[k].i] = (int32_t)bstart[q];
                }
            }
            real top = v[0];
            int64_t ksup = 1;
            for (int64_t k = 0; k < n; k++) {
                real d = v[k] - top;
                cs += d;
                /* support = the largest k with v_k > (sum_{i<=k} v_i - 1)/k, a prefix of the sorted order */
                if (d * (real)(k + 1) > cs - (real)1.0) { tau = (cs - (real)1.0) / (real)(k + 1); ksup = k + 1; }
            }
            /* exactly 0 past the support (an entry tied with the threshold would otherwise get a rounding-sized
               weight and join the support that the backward pass reads from P > 0) */
            for (int64_t k = 0; k < n; k++) {
                real d = v[k] - top - tau;
                po[srt[k].i] = (k < ksup && d > (real)0.0) ? d : (real)0.0;
            }
        }
        if (!block)
            for (int64_t i = 0; i < n; i++) {
                Pb[idx[i]] = po[i];
                Gb[idx[i]] = go[i];
            }
    }
    free(y); free(srt); free(idx); free(gc);
    return bad;
}

int psm_backward_SFX(int64_t N, int64_t T, const real *GO, const real *P, const int32_t *G, int sparse, real *GI)
{
    if (T <= 0) return 0;
    real *acc = (real *)malloc((size_t)T * sizeof(real));
    int64_t *cnt = (int64_t *)malloc((size_t)T * sizeof(int64_t));
    if (!acc || !cnt) { free(acc); free(cnt); return -1; }
    for (int64_t b = 0; b < N; b++) {
        const real *g = GO + b * T, *pb = P + b * T;
        const int32_t *gb = G + b * T;
        real *out = GI + b * T;
        real mean = 0;
        if (sparse) {
            real s = 0;
            int64_t k = 0;
            for (int64_t t = 0; t < T; t++) if (gb[t] >= 0 && pb[t] > (real)0.0) { s += g[t]; k++; }
            mean = k ? s / (real)k : (real)0.0;
        }
        for (int64_t t = 0; t < T; t++) { acc[t] = 0; cnt[t] = 0; }
        for (int64_t t = 0; t < T; t++) {
            if (gb[t] < 0) continue;
            real h = sparse ? (pb[t] > (real)0.0 ? g[t] - mean : (real)0.0) : g[t];
            acc[gb[t]] += h;
            cnt[gb[t]]++;
        }
        for (int64_t t = 0; t < T; t++) out[t] = gb[t] < 0 ? (real)0.0 : acc[gb[t]] / (real)cnt[gb[t]];
    }
    free(acc); free(cnt);
    return 0;
}

/* The exact 1.5-entmax threshold of c[0..k) (all c > -1, max c = 0, k >= 1): the tau with
   f(tau) = sum_i [c_i - tau]_+^2 = 1. f is convex and decreasing below max c, and f(-1) >= (0 + 1)^2 - 1 = 0, so
   tau* >= -1 and Newton's method started at -1 climbs to tau* from below without overshooting (the tangent of a
   convex function lies under it), and its support S = {c > tau} only shrinks towards the true support. On a support
   S, tau is a root of the quadratic sum_S (c_i - tau)^2 = 1: tau_S = mean_S - sqrt((1 - SS_S) / |S|), SS_S the
   centred sum of squares (Peters, Niculae & Martins 2019, Alg. 2's closed form; the `entmax` package evaluates the
   same expression on every prefix of a full sort). Once every entry of S is >= tau_S, S is the support (an S
   larger than the support has tau_S >= tau* > its extra entries) and tau_S is returned exactly. Newton reaches that
   S in a few steps on attention rows; if rounding stalls it (no progress) or 64 steps pass, the remaining
   candidates are sorted and scanned exactly as the package does (the prefix rule tau_k <= c_(k)). c is scratch. */
static real entmax15_tau_SFX(real *c, int64_t k)
{
    real tau = (real)-1.0;
    for (int it = 0; it < 64; it++) {
        real s = 0, mn = c[0];
        for (int64_t i = 0; i < k; i++) { s += c[i]; if (c[i] < mn) mn = c[i]; }
        const real mean = s / (real)k;
        real ss = 0, f = 0, fp = 0;
        for (int64_t i = 0; i < k; i++) {
            const real d = c[i] - mean, e = c[i] - tau;
            ss += d * d;
            f += e * e;
            fp += e;
        }
        real delta = ((real)1.0 - ss) / (real)k;
        const real r = mean - (delta > (real)0.0 ? SQRT(delta) : (real)0.0);
        if (mn >= r) return r;
        /* Newton: tau + (f - 1) / (2 sum (c - tau)); every c here exceeds tau, so f is f(tau) */
        const real t2 = tau + (f - (real)1.0) / ((real)2.0 * fp);
        if (!(t2 > tau)) break;  /* stalled by rounding: finish by the sort */
        tau = t2;
        int64_t k2 = 0;
        for (int64_t i = 0; i < k; i++) if (c[i] > tau) c[k2++] = c[i];
        if (k2 == 0) break;  /* cannot happen (c = 0 stays above tau <= tau* < 0); a guard */
        k = k2;
    }
    /* the package's rule on the (few) remaining candidates, sorted decreasingly by insertion */
    for (int64_t i = 1; i < k; i++) {
        real key = c[i];
        int64_t j = i - 1;
        while (j >= 0 && c[j] < key) { c[j + 1] = c[j]; j--; }
        c[j + 1] = key;
    }
    real s = 0, q = 0, best = c[0] - (real)1.0;
    for (int64_t i = 0; i < k; i++) {
        s += c[i];
        q += c[i] * c[i];
        const real n = (real)(i + 1), mean = s / n, ssq = n * (q / n - mean * mean);
        const real delta = ((real)1.0 - ssq) / n;
        const real t = mean - (delta > (real)0.0 ? SQRT(delta) : (real)0.0);
        if (t <= c[i]) best = t;
    }
    return best;
}

int64_t entmax15_forward_SFX(int64_t N, int64_t T, const real *X, const uint8_t *mask, real *P)
{
    if (T <= 0) return 0;
    real *c = (real *)malloc((size_t)T * sizeof(real));
    if (!c) return -1;
    int64_t bad = 0;
    for (int64_t b = 0; b < N; b++) {
        const real *x = X + b * T;
        const uint8_t *mk = mask ? mask + b * T : NULL;
        real *Pb = P + b * T;
        real m = -INFINITY;
        int64_t nreal = 0;
        int nonfinite = 0;
        for (int64_t t = 0; t < T; t++) {
            if (mk && mk[t]) continue;
            const real v = x[t];
            nreal++;
            if (v != v || v == INFINITY) nonfinite = 1;
            if (v > m) m = v;
        }
        if (nreal > 0 && (nonfinite || m == -INFINITY)) {
            bad++;
            for (int64_t t = 0; t < T; t++) Pb[t] = (mk && mk[t]) ? (real)0.0 : (real)NAN;
            continue;
        }
        /* candidates: z = (x - m)/2 > -1, since tau >= -1 (no weight exceeds 1); -inf entries give z = -inf */
        int64_t k = 0;
        for (int64_t t = 0; t < T; t++) {
            if (mk && mk[t]) continue;
            const real z = (x[t] - m) * (real)0.5;
            if (z > (real)-1.0) c[k++] = z;
        }
        if (k == 0) {  /* no real position: all 0 */
            for (int64_t t = 0; t < T; t++) Pb[t] = 0;
            continue;
        }
        const real tau = entmax15_tau_SFX(c, k);
        for (int64_t t = 0; t < T; t++) {
            const real e = (x[t] - m) * (real)0.5 - tau;
            Pb[t] = ((mk && mk[t]) || !(e > (real)0.0)) ? (real)0.0 : e * e;
        }
    }
    free(c);
    return bad;
}

void entmax15_backward_SFX(int64_t N, int64_t T, const real *GO, const real *P, real *GI)
{
    for (int64_t b = 0; b < N; b++) {
        const real *g = GO + b * T, *p = P + b * T;
        real *out = GI + b * T;
        real ss = 0, gs = 0;
        for (int64_t t = 0; t < T; t++) {
            const real s = SQRT(p[t]);
            out[t] = s;
            ss += s;
            gs += g[t] * s;
        }
        const real q = ss > (real)0.0 ? gs / ss : (real)0.0;
        for (int64_t t = 0; t < T; t++) out[t] = out[t] * (g[t] - q);
    }
}
"""


def source() -> str:
    """The full C translation unit: the body instantiated for float (``_f32``) and double (``_f64``)."""
    parts = [_HEADER]
    # SQRT: sqrtf for float (sqrt would round-trip through double); UINT/EXPMASK: the unsigned integer of the same
    # width and the exponent bits (the finiteness test)
    for real, sqrt, uint, expmask, sfx in (("float", "sqrtf", "uint32_t", "0x7f800000u", "f32"),
                                           ("double", "sqrt", "uint64_t", "0x7ff0000000000000ull", "f64")):
        parts.append(f"#define real {real}\n#define SQRT {sqrt}\n#define UINT {uint}\n#define EXPMASK {expmask}\n"
                     f"{_BODY.replace('_SFX', '_' + sfx)}\n#undef EXPMASK\n#undef UINT\n#undef SQRT\n#undef real\n")
    return "".join(parts)
