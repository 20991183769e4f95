"""C source of the CPU Viterbi kernels (compiled once per user by :mod:`structattn.ops.kernels.cpu`).

The body is written once with ``real``/``SFX``/``EXP``/``LOG`` placeholders and instantiated for float and double,
so float32 inputs are computed in float32 exactly like the reference tensor code (same shift by the row max,
same operation order), and float64 in float64. One call runs one whole pass (Alg. 3 forward, Alg. 3 forward +
backward, or Alg. 4) over all B chains: that removes the ≈10 small tensor ops × T steps × 3 passes of the
reference path, which dominate its cost at attention sizes (S = 2, T ≤ a few hundred).

Semantics mirror :mod:`structattn.ops.viterbi`: a chain of length L uses steps t < L only; its padded steps get
Q = E = Ė = 0, and U (the adjoint of v) is carried through padding like the reference does. Variable names are the
paper's symbols, shared with the reference and the Triton kernels (docs/kernels.md): x, v, q/Q, r, u/U, e/E, z/Z and
the tangents x_dot, v_dot, q_dot, u_dot, e_dot/E_dot; a trailing 0/1 (00..11) is the state (pair) at S = 2, a
trailing b a per-chain base pointer (Qb = Q + b·T·S·S).
"""

from ._cpu_segment_source import _SEGMENT_BODY

#: Chains per block of the vectorised S = 2 passes (``CB`` in the C source); the fused segmentation kernels store
#: their saved tensors block by block, so their callers size them with it.
CHAINS_PER_BLOCK = 64

# Kept as a Python string (not a .c file) so that it ships with the package without package-data settings.
_BODY = r"""
/* ---- max_Omega and its gradient on one row x[0..S-1]; returns the value, writes q = argmax ------------------ */

/* S = 2, Omega = l2: v = max_Omega(x0, x1), (q0, q1) its gradient, the projection of (x0, x1)/g on the simplex,
   q1 = clip((1 + (x1 - x0)/g)/2, 0, 1), shifted by the max as below. A macro, not an inline function: GCC (12)
   vectorises the loops over chains that expand it, and not those that call an inline function with these selects
   ("control flow in loop"). */
#define L2MAX2(x0_, x1_, g_, q0_, q1_, v_) do {                                                                   \
        real m_ = (x0_) >= (x1_) ? (x0_) : (x1_);                                                                  \
        real a_ = (x0_) - m_, b_ = (x1_) - m_;                                                                     \
        real ya_ = a_ / (g_), yb_ = b_ / (g_);                                                                     \
        real p1_ = ((real)1.0 + yb_ - ya_) * (real)0.5;                                                            \
        p1_ = p1_ < (real)0.0 ? (real)0.0 : (p1_ > (real)1.0 ? (real)1.0 : p1_);                                   \
        real p0_ = (real)1.0 - p1_;                                                                                \
        q0_ = p0_;                                                                                                 \
        q1_ = p1_;                                                                                                 \
        v_ = (p0_ * a_ + p1_ * b_) - (real)(0.5 * (double)(g_)) * (p0_ * p0_ + p1_ * p1_) + m_;                    \
    } while (0)

static real maxarg2_SFX(real x0, real x1, int l2, real g, real *q0, real *q1)
{
    if (l2) {
        real v;
        L2MAX2(x0, x1, g, *q0, *q1, v);
        return v;
    }
    /* Shift by the max like smoothed_max._max_argmax: values grow linearly in T, the shifted ones stay O(spread). */
    real m = x0 >= x1 ? x0 : x1;
    real a = x0 - m, b = x1 - m;
    real ya = a / g, yb = b / g;
    /* One of ya, yb is 0 and the other is -|d|: logsumexp = log1p(ex), softmax = (1, ex)/(1 + ex) with
       ex = exp(-|d|). One exp and one log1p instead of the reference's 4 exp + 1 log (same value to rounding);
       the exp is the cost of this kernel. */
    real ex = EXP(ya < yb ? ya : yb);
    real lse = LOG1P(ex);
    real inv = (real)1.0 / ((real)1.0 + ex);
    *q0 = ya < yb ? ex * inv : inv;
    *q1 = ya < yb ? inv : ex * inv;
    return g * lse + m;
}

static void sort_desc_SFX(real *a, int n)
{
    for (int i = 1; i < n; i++) {
        real key = a[i];
        int j = i - 1;
        while (j >= 0 && a[j] < key) { a[j + 1] = a[j]; j--; }
        a[j + 1] = key;
    }
}

/* general S; y and ys are scratch rows of length S */
static real maxarg_SFX(const real *x, int S, int l2, real g, real *q, real *y, real *ys)
{
    real m = x[0];
    for (int k = 1; k < S; k++) if (x[k] > m) m = x[k];
    for (int k = 0; k < S; k++) y[k] = (x[k] - m) / g;
    if (!l2) {
        real mx = y[0];
        for (int k = 1; k < S; k++) if (y[k] > mx) mx = y[k];
        real s = 0;
        for (int k = 0; k < S; k++) s += EXP(y[k] - mx);
        real lse = LOG(s) + mx;
        for (int k = 0; k < S; k++) q[k] = EXP(y[k] - lse);
        return g * lse + m;
    }
    /* sparsemax(y) by sorting (ys = y sorted descending): tau = (sum of the k_sup largest - 1)/k_sup */
    for (int k = 0; k < S; k++) ys[k] = y[k];
    sort_desc_SFX(ys, S);
    real c = 0;
    int ksup = 0;
    for (int k = 0; k < S; k++) {
        c += ys[k];
        if (ys[k] * (real)(k + 1) > c - (real)1.0) { ksup++; }
    }
    c = 0;
    for (int k = 0; k < ksup; k++) c += ys[k];
    real tau = (c - (real)1.0) / (real)ksup;
    real val = 0, sq = 0;
    for (int k = 0; k < S; k++) {
        real qk = y[k] - tau;
        q[k] = qk > 0 ? qk : (real)0.0;
    }
    for (int k = 0; k < S; k++) val += q[k] * (x[k] - m);
    for (int k = 0; k < S; k++) sq += q[k] * q[k];
    return val - (real)(0.5 * (double)g) * sq + m;
}

/* S = 2: (o0, o1) = J_Omega(q) x (jac_SFX below, specialised); inline and branch-free but for l2, which the
   vectorised loops pass as a literal */
static inline void jac2_SFX(real q0, real q1, real x0, real x1, int l2, real g, real *o0, real *o1)
{
    if (!l2) {
        real s = q0 * x0 + q1 * x1;
        *o0 = (q0 * x0 - q0 * s) / g;
        *o1 = (q1 * x1 - q1 * s) / g;
    } else {
        int a = q0 > 0, b = q1 > 0;
        real s = (a ? x0 : (real)0.0) + (b ? x1 : (real)0.0);
        real n = (real)(a + b);
        *o0 = a ? (x0 - s / n) / g : (real)0.0;
        *o1 = b ? (x1 - s / n) / g : (real)0.0;
    }
}

/* J_Omega(q) x  (Hessian of max_Omega at the point whose gradient is q) */
static void jac_SFX(const real *q, const real *x, int S, int l2, real g, real *out)
{
    if (S == 2) {
        jac2_SFX(q[0], q[1], x[0], x[1], l2, g, out, out + 1);
        return;
    }
    if (!l2) {
        real s = 0;
        for (int k = 0; k < S; k++) s += q[k] * x[k];
        for (int k = 0; k < S; k++) out[k] = (q[k] * x[k] - q[k] * s) / g;
    } else {
        real s = 0, n = 0;
        for (int k = 0; k < S; k++) if (q[k] > 0) { s += x[k]; n += 1; }
        for (int k = 0; k < S; k++) out[k] = q[k] > 0 ? (x[k] - s / n) / g : (real)0.0 / g;
    }
}

static inline int64_t chain_len_SFX(const int64_t *lens, int64_t b, int64_t T)
{
    return lens ? lens[b] : T;
}

/* ---- Alg. 3 forward for S = 2, a block of CB chains at a time, vectorised across the chains ----------------------
   Each step t runs over the block's chains in an inner loop that the compiler vectorises (SIMD lanes = chains; the
   recursion is sequential in t, so there is nothing to vectorise inside one chain). With glibc's libmvec the exp and
   log1p of the entropy case become vector calls; GCC stops if-converting a loop at a call, so the transcendental part
   is a loop of its own, free of branches, and the selects (padding masks, which state is larger) come in a second
   loop. The arithmetic is that of maxarg2 above, operation for operation: min(ya, yb) = −|x0 − x1|/γ exactly (one of
   a, b is 0 after the shift by the max, and fl(x1 − x0) = −fl(x0 − x1)). Padded steps (t ≥ L) are computed on the
   (finite) padding and discarded by the masks. */

VEC_CLONES static void forward2_block_SFX(int64_t b0, int64_t nb, int64_t T, const real *theta, const int64_t *lens, int l2,
                               real g, real *value, real *Q, real *r)
{
    real v0[CB], v1[CB], ex0[CB], ex1[CB], lp0[CB], lp1[CB]; /* v_{t-1}; exp(-|x_i0 - x_i1|/g) and its log1p */
    int64_t L[CB];
    const int64_t TS = 4 * T;
    for (int64_t i = 0; i < nb; i++) { v0[i] = 0; v1[i] = 0; L[i] = chain_len_SFX(lens, b0 + i, T); }
    for (int64_t t = 0; t < T; t++) {
        const real *th = theta + b0 * TS + 4 * t;
        real *q = Q + b0 * TS + 4 * t;
        if (!l2) {
            #pragma omp simd
            for (int64_t i = 0; i < nb; i++) {
                const real *thi = th + i * TS;
                real d0 = (thi[0] + v0[i]) - (thi[1] + v1[i]);
                real d1 = (thi[2] + v0[i]) - (thi[3] + v1[i]);
                ex0[i] = EXP(-FABS(d0) / g);
                ex1[i] = EXP(-FABS(d1) / g);
                lp0[i] = LOG1P(ex0[i]);
                lp1[i] = LOG1P(ex1[i]);
            }
            #pragma omp simd
            for (int64_t i = 0; i < nb; i++) {
                const real *thi = th + i * TS;
                real *qi = q + i * TS;
                real x00 = thi[0] + v0[i], x01 = thi[1] + v1[i], x10 = thi[2] + v0[i], x11 = thi[3] + v1[i];
                real inv0 = (real)1.0 / ((real)1.0 + ex0[i]), inv1 = (real)1.0 / ((real)1.0 + ex1[i]);
                real m0 = x00 >= x01 ? x00 : x01, m1 = x10 >= x11 ? x10 : x11;
                int act = t < L[i];
                qi[0] = act ? (x00 < x01 ? ex0[i] * inv0 : inv0) : (real)0.0;
                qi[1] = act ? (x00 < x01 ? inv0 : ex0[i] * inv0) : (real)0.0;
                qi[2] = act ? (x10 < x11 ? ex1[i] * inv1 : inv1) : (real)0.0;
                qi[3] = act ? (x10 < x11 ? inv1 : ex1[i] * inv1) : (real)0.0;
                real v_next0 = g * lp0[i] + m0, v_next1 = g * lp1[i] + m1;
                v0[i] = act ? v_next0 : v0[i];
                v1[i] = act ? v_next1 : v1[i];
            }
        } else {
            #pragma omp simd
            for (int64_t i = 0; i < nb; i++) {
                const real *thi = th + i * TS;
                real *qi = q + i * TS;
                real p[4], v_next0, v_next1;
                L2MAX2(thi[0] + v0[i], thi[1] + v1[i], g, p[0], p[1], v_next0);
                L2MAX2(thi[2] + v0[i], thi[3] + v1[i], g, p[2], p[3], v_next1);
                int act = t < L[i];
                for (int k = 0; k < 4; k++) qi[k] = act ? p[k] : (real)0.0;
                v0[i] = act ? v_next0 : v0[i];
                v1[i] = act ? v_next1 : v1[i];
            }
        }
    }
    for (int64_t i = 0; i < nb; i++)
        value[b0 + i] = maxarg2_SFX(v0[i], v1[i], l2, g, r + 2 * (b0 + i), r + 2 * (b0 + i) + 1);
}

/* ---- Alg. 3 forward: value (B), Q (B,T,S,S), r (B,S) ----------------------------------------------------------- */

void vit_forward_SFX(int64_t B, int64_t T, int64_t S, const real *theta, const int64_t *lens, int l2, double gd,
                     real *value, real *Q, real *r)
{
    real g = (real)gd;
    const int64_t TSS = T * S * S;
    if (S == 2) {
        for (int64_t b0 = 0; b0 < B; b0 += CB)
            forward2_block_SFX(b0, B - b0 < CB ? B - b0 : CB, T, theta, lens, l2, g, value, Q, r);
        return;
    }
    real v[S], v_next[S], x[S], y[S], ys[S];
    for (int64_t b = 0; b < B; b++) {
        const real *thetab = theta + b * TSS;
        real *Qb = Q + b * TSS;
        int64_t L = chain_len_SFX(lens, b, T);
        for (int64_t k = 0; k < S; k++) v[k] = 0;
        for (int64_t t = 0; t < L; t++) {
            for (int64_t i = 0; i < S; i++) {
                const real *th = thetab + (t * S + i) * S;
                for (int64_t j = 0; j < S; j++) x[j] = th[j] + v[j];
                v_next[i] = maxarg_SFX(x, (int)S, l2, g, Qb + (t * S + i) * S, y, ys);
            }
            for (int64_t k = 0; k < S; k++) v[k] = v_next[k];
        }
        memset(Qb + L * S * S, 0, sizeof(real) * S * S * (T - L));
        value[b] = maxarg_SFX(v, (int)S, l2, g, r + b * S, y, ys);
    }
}

/* ---- Alg. 3 backward: E (B,T,S,S), U (B,T,S) with U[:, t] = u_{t+1} --------------------------------------------- */

void vit_backward_SFX(int64_t B, int64_t T, int64_t S, const real *Q, const real *r, const int64_t *lens,
                      real *E, real *U)
{
    const int64_t TSS = T * S * S;
    if (S == 2) {
        for (int64_t b = 0; b < B; b++) {
            const real *Qb = Q + b * TSS;
            real *Eb = E + b * TSS, *Ub = U + b * T * 2;
            int64_t L = chain_len_SFX(lens, b, T);
            real u0 = r[2 * b], u1 = r[2 * b + 1];
            for (int64_t t = T - 1; t >= L; t--) {
                Ub[2 * t] = u0; Ub[2 * t + 1] = u1;
            }
            memset(Eb + 4 * L, 0, sizeof(real) * 4 * (T - L));
            for (int64_t t = L - 1; t >= 0; t--) {
                const real *q = Qb + 4 * t;
                real *e = Eb + 4 * t;
                Ub[2 * t] = u0; Ub[2 * t + 1] = u1;
                e[0] = q[0] * u0; e[1] = q[1] * u0;
                e[2] = q[2] * u1; e[3] = q[3] * u1;
                u0 = e[0] + e[2];
                u1 = e[1] + e[3];
            }
        }
        return;
    }
    real u[S], u_next[S];
    for (int64_t b = 0; b < B; b++) {
        const real *Qb = Q + b * TSS;
        real *Eb = E + b * TSS, *Ub = U + b * T * S;
        int64_t L = chain_len_SFX(lens, b, T);
        for (int64_t k = 0; k < S; k++) u[k] = r[b * S + k];
        for (int64_t t = T - 1; t >= L; t--)
            for (int64_t k = 0; k < S; k++) Ub[t * S + k] = u[k];
        memset(Eb + L * S * S, 0, sizeof(real) * S * S * (T - L));
        for (int64_t t = L - 1; t >= 0; t--) {
            for (int64_t k = 0; k < S; k++) { Ub[t * S + k] = u[k]; u_next[k] = 0; }
            for (int64_t i = 0; i < S; i++) {
                const real *q = Qb + (t * S + i) * S;
                real *e = Eb + (t * S + i) * S;
                for (int64_t j = 0; j < S; j++) { e[j] = q[j] * u[i]; u_next[j] += e[j]; }
            }
            for (int64_t k = 0; k < S; k++) u[k] = u_next[k];
        }
    }
}

/* ---- Alg. 3 forward + backward in one call (the marginals) --------------------------------------------------- */

void vit_marginals_SFX(int64_t B, int64_t T, int64_t S, const real *theta, const int64_t *lens, int l2, double gd,
                       real *value, real *Q, real *r, real *E, real *U)
{
    vit_forward_SFX(B, T, S, theta, lens, l2, gd, value, Q, r);
    vit_backward_SFX(B, T, S, Q, r, lens, E, U);
}

/* ---- Alg. 4: dot (B) = <E, Z> = v_dot_{T+1}, E_dot (B,T,S,S) = Hessian(theta) Z ------------------------------
   The tangent q_dot of step t is written into E_dot[t] by the forward sweep and consumed in place by the reverse
   sweep (e_dot_t depends on q_dot_t only), so no workspace is needed. */

void vit_hvp_SFX(int64_t B, int64_t T, int64_t S, const real *Q, const real *U, const real *r, const real *Z,
                 const int64_t *lens, int l2, double gd, real *dot, real *E_dot)
{
    real g = (real)gd;
    const int64_t TSS = T * S * S;
    if (S == 2) {
        for (int64_t b = 0; b < B; b++) {
            const real *Qb = Q + b * TSS, *Zb = Z + b * TSS, *Ub = U + b * T * 2;
            real *E_dotb = E_dot + b * TSS;
            int64_t L = chain_len_SFX(lens, b, T);
            real v_dot0 = 0, v_dot1 = 0;
            for (int64_t t = 0; t < L; t++) {
                const real *q = Qb + 4 * t, *z = Zb + 4 * t;
                real *q_dot = E_dotb + 4 * t;
                real x_dot[4] = {z[0] + v_dot0, z[1] + v_dot1, z[2] + v_dot0, z[3] + v_dot1};
                real v_dot_next0 = q[0] * x_dot[0] + q[1] * x_dot[1];
                real v_dot_next1 = q[2] * x_dot[2] + q[3] * x_dot[3];
                jac_SFX(q, x_dot, 2, l2, g, q_dot);
                jac_SFX(q + 2, x_dot + 2, 2, l2, g, q_dot + 2);
                v_dot0 = v_dot_next0; v_dot1 = v_dot_next1;
            }
            const real *rb = r + 2 * b;
            real v_dot[2] = {v_dot0, v_dot1}, u_dot[2];
            dot[b] = rb[0] * v_dot0 + rb[1] * v_dot1;
            jac_SFX(rb, v_dot, 2, l2, g, u_dot);
            memset(E_dotb + 4 * L, 0, sizeof(real) * 4 * (T - L));
            real u_dot0 = u_dot[0], u_dot1 = u_dot[1];
            for (int64_t t = L - 1; t >= 0; t--) {
                const real *q = Qb + 4 * t, *u = Ub + 2 * t;
                real *e_dot = E_dotb + 4 * t;
                const real *q_dot = e_dot; /* parked here by the forward sweep; each element read before written */
                e_dot[0] = q[0] * u_dot0 + q_dot[0] * u[0];
                e_dot[1] = q[1] * u_dot0 + q_dot[1] * u[0];
                e_dot[2] = q[2] * u_dot1 + q_dot[2] * u[1];
                e_dot[3] = q[3] * u_dot1 + q_dot[3] * u[1];
                u_dot0 = e_dot[0] + e_dot[2];
                u_dot1 = e_dot[1] + e_dot[3];
            }
        }
        return;
    }
    real v_dot[S], v_dot_next[S], x_dot[S], u_dot[S], u_dot_next[S];
    for (int64_t b = 0; b < B; b++) {
        const real *Qb = Q + b * TSS, *Zb = Z + b * TSS, *Ub = U + b * T * S;
        real *E_dotb = E_dot + b * TSS;
        int64_t L = chain_len_SFX(lens, b, T);
        for (int64_t k = 0; k < S; k++) v_dot[k] = 0;
        for (int64_t t = 0; t < L; t++) {
            for (int64_t i = 0; i < S; i++) {
                const real *q = Qb + (t * S + i) * S, *z = Zb + (t * S + i) * S;
                real s = 0;
                for (int64_t j = 0; j < S; j++) { x_dot[j] = z[j] + v_dot[j]; s += q[j] * x_dot[j]; }
                v_dot_next[i] = s;
                jac_SFX(q, x_dot, (int)S, l2, g, E_dotb + (t * S + i) * S); /* q_dot_{t,i} */
            }
            for (int64_t k = 0; k < S; k++) v_dot[k] = v_dot_next[k];
        }
        const real *rb = r + b * S;
        real s = 0;
        for (int64_t k = 0; k < S; k++) s += rb[k] * v_dot[k];
        dot[b] = s;
        jac_SFX(rb, v_dot, (int)S, l2, g, u_dot);
        memset(E_dotb + L * S * S, 0, sizeof(real) * S * S * (T - L));
        for (int64_t t = L - 1; t >= 0; t--) {
            const real *u = Ub + t * S;
            for (int64_t k = 0; k < S; k++) u_dot_next[k] = 0;
            for (int64_t i = 0; i < S; i++) {
                const real *q = Qb + (t * S + i) * S;
                real *e_dot = E_dotb + (t * S + i) * S;
                const real *q_dot = e_dot; /* parked here by the forward sweep */
                for (int64_t j = 0; j < S; j++) {
                    e_dot[j] = q[j] * u_dot[i] + q_dot[j] * u[i];
                    u_dot_next[j] += e_dot[j];
                }
            }
            for (int64_t k = 0; k < S; k++) u_dot[k] = u_dot_next[k];
        }
    }
}
"""

_HEADER = r"""#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#define CB @CB@ /* chains per block of the vectorised S = 2 passes: their state (v, exp, log1p) stays in L1 */
/* glibc >= 2.35 on x86-64 ships vector versions of exp and log1p (libmvec); declaring them lets GCC vectorise the
   loops that call them (with -fopenmp-simd -fno-math-errno), without -ffast-math, whose crtfastmath.o would flush
   denormals to zero process-wide. Elsewhere the loops stay scalar and give the same results. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
__attribute__((simd("notinbranch"))) float expf(float);
__attribute__((simd("notinbranch"))) float log1pf(float);
__attribute__((simd("notinbranch"))) double exp(double);
__attribute__((simd("notinbranch"))) double log1p(double);
#endif
/* The vectorised loops are compiled three times, for SSE2 (any x86-64), AVX2 and AVX-512, and the loader picks the
   widest the CPU has (GCC function multiversioning, an ifunc): 4, 8 or 16 float lanes, with libmvec's matching exp
   and log1p. The library stays portable across x86-64 machines (one cached file may serve several). A compiler that
   refuses the attribute gets a second try with -DSTRUCTATTN_NO_CLONES (kernels/cpu.py). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35)) && !defined(STRUCTATTN_NO_CLONES)
#define VEC_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define VEC_CLONES
#endif
"""


def source() -> str:
    """The full C translation unit: the body instantiated for float (``_f32``) and double (``_f64``)."""
    parts = [_HEADER.replace("@CB@", str(CHAINS_PER_BLOCK))]
    for real, sfx, exp, log, log1p, tiny in (
        ("float", "f32", "expf", "logf", "log1pf", "FLT_MIN"),
        ("double", "f64", "exp", "log", "log1p", "DBL_MIN"),
    ):
        body = (_BODY + _SEGMENT_BODY).replace("_SFX", "_" + sfx).replace("EXP(", exp + "(").replace("LOG(", log + "(")
        body = body.replace("LOG1P(", log1p + "(").replace("FABS(", ("fabsf(" if real == "float" else "fabs("))
        body = body.replace("REAL_TINY", tiny)  # torch.finfo(dtype).tiny: the dead-row threshold of the unfused path
        parts.append(f"#define real {real}\n{body}\n#undef real\n")
    return "".join(parts)
