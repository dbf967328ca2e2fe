//! The linear algebra of the study: dense row-major `f64` matrices, the SVD (from `faer`:
//! no hand-written decomposition), the subspace similarity of LoRA §7.2 (Eq. 4), the
//! projections of §7.3 (Table 7) and the intruder dimensions of Shuttleworth et al. 2024.

use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A dense row-major `rows × cols` matrix of `f64`.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows · cols` elements, row-major.
    pub data: Vec<f64>,
}

impl Matrix {
    /// A matrix from row-major data (`Err` when the length is not `rows · cols`).
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::invalid(format!(
                "a {rows}×{cols} matrix needs {} elements, got {}",
                rows * cols,
                data.len()
            )));
        }
        Ok(Matrix { rows, cols, data })
    }

    /// The zero matrix.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// Element `(i, j)`.
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The transpose.
    pub fn t(&self) -> Matrix {
        let mut out = Matrix::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                out.data[j * self.rows + i] = self.at(i, j);
            }
        }
        out
    }

    /// `self · other` (`Err` on mismatched inner dimensions).
    pub fn matmul(&self, other: &Matrix) -> Result<Matrix> {
        if self.cols != other.rows {
            return Err(Error::invalid(format!(
                "matmul: {}×{} · {}×{}",
                self.rows, self.cols, other.rows, other.cols
            )));
        }
        let mut out = Matrix::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            let o = &mut out.data[i * other.cols..(i + 1) * other.cols];
            for (k, &a) in self.row(i).iter().enumerate() {
                if a != 0.0 {
                    for (x, &b) in o.iter_mut().zip(other.row(k)) {
                        *x += a * b;
                    }
                }
            }
        }
        Ok(out)
    }

    /// `self · c`.
    pub fn scaled(&self, c: f64) -> Matrix {
        Matrix {
            rows: self.rows,
            cols: self.cols,
            data: self.data.iter().map(|x| x * c).collect(),
        }
    }

    /// `self + other` (`Err` on mismatched shapes).
    pub fn add(&self, other: &Matrix) -> Result<Matrix> {
        if (self.rows, self.cols) != (other.rows, other.cols) {
            return Err(Error::invalid("add: shapes differ"));
        }
        Ok(Matrix {
            rows: self.rows,
            cols: self.cols,
            data: self
                .data
                .iter()
                .zip(&other.data)
                .map(|(a, b)| a + b)
                .collect(),
        })
    }

    /// The first `n` rows.
    pub fn top_rows(&self, n: usize) -> Matrix {
        let n = n.min(self.rows);
        Matrix {
            rows: n,
            cols: self.cols,
            data: self.data[..n * self.cols].to_vec(),
        }
    }

    /// The Frobenius norm.
    pub fn frobenius(&self) -> f64 {
        self.data.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    /// A `rows × cols` matrix of independent `N(0, 1)` entries from a seeded ChaCha8
    /// stream (Box–Muller), the same on every platform.
    pub fn gaussian(rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let data = (0..rows * cols)
            .map(|_| {
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random::<f64>();
                (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect();
        Matrix { rows, cols, data }
    }
}

/// A thin SVD `M = U·diag(s)·Vᵀ` of an `m × n` matrix, `p = min(m, n)`.
#[derive(Clone, Debug)]
pub struct Svd {
    /// `U [m, p]`: the left singular vectors are its columns.
    pub u: Matrix,
    /// The `p` singular values, non-increasing.
    pub s: Vec<f64>,
    /// `Vᵀ [p, n]`: the right singular vectors are its rows.
    pub vt: Matrix,
}

/// The thin SVD of `m` through `faer` (singular values sorted non-increasing).
pub fn svd(m: &Matrix) -> Result<Svd> {
    if m.rows == 0 || m.cols == 0 {
        return Err(Error::invalid("svd of an empty matrix"));
    }
    let fm = faer::Mat::<f64>::from_fn(m.rows, m.cols, |i, j| m.at(i, j));
    let d = fm
        .thin_svd()
        .map_err(|e| Error::invalid(format!("svd did not converge: {e:?}")))?;
    let (u, s, v) = (d.U(), d.S().column_vector(), d.V());
    let p = m.rows.min(m.cols);
    let mut um = Matrix::zeros(m.rows, p);
    let mut vt = Matrix::zeros(p, m.cols);
    let mut sv = vec![0.0; p];
    for k in 0..p {
        sv[k] = s[k];
        for i in 0..m.rows {
            um.data[i * p + k] = u[(i, k)];
        }
        for j in 0..m.cols {
            vt.data[k * m.cols + j] = v[(j, k)];
        }
    }
    Ok(Svd { u: um, s: sv, vt })
}

/// `U_A` of Eq. 4 as rows: the top-`i` right singular vectors of `a` (`[r, in]`, the learned
/// LoRA `A`), i.e. the first `i` rows of `Vᵀ`, `[i, in]`.
pub fn right_singular_rows(a: &Matrix, i: usize) -> Result<Matrix> {
    let d = svd(a)?;
    if i > d.vt.rows {
        return Err(Error::invalid(format!(
            "asked for {i} singular directions of a {}×{} matrix",
            a.rows, a.cols
        )));
    }
    Ok(d.vt.top_rows(i))
}

/// The normalized subspace similarity of LoRA Eq. 4 for every `i ≤ imax`, `j ≤ jmax`:
/// `φ(A1, A2, i, j) = ‖U_{A1}^{i⊤} U_{A2}^{j}‖²_F / min(i, j)`, `U_A` the right singular
/// vectors of `A` ([`right_singular_rows`]). Returns `grid[i-1][j-1]`. φ is in `[0, 1]`:
/// 1 when one span contains the other, 0 when they are orthogonal.
pub fn phi_grid(a1: &Matrix, a2: &Matrix, imax: usize, jmax: usize) -> Result<Vec<Vec<f64>>> {
    let u1 = right_singular_rows(a1, imax)?;
    let u2 = right_singular_rows(a2, jmax)?;
    phi_grid_of_bases(&u1, &u2)
}

/// [`phi_grid`] on given orthonormal bases as rows (`[imax, n]`, `[jmax, n]`): the squared
/// overlaps summed over the leading `i × j` block, over `min(i, j)`.
pub fn phi_grid_of_bases(u1: &Matrix, u2: &Matrix) -> Result<Vec<Vec<f64>>> {
    if u1.cols != u2.cols {
        return Err(Error::invalid(format!(
            "subspace similarity of spans in R^{} and R^{}",
            u1.cols, u2.cols
        )));
    }
    let g = u1.matmul(&u2.t())?; // [imax, jmax] inner products
    let (im, jm) = (u1.rows, u2.rows);
    // Prefix sums of g² over the leading block.
    let mut c = vec![vec![0.0; jm + 1]; im + 1];
    for i in 0..im {
        for j in 0..jm {
            c[i + 1][j + 1] = g.at(i, j).powi(2) + c[i][j + 1] + c[i + 1][j] - c[i][j];
        }
    }
    Ok((1..=im)
        .map(|i| (1..=jm).map(|j| c[i][j] / i.min(j) as f64).collect())
        .collect())
}

/// `φ(A1, A2, i, j)` of Eq. 4 for one `(i, j)`.
pub fn phi(a1: &Matrix, a2: &Matrix, i: usize, j: usize) -> Result<f64> {
    if i == 0 || j == 0 {
        return Err(Error::invalid("φ needs i, j ≥ 1"));
    }
    Ok(phi_grid(a1, a2, i, j)?[i - 1][j - 1])
}

/// The left singular vectors `U[:, ..r]` as rows (`[r, m]`) and the right ones `Vᵀ[..r]`
/// (`[r, n]`) of `m`.
fn top_r(m: &Matrix, r: usize) -> Result<(Matrix, Matrix)> {
    let d = svd(m)?;
    if r > d.s.len() {
        return Err(Error::invalid(format!(
            "rank {r} exceeds the {}×{} matrix",
            m.rows, m.cols
        )));
    }
    Ok((d.u.t().top_rows(r), d.vt.top_rows(r)))
}

/// `‖Uᵀ·W·Vᵀ‖_F` of §7.3 with `U` given as rows `[r, d]` (left singular vectors) and `V`
/// as rows `[r, k]` (right singular vectors): the size of `W` in the `r`-dimensional
/// subspaces `U`, `V`.
pub fn projected_norm(u_rows: &Matrix, w: &Matrix, v_rows: &Matrix) -> Result<f64> {
    Ok(u_rows.matmul(w)?.matmul(&v_rows.t())?.frobenius())
}

/// One column group of Table 7 for a weight `W [d, k]` and its update `ΔW`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Amplification {
    /// The rank `r` of the subspaces.
    pub r: usize,
    /// `‖UᵀWVᵀ‖_F` with `U, V` the top-`r` singular vectors of `ΔW`.
    pub proj_delta: f64,
    /// ... of `W` itself (`= √(Σ_{i≤r} σᵢ²(W))`).
    pub proj_w: f64,
    /// ... of a random Gaussian matrix (`≈ ‖W‖_F·r/√(d·k)`).
    pub proj_random: f64,
    /// `‖W‖_F`.
    pub w_norm: f64,
    /// `‖ΔW‖_F`.
    pub delta_norm: f64,
    /// The amplification factor `‖ΔW‖_F / proj_delta`.
    pub factor: f64,
}

/// Table 7's quantities for `W`, `ΔW` at rank `r`; `seed` draws the random matrix.
pub fn amplification(w: &Matrix, delta: &Matrix, r: usize, seed: u64) -> Result<Amplification> {
    if (w.rows, w.cols) != (delta.rows, delta.cols) {
        return Err(Error::invalid("W and ΔW differ in shape"));
    }
    let (ud, vd) = top_r(delta, r)?;
    let (uw, vw) = top_r(w, r)?;
    let (ur, vr) = top_r(&Matrix::gaussian(w.rows, w.cols, seed), r)?;
    let proj_delta = projected_norm(&ud, w, &vd)?;
    let delta_norm = delta.frobenius();
    Ok(Amplification {
        r,
        proj_delta,
        proj_w: projected_norm(&uw, w, &vw)?,
        proj_random: projected_norm(&ur, w, &vr)?,
        w_norm: w.frobenius(),
        delta_norm,
        factor: delta_norm / proj_delta,
    })
}

/// The intruder dimensions of Shuttleworth et al. 2024 (Algorithm 1): among the top `k`
/// left singular vectors of `w_tuned` (their choice: the columns of `U`), the number whose
/// largest `|cos|` against every left singular vector of `w0` is below `eps`.
pub fn intruder_count(w0: &Matrix, w_tuned: &Matrix, k: usize, eps: f64) -> Result<usize> {
    let u0 = svd(w0)?.u.t(); // rows: pre-trained singular vectors
    let ut = svd(w_tuned)?.u.t();
    if k > ut.rows {
        return Err(Error::invalid(format!(
            "top-{k} of {} singular vectors",
            ut.rows
        )));
    }
    let g = ut.top_rows(k).matmul(&u0.t())?;
    Ok((0..k)
        .filter(|&j| g.row(j).iter().all(|c| c.abs() < eps))
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orthonormal_rows(n: usize, dim: usize, seed: u64) -> Matrix {
        right_singular_rows(&Matrix::gaussian(n, dim, seed), n).unwrap()
    }

    #[test]
    fn svd_reconstructs_random_and_rank_deficient_matrices() {
        // Random, tall, wide, and rank 3 (a product of 12×3 and 3×9).
        let low = Matrix::gaussian(12, 3, 1)
            .matmul(&Matrix::gaussian(3, 9, 2))
            .unwrap();
        for m in [
            Matrix::gaussian(10, 10, 3),
            Matrix::gaussian(17, 6, 4),
            Matrix::gaussian(5, 13, 5),
            low.clone(),
        ] {
            let d = svd(&m).unwrap();
            let p = d.s.len();
            // U·diag(s)·Vᵀ = M.
            let mut us = d.u.clone();
            for i in 0..us.rows {
                for k in 0..p {
                    us.data[i * p + k] *= d.s[k];
                }
            }
            let back = us.matmul(&d.vt).unwrap();
            let err = back.add(&m.scaled(-1.0)).unwrap().frobenius() / m.frobenius();
            assert!(err < 1e-12, "reconstruction {err}");
            // Orthonormal factors, sorted non-negative values.
            for (q, name) in [(d.u.t(), "U"), (d.vt.clone(), "V")] {
                let g = q.matmul(&q.t()).unwrap();
                for i in 0..p {
                    for j in 0..p {
                        let want = if i == j { 1.0 } else { 0.0 };
                        // Rank-deficient: the null directions are still orthonormal.
                        assert!((g.at(i, j) - want).abs() < 1e-10, "{name}ᵀ{name} ({i},{j})");
                    }
                }
            }
            assert!(d.s.windows(2).all(|w| w[0] >= w[1]) && d.s[p - 1] >= 0.0);
            // Reference: the singular values squared are the eigenvalues of MᵀM, so their
            // sum is ‖M‖_F² and, for the 2×2 case below, the closed form.
            let sum: f64 = d.s.iter().map(|s| s * s).sum();
            assert!((sum - m.frobenius().powi(2)).abs() < 1e-9 * sum);
        }
        let d = svd(&low).unwrap();
        assert!(
            d.s[2] > 1e-6 && d.s[3..].iter().all(|&s| s < 1e-12),
            "{:?}",
            d.s
        );
        // A closed-form reference: [[3, 0], [4, 5]] has singular values √45 and √5.
        let d = svd(&Matrix::new(2, 2, vec![3.0, 0.0, 4.0, 5.0]).unwrap()).unwrap();
        assert!((d.s[0] - 45f64.sqrt()).abs() < 1e-12 && (d.s[1] - 5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn phi_of_a_span_with_itself_is_one_and_of_orthogonal_spans_zero() {
        let a = Matrix::gaussian(8, 40, 7);
        for i in 1..=8 {
            assert!((phi(&a, &a, i, i).unwrap() - 1.0).abs() < 1e-12);
        }
        // Two A's with orthogonal row spaces, as learned A's of different shapes: rows of
        // a 12-dim orthonormal basis of R^40 split 4 / 8, each mixed by a random matrix.
        let q = orthonormal_rows(12, 40, 8);
        let a1 = Matrix::gaussian(4, 4, 9).matmul(&q.top_rows(4)).unwrap();
        let rest = Matrix::new(8, 40, q.data[4 * 40..].to_vec()).unwrap();
        let a2 = Matrix::gaussian(8, 8, 10).matmul(&rest).unwrap();
        let g = phi_grid(&a1, &a2, 4, 8).unwrap();
        assert!(g.iter().flatten().all(|&x| x.abs() < 1e-12), "{g:?}");
        // A span inside a larger one: φ = 1 for every i ≤ 4 with j = 8 + 4.
        let big = Matrix::gaussian(12, 12, 11).matmul(&q).unwrap();
        let g = phi_grid(&a1, &big, 4, 12).unwrap();
        assert!((g[3][11] - 1.0).abs() < 1e-10, "{}", g[3][11]);
    }

    #[test]
    fn phi_of_random_spans_is_within_three_sigma_of_max_i_j_over_d() {
        // ‖U_iᵀU_j‖² over random subspaces has mean i·j/d; over 200 pairs the mean of φ
        // is within 3 standard errors of max(i, j)/d.
        let d = 64;
        for (i, j) in [(1, 1), (2, 8), (8, 16)] {
            let xs: Vec<f64> = (0..200)
                .map(|t| {
                    let a1 = Matrix::gaussian(i, d, 1000 + t);
                    let a2 = Matrix::gaussian(j, d, 5000 + t);
                    phi(&a1, &a2, i, j).unwrap()
                })
                .collect();
            let n = xs.len() as f64;
            let mean = xs.iter().sum::<f64>() / n;
            let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            let want = i.max(j) as f64 / d as f64;
            assert!(
                (mean - want).abs() < 3.0 * sd / n.sqrt(),
                "i={i} j={j}: mean {mean} vs {want} (sd {sd})"
            );
        }
    }

    #[test]
    fn amplification_of_a_constructed_pair_has_the_known_answer() {
        // W = diag(10, 5, 1, 0.5, …) in a random rotation; ΔW = 2·u3·v3ᵀ along W's third
        // singular pair (σ = 1): ‖UᵀWVᵀ‖ = 1, ‖ΔW‖ = 2, factor 2; the "from W" row at r = 1
        // is σ1 = 10 and at r = 2 √(10² + 5²).
        let n = 16;
        let qu = orthonormal_rows(n, n, 21);
        let qv = orthonormal_rows(n, n, 22);
        let mut sigma = vec![0.0; n];
        for (k, s) in sigma.iter_mut().enumerate() {
            *s = match k {
                0 => 10.0,
                1 => 5.0,
                2 => 1.0,
                _ => 0.5 / k as f64,
            };
        }
        let mut w = Matrix::zeros(n, n);
        let mut delta = Matrix::zeros(n, n);
        for i in 0..n {
            for j in 0..n {
                w.data[i * n + j] = (0..n).map(|k| qu.at(k, i) * sigma[k] * qv.at(k, j)).sum();
                delta.data[i * n + j] = 2.0 * qu.at(2, i) * qv.at(2, j);
            }
        }
        let a = amplification(&w, &delta, 1, 3).unwrap();
        assert!((a.proj_delta - 1.0).abs() < 1e-10, "{a:?}");
        assert!((a.delta_norm - 2.0).abs() < 1e-12 && (a.factor - 2.0).abs() < 1e-9);
        assert!((a.proj_w - 10.0).abs() < 1e-10);
        let a2 = amplification(&w, &delta, 2, 3).unwrap();
        assert!((a2.proj_w - (125f64).sqrt()).abs() < 1e-10, "{a2:?}");
    }

    #[test]
    fn table7_sanity_identities_hold() {
        // "from W" = √(Σ_{i≤r} σᵢ²(W)); random ≈ ‖W‖_F·r/√(d·k) (RMS over draws, 15 %).
        let (d, k) = (48, 40);
        let w = Matrix::gaussian(d, k, 31);
        let s = svd(&w).unwrap().s;
        for r in [1, 4, 16] {
            let want = s[..r].iter().map(|x| x * x).sum::<f64>().sqrt();
            let a = amplification(&w, &Matrix::gaussian(d, k, 32), r, 33).unwrap();
            assert!((a.proj_w - want).abs() < 1e-9 * want, "r={r}");
            // E‖UᵀWV‖² = (r/d)(r/k)‖W‖² for independent random subspaces: the identity is
            // the root mean square (200 draws: its standard error is ≤ 5 %).
            let n = 200;
            let ms: f64 = (0..n)
                .map(|t| {
                    amplification(&w, &w, r, 100 + t)
                        .unwrap()
                        .proj_random
                        .powi(2)
                })
                .sum::<f64>()
                / n as f64;
            let expect = w.frobenius() * r as f64 / ((d * k) as f64).sqrt();
            assert!(
                (ms.sqrt() / expect - 1.0).abs() < 0.15,
                "r={r}: {} vs {expect}",
                ms.sqrt()
            );
        }
    }

    #[test]
    fn intruder_dimensions_count_new_directions_only() {
        let n = 32;
        let w0 = Matrix::gaussian(n, n, 41);
        // A small perturbation keeps every top direction: no intruder.
        let small = w0.add(&Matrix::gaussian(n, n, 42).scaled(1e-3)).unwrap();
        assert_eq!(intruder_count(&w0, &small, 10, 0.5).unwrap(), 0);
        // A large rank-1 update along a direction away from W0's: its singular vector is
        // the top one of W0 + ΔW and matches no singular vector of W0 well.
        let u0 = svd(&w0).unwrap().u.t();
        let mut x: Vec<f64> = (0..n)
            .map(|i| u0.row(0)[i] + u0.row(1)[i] + u0.row(2)[i] + u0.row(3)[i])
            .collect();
        let nx = x.iter().map(|v| v * v).sum::<f64>().sqrt();
        x.iter_mut().for_each(|v| *v /= nx);
        let y = Matrix::gaussian(1, n, 43);
        let dw = Matrix::new(n, 1, x)
            .unwrap()
            .matmul(&y)
            .unwrap()
            .scaled(100.0);
        assert_eq!(
            intruder_count(&w0, &w0.add(&dw).unwrap(), 10, 0.6).unwrap(),
            1
        );
        assert_eq!(intruder_count(&w0, &w0, 10, 0.5).unwrap(), 0);
    }
}
