"""C source of the fused segmentation-attention normaliser (:mod:`structattn.ops.segmentation`), S = 2.

One call maps the scores of N attention rows to their weights, the whole of ``viterbi_attention`` (ICML 2018 §5):
compaction of the real positions, optional centring (the stable form), θ[t, 1, j] = s_t + T[1, j],
θ[t, 0, j] = T[0, j] built on the fly (never stored), Alg. 3 forward and backward sweeps, p_t = E[t, 1, 0] +
E[t, 1, 1], w = p / Σp or the softmax fallback of a dead row, and the scatter back to the rows' columns. The
backward call maps ∂L/∂w (and ∂L/∂p) to ∂L/∂s and ∂L/∂T: the normalisation's and the fallback's Jacobians, then
Alg. 4 with the direction Z[t, 1, j] = ḡ_t, Z[t, 0, j] = 0, and θ's Jacobian (∂L/∂s_t = Ė[t, 1, 0] + Ė[t, 1, 1],
∂L/∂T = Σ_t Ė[t]). Replacing the ~20 tensor operations (and their autograd nodes) of the unfused path by two calls
is what brings the normaliser near softmax's cost (benchmarks/RESULTS.md).

Layout. Chains are processed in blocks of CB; inside a block every per-step array is chain-minor (``x[t * CB + i]``
for chain i), so the inner loops over the chains of a block read and write consecutive addresses and vectorise (the
2-state recursion is sequential in t: SIMD lanes are chains, not states). The saved Q (Alg. 3's argmax gradients),
U (adjoints) and r are stored block by block in that layout: (nblocks, T, 4, CB), (nblocks, T, 2, CB),
(nblocks, 2, CB). Blocks are independent: with ``nthreads`` > 1 they are split between POSIX threads (the caller
decides when the work is large enough to pay for starting threads); every output element is written by one thread
and ∂L/∂T is reduced afterwards in row order, so the results do not depend on the thread count.

The arithmetic of each step is that of the unfused kernels (``_cpu_source``), operation for operation, so the fused
and unfused paths agree to float rounding (the sums over a row — the mean of the centring, Σp, the reductions of
∂L/∂T — are taken in a different order than torch's reductions).

Transitions: row b uses ``trans[(b / tdiv) % M]`` ((M, 2, 2) contiguous): M = 1 shares one matrix, M = N gives one
per row, and M = heads, tdiv = queries serves the (batch, head, query) rows of multi-head attention without
expanding T per row.
"""

_SEGMENT_BODY = r"""
/* ---- fused segmentation attention, S = 2 ------------------------------------------------------------------------ */

typedef struct seg_args_SFX {
    int64_t N, T, tdiv, M;
    int centre, l2;
    real g;
    const real *s, *trans, *gw, *gp, *w_in;
    const uint8_t *mask;
    real *w, *p, *Q, *U, *r, *tot, *gs, *gTrow;
    int32_t *idx, *len, *flags;
    int64_t blk0, blk1;                 /* the blocks of this worker */
    int status;                         /* forward: rows with a non-finite input; -1: out of memory */
    void (*fn)(struct seg_args_SFX *);
} seg_args_SFX;

static void *seg_thread_SFX(void *arg)
{
    seg_args_SFX *a = (seg_args_SFX *)arg;
    a->fn(a);
    return NULL;
}

/* Run a->fn on blocks [0, nblk) with up to nthreads threads (the calling thread is one of them). */
static int seg_run_SFX(seg_args_SFX *a, int64_t nblk, int nthreads)
{
    if (nthreads > nblk) nthreads = (int)nblk;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    seg_args_SFX part[64];
    pthread_t tid[64];
    int started[64];
    for (int k = 0; k < nthreads; k++) {
        part[k] = *a;
        part[k].blk0 = nblk * k / nthreads;
        part[k].blk1 = nblk * (k + 1) / nthreads;
        part[k].status = 0;
        started[k] = 0;
    }
    for (int k = 1; k < nthreads; k++)
        started[k] = pthread_create(&tid[k], NULL, seg_thread_SFX, &part[k]) == 0;
    a->fn(&part[0]);
    /* a thread that could not be started: its blocks run here */
    for (int k = 1; k < nthreads; k++) {
        if (started[k]) pthread_join(tid[k], NULL);
        else a->fn(&part[k]);
    }
    int status = 0;
    for (int k = 0; k < nthreads; k++) {
        if (part[k].status < 0) return -1;
        status += part[k].status;
    }
    return status;
}

VEC_CLONES static void seg_forward_blocks_SFX(seg_args_SFX *a)
{
    const int64_t N = a->N, T = a->T;
    const real g = a->g;
    const int l2 = a->l2;
    const size_t rows = (size_t)(T > 0 ? T : 1) * CB;
    real *X = (real *)malloc(sizeof(real) * rows), *P = (real *)malloc(sizeof(real) * rows);
    if (!X || !P) { free(X); free(P); a->status = -1; return; }
    for (int64_t blk = a->blk0; blk < a->blk1; blk++) {
        const int64_t b0 = blk * CB, nb = N - b0 < CB ? N - b0 : CB;
        real *Qk = a->Q + blk * T * 4 * CB, *Uk = a->U + blk * T * 2 * CB, *rk = a->r + blk * 2 * CB;
        real t00[CB], t01[CB], t10[CB], t11[CB], v0[CB], v1[CB], ex0[CB], ex1[CB], lp0[CB], lp1[CB];
        real u0[CB], u1[CB];
        int64_t L[CB], Lmax = 0;
        int bad_row[CB];
        real Lr[CB]; /* L as a real: the step masks then compare reals, which vectorise with the real lanes */
        /* compaction (and centring) of the real positions; transitions of each chain */
        for (int64_t i = 0; i < nb; i++) {
            const int64_t b = b0 + i;
            const real *sb = a->s + b * T;
            const uint8_t *mb = a->mask ? a->mask + b * T : NULL;
            int32_t *ib = a->idx + b * T;
            const real *tr = a->trans + 4 * ((b / a->tdiv) % a->M);
            int64_t k = 0;
            real sum = 0;
            for (int64_t t = 0; t < T; t++) {
                if (mb && mb[t]) continue;
                X[k * CB + i] = sb[t];
                ib[k] = (int32_t)t;
                sum += sb[t];
                k++;
            }
            /* NaN and inf are absorbing: a finite sum means finite scores (an overflowing sum is told apart) */
            int bad = !(isfinite(tr[0]) && isfinite(tr[1]) && isfinite(tr[2]) && isfinite(tr[3]));
            if (!isfinite(sum))
                for (int64_t j = 0; j < k; j++) bad |= !isfinite(X[j * CB + i]);
            if (a->centre && k > 0) {
                real mean = sum / (real)k;
                if (!bad && !isfinite(sum)) { /* finite scores whose sum overflows: average the scaled scores */
                    mean = 0;
                    for (int64_t j = 0; j < k; j++) mean += X[j * CB + i] / (real)k;
                }
                for (int64_t j = 0; j < k; j++) X[j * CB + i] -= mean;
            }
            for (int64_t j = k; j < T; j++) { X[j * CB + i] = 0; ib[j] = -1; }
            L[i] = k;
            Lr[i] = (real)k;
            a->len[b] = (int32_t)k;
            if (k > Lmax) Lmax = k;
            t00[i] = tr[0]; t01[i] = tr[1]; t10[i] = tr[2]; t11[i] = tr[3];
            v0[i] = 0; v1[i] = 0;
            bad_row[i] = bad;
            a->status += bad;
        }
        /* The saved buffers are returned to torch: every element gets a defined value, also the steps after the
           block's longest chain and the lanes after the last chain of a partial block. */
        memset(Qk + Lmax * 4 * CB, 0, sizeof(real) * (size_t)(T - Lmax) * 4 * CB);
        memset(Uk + Lmax * 2 * CB, 0, sizeof(real) * (size_t)(T - Lmax) * 2 * CB);
        for (int64_t i = nb; i < CB; i++) {
            for (int64_t t = 0; t < Lmax; t++) {
                for (int k = 0; k < 4; k++) Qk[(t * 4 + k) * CB + i] = 0;
                for (int k = 0; k < 2; k++) Uk[(t * 2 + k) * CB + i] = 0;
            }
            rk[i] = 0;
            rk[CB + i] = 0;
        }
        /* Alg. 3 forward: v_t = max_Omega(theta_t + v_{t-1}), Q_t its gradient (see forward2_block) */
        for (int64_t t = 0; t < Lmax; t++) {
            const real tt = (real)t, *x = X + t * CB;
            real *q = Qk + t * 4 * CB;
            if (!l2) {
                #pragma omp simd
                for (int64_t i = 0; i < nb; i++) {
                    real d0 = (t00[i] + v0[i]) - (t01[i] + v1[i]);
                    real d1 = ((x[i] + t10[i]) + v0[i]) - ((x[i] + t11[i]) + v1[i]);
                    ex0[i] = EXP(-FABS(d0) / g);
                    ex1[i] = EXP(-FABS(d1) / g);
                    lp0[i] = LOG1P(ex0[i]);
                    lp1[i] = LOG1P(ex1[i]);
                }
                #pragma omp simd
                for (int64_t i = 0; i < nb; i++) {
                    real x00 = t00[i] + v0[i], x01 = t01[i] + v1[i];
                    real x10 = (x[i] + t10[i]) + v0[i], x11 = (x[i] + t11[i]) + v1[i];
                    real inv0 = (real)1.0 / ((real)1.0 + ex0[i]), inv1 = (real)1.0 / ((real)1.0 + ex1[i]);
                    real m0 = x00 >= x01 ? x00 : x01, m1 = x10 >= x11 ? x10 : x11;
                    int act = tt < Lr[i];
                    q[i] = act ? (x00 < x01 ? ex0[i] * inv0 : inv0) : (real)0.0;
                    q[CB + i] = act ? (x00 < x01 ? inv0 : ex0[i] * inv0) : (real)0.0;
                    q[2 * CB + i] = act ? (x10 < x11 ? ex1[i] * inv1 : inv1) : (real)0.0;
                    q[3 * CB + i] = act ? (x10 < x11 ? inv1 : ex1[i] * inv1) : (real)0.0;
                    real v_next0 = g * lp0[i] + m0, v_next1 = g * lp1[i] + m1;
                    v0[i] = act ? v_next0 : v0[i];
                    v1[i] = act ? v_next1 : v1[i];
                }
            } else {
                #pragma omp simd
                for (int64_t i = 0; i < nb; i++) {
                    real x00 = t00[i] + v0[i], x01 = t01[i] + v1[i];
                    real x10 = (x[i] + t10[i]) + v0[i], x11 = (x[i] + t11[i]) + v1[i];
                    real pq[4], v_next0, v_next1;
                    L2MAX2(x00, x01, g, pq[0], pq[1], v_next0);
                    L2MAX2(x10, x11, g, pq[2], pq[3], v_next1);
                    int act = tt < Lr[i];
                    for (int k = 0; k < 4; k++) q[k * CB + i] = act ? pq[k] : (real)0.0;
                    v0[i] = act ? v_next0 : v0[i];
                    v1[i] = act ? v_next1 : v1[i];
                }
            }
        }
        for (int64_t i = 0; i < nb; i++) {
            /* finite scores and transitions whose potentials (s_t + T[1, j]) or running values overflow: refused like
               non-finite input (the unfused path would return NaN weights or fall back to softmax silently) */
            if (!(isfinite(v0[i]) && isfinite(v1[i])) && !bad_row[i]) a->status++;
            maxarg2_SFX(v0[i], v1[i], l2, g, rk + i, rk + CB + i);
            u0[i] = rk[i];
            u1[i] = rk[CB + i];
        }
        /* Alg. 3 backward: E_t = Q_t * u_{t+1} (rows scaled), u_t = E_t summed over i; U[t] = u_{t+1} */
        for (int64_t t = Lmax - 1; t >= 0; t--) {
            const real tt = (real)t, *q = Qk + t * 4 * CB;
            real *u = Uk + t * 2 * CB, *pt = P + t * CB;
            #pragma omp simd
            for (int64_t i = 0; i < nb; i++) {
                int act = tt < Lr[i];
                u[i] = u0[i];
                u[CB + i] = u1[i];
                real e00 = q[i] * u0[i], e01 = q[CB + i] * u0[i];
                real e10 = q[2 * CB + i] * u1[i], e11 = q[3 * CB + i] * u1[i];
                pt[i] = e10 + e11;
                u0[i] = act ? e00 + e10 : u0[i];
                u1[i] = act ? e01 + e11 : u1[i];
            }
        }
        /* w = p / sum(p), or the softmax fallback of a dead row; scattered back to the real columns */
        for (int64_t i = 0; i < nb; i++) {
            const int64_t b = b0 + i, n = L[i];
            const int32_t *ib = a->idx + b * T;
            real *wb = a->w + b * T, *pb = a->p + b * T;
            memset(wb, 0, sizeof(real) * T);
            memset(pb, 0, sizeof(real) * T);
            real tot = 0;
            int binary = 1;
            for (int64_t k = 0; k < n; k++) {
                tot += P[k * CB + i];
                binary &= P[k * CB + i] == (real)0.0 || P[k * CB + i] == (real)1.0;
            }
            a->tot[b] = tot;
            /* has a real position | dead (falls back to softmax) | frozen (binary marginals): see
               structattn.attention.dead_rows and frozen_rows */
            a->flags[b] = n > 0 ? 1 | (tot > REAL_TINY ? 0 : 2) | (binary ? 4 : 0) : 0;
            for (int64_t k = 0; k < n; k++) pb[ib[k]] = P[k * CB + i];
            if (tot > REAL_TINY) {
                /* a division, not a product with 1/tot: a row with one real position gets exactly w = 1 */
                for (int64_t k = 0; k < n; k++) wb[ib[k]] = P[k * CB + i] / tot;
            } else if (n > 0) {
                real m = X[i];
                for (int64_t k = 1; k < n; k++) m = X[k * CB + i] > m ? X[k * CB + i] : m;
                real z = 0;
                for (int64_t k = 0; k < n; k++) z += (P[k * CB + i] = EXP(X[k * CB + i] - m));
                for (int64_t k = 0; k < n; k++) wb[ib[k]] = P[k * CB + i] / z;
            }
        }
    }
    free(X);
    free(P);
}

/* Alg. 4, forward sweep at step t over the chains of a block: v_dot_t and the tangents q_dot_t (parked in QD). L2 is a
   literal 0 or 1: each loop is compiled for one Omega, without a branch that would stop its vectorisation. */
#define SEG_HVP_FORWARD_STEP(L2) do {                                                                              \
        _Pragma("omp simd")                                                                                        \
        for (int64_t i = 0; i < nb; i++) {                                                                         \
            int act = tt < Lr[i];                                                                                  \
            real q0 = q[i], q1 = q[CB + i], q2 = q[2 * CB + i], q3 = q[3 * CB + i];                                \
            real x0 = vd0[i], x1 = vd1[i], x2 = z[i] + vd0[i], x3 = z[i] + vd1[i];                                 \
            real n0 = q0 * x0 + q1 * x1, n1 = q2 * x2 + q3 * x3;                                                   \
            jac2_SFX(q0, q1, x0, x1, L2, g, qd + i, qd + CB + i);                                                \
            jac2_SFX(q2, q3, x2, x3, L2, g, qd + 2 * CB + i, qd + 3 * CB + i);                                   \
            vd0[i] = act ? n0 : vd0[i];                                                                            \
            vd1[i] = act ? n1 : vd1[i];                                                                            \
        }                                                                                                          \
    } while (0)

VEC_CLONES static void seg_backward_blocks_SFX(seg_args_SFX *a)
{
    const int64_t N = a->N, T = a->T;
    const real g = a->g;
    const int l2 = a->l2;
    const size_t rows = (size_t)(T > 0 ? T : 1) * CB;
    real *Z = (real *)malloc(sizeof(real) * rows), *GS = (real *)malloc(sizeof(real) * rows);
    real *QD = (real *)malloc(sizeof(real) * rows * 4);
    if (!Z || !GS || !QD) { free(Z); free(GS); free(QD); a->status = -1; return; }
    for (int64_t blk = a->blk0; blk < a->blk1; blk++) {
        const int64_t b0 = blk * CB, nb = N - b0 < CB ? N - b0 : CB;
        const real *Qk = a->Q + blk * T * 4 * CB, *Uk = a->U + blk * T * 2 * CB, *rk = a->r + blk * 2 * CB;
        real vd0[CB], vd1[CB], ud0[CB], ud1[CB], c[CB], a00[CB], a01[CB], a10[CB], a11[CB];
        int64_t L[CB], Lmax = 0;
        real Lr[CB]; /* as in the forward */
        int ok[CB];
        /* the direction of Alg. 4: Z[t, 1, j] = dL/dp_t through w = p / sum(p) (ok rows) and p itself */
        for (int64_t i = 0; i < nb; i++) {
            const int64_t b = b0 + i, n = a->len[b];
            const int32_t *ib = a->idx + b * T;
            const real *gwb = a->gw + b * T, *wb = a->w_in + b * T, *gpb = a->gp ? a->gp + b * T : NULL;
            const real tot = a->tot[b];
            real cc = 0;
            for (int64_t k = 0; k < n; k++) cc += gwb[ib[k]] * wb[ib[k]];
            ok[i] = tot > REAL_TINY;
            for (int64_t k = 0; k < n; k++) {
                real z = gpb ? gpb[ib[k]] : (real)0.0;
                Z[k * CB + i] = ok[i] ? z + (gwb[ib[k]] - cc) / tot : z;
            }
            for (int64_t k = n; k < T; k++) Z[k * CB + i] = 0;
            L[i] = n;
            Lr[i] = (real)n;
            if (n > Lmax) Lmax = n;
            c[i] = cc;
            vd0[i] = 0; vd1[i] = 0;
            a00[i] = 0; a01[i] = 0; a10[i] = 0; a11[i] = 0;
        }
        /* Alg. 4, forward sweep */
        for (int64_t t = 0; t < Lmax; t++) {
            const real tt = (real)t, *q = Qk + t * 4 * CB, *z = Z + t * CB;
            real *qd = QD + t * 4 * CB;
            if (!l2) SEG_HVP_FORWARD_STEP(0);
            else SEG_HVP_FORWARD_STEP(1);
        }
        for (int64_t i = 0; i < nb; i++) {
            jac2_SFX(rk[i], rk[CB + i], vd0[i], vd1[i], l2, g, ud0 + i, ud1 + i);
        }
        /* Alg. 4, reverse sweep: E_dot_t = Q_t * u_dot_{t+1} + Q_dot_t * u_{t+1}; dL/ds_t = E_dot[t, 1, :] summed */
        for (int64_t t = Lmax - 1; t >= 0; t--) {
            const real tt = (real)t, *q = Qk + t * 4 * CB, *qd = QD + t * 4 * CB, *u = Uk + t * 2 * CB;
            real *gst = GS + t * CB;
            #pragma omp simd
            for (int64_t i = 0; i < nb; i++) {
                int act = tt < Lr[i];
                real e00 = q[i] * ud0[i] + qd[i] * u[i];
                real e01 = q[CB + i] * ud0[i] + qd[CB + i] * u[i];
                real e10 = q[2 * CB + i] * ud1[i] + qd[2 * CB + i] * u[CB + i];
                real e11 = q[3 * CB + i] * ud1[i] + qd[3 * CB + i] * u[CB + i];
                gst[i] = e10 + e11;
                a00[i] += act ? e00 : (real)0.0;
                a01[i] += act ? e01 : (real)0.0;
                a10[i] += act ? e10 : (real)0.0;
                a11[i] += act ? e11 : (real)0.0;
                ud0[i] = act ? e00 + e10 : ud0[i];
                ud1[i] = act ? e01 + e11 : ud1[i];
            }
        }
        /* the fallback's softmax Jacobian (dead rows), the centring's, and the scatter back */
        for (int64_t i = 0; i < nb; i++) {
            const int64_t b = b0 + i, n = L[i];
            const int32_t *ib = a->idx + b * T;
            const real *gwb = a->gw + b * T, *wb = a->w_in + b * T;
            real *gsb = a->gs + b * T;
            memset(gsb, 0, sizeof(real) * T);
            if (!ok[i])
                for (int64_t k = 0; k < n; k++) GS[k * CB + i] += wb[ib[k]] * (gwb[ib[k]] - c[i]);
            if (a->centre && n > 0) {
                real m = 0;
                for (int64_t k = 0; k < n; k++) m += GS[k * CB + i];
                m /= (real)n;
                for (int64_t k = 0; k < n; k++) GS[k * CB + i] -= m;
            }
            for (int64_t k = 0; k < n; k++) gsb[ib[k]] = GS[k * CB + i];
            real *gt = a->gTrow + 4 * b;
            gt[0] = a00[i]; gt[1] = a01[i]; gt[2] = a10[i]; gt[3] = a11[i];
        }
    }
    free(Z);
    free(GS);
    free(QD);
}

/* The arguments both passes share; the rest of the struct zeroed (no pointer left undefined). */
static void seg_args_init_SFX(seg_args_SFX *a, int64_t N, int64_t T, int64_t tdiv, int64_t M, int centre, int l2,
                              double gd)
{
    memset(a, 0, sizeof *a);
    a->N = N; a->T = T; a->tdiv = tdiv; a->M = M; a->centre = centre; a->l2 = l2; a->g = (real)gd;
}

/* Forward: w, p (N, T), flags (N): 1 = the row has a real position, 2 = dead, 4 = frozen; saved Q, U, r (block
   layout), tot (N), idx (N, T), len (N). Returns the number of rows with a non-finite real score or transition (then
   the outputs are meaningless), or -1 when out of memory. */
int seg_forward_SFX(int64_t N, int64_t T, const real *s, const uint8_t *mask, const real *trans, int64_t tdiv,
                    int64_t M, int centre, int l2, double gd, int nthreads, real *w, real *p, int32_t *flags,
                    real *Q, real *U, real *r, real *tot, int32_t *idx, int32_t *len)
{
    seg_args_SFX a;
    seg_args_init_SFX(&a, N, T, tdiv, M, centre, l2, gd);
    a.s = s; a.mask = mask; a.trans = trans;
    a.w = w; a.p = p; a.flags = flags; a.Q = Q; a.U = U; a.r = r; a.tot = tot; a.idx = idx; a.len = len;
    a.fn = seg_forward_blocks_SFX;
    return seg_run_SFX(&a, (N + CB - 1) / CB, nthreads);
}

/* Backward: gs (N, T) = dL/ds (0 on padding), gT (M, 4) = dL/dT from gw (and gp, or NULL) = dL/dw, dL/dp and the
   saved forward quantities (w as returned). Returns 0, or -1 when out of memory. */
int seg_backward_SFX(int64_t N, int64_t T, const real *gw, const real *gp, const real *w, const real *Q,
                     const real *U, const real *r, const real *tot, const int32_t *idx, const int32_t *len,
                     int64_t tdiv, int64_t M, int centre, int l2, double gd, int nthreads, real *gs, real *gT)
{
    real *gTrow = (real *)malloc(sizeof(real) * 4 * (size_t)(N > 0 ? N : 1)); /* dL/dT of each row */
    if (!gTrow) return -1;
    seg_args_SFX a;
    seg_args_init_SFX(&a, N, T, tdiv, M, centre, l2, gd);
    a.gw = gw; a.gp = gp; a.w_in = w; a.Q = (real *)Q; a.U = (real *)U; a.r = (real *)r; a.tot = (real *)tot;
    a.idx = (int32_t *)idx; a.len = (int32_t *)len; a.gs = gs; a.gTrow = gTrow;
    a.fn = seg_backward_blocks_SFX;
    int status = seg_run_SFX(&a, (N + CB - 1) / CB, nthreads);
    if (status < 0) { free(gTrow); return status; }
    /* dL/dT: rows summed in row order, whatever the threads did */
    memset(gT, 0, sizeof(real) * 4 * M);
    for (int64_t b = 0; b < N; b++) {
        real *gm = gT + 4 * ((b / tdiv) % M);
        for (int k = 0; k < 4; k++) gm[k] += gTrow[4 * b + k];
    }
    free(gTrow);
    return 0;
}

#undef SEG_HVP_FORWARD_STEP
#undef L2MAX2
"""
