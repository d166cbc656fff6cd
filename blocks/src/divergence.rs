//! The divergences the fusion part compares the fused distribution `p` (the teacher) and
//! the target's `q` (the student) by: forward KL (and its cross-entropy form, the paper's),
//! reverse KL, TRL's generalised JSD, DistiLLM's skew KLs, and total variation.
//!
//! The teacher is known at its k kept ids only, so each divergence is taken over k + 1
//! outcomes: the kept ids and the rest. The student's rest is its mass outside the kept ids
//! (`1 - sum_k q_k`); the teacher's is 0 ([`Tail::Renormalize`]: the kept probabilities
//! scaled to sum to one, the paper's) or what its kept ones leave ([`Tail::Bucket`], TRL's
//! `loss_add_tail`). Where the teacher has no mass outside the kept ids this is the
//! divergence over the whole vocabulary, since each of these is linear in `q` where `p` is
//! 0 (DistillKit's "zero" handling of missing mass).
//!
//! A divergence is then a function of the student's log-probabilities at the kept ids. Its
//! gradient with respect to the logits is that of a weighted NLL of those ids with weights
//! `w_k = -dD / dlog q_k`, so every divergence goes through the one head-and-loss op of the
//! cross-entropy (`terms.rs`), with weights from a first pass that reads `log q` at the
//! kept ids.

use serde::{Deserialize, Serialize};

/// What the fusion part minimises, with its parameter where it has one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Divergence {
    /// `-sum p log q` (the paper).
    #[default]
    Ce,
    /// Forward KL, `sum p log (p / q)`: the gradient of `Ce`, a value that is 0 at a match.
    Kl,
    /// `sum q log (q / p)`.
    ReverseKl,
    /// TRL's generalised JSD: `beta KL(p || m) + (1 - beta) KL(q || m)` with
    /// `m = beta p + (1 - beta) q`; forward KL at `beta = 0`, reverse KL at 1.
    Jsd { beta: f64 },
    /// DistiLLM's skew forward KL, `KL(p || alpha p + (1 - alpha) q)`.
    SkewKl { alpha: f64 },
    /// DistiLLM's skew reverse KL, `KL(q || alpha q + (1 - alpha) p)`.
    SkewReverseKl { alpha: f64 },
    /// Total variation, `1/2 sum |p - q|`.
    Tv,
}

/// Where the teacher's mass outside its kept ids goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tail {
    /// The kept probabilities scaled to sum to one (the paper).
    #[default]
    Renormalize,
    /// One more outcome holding what the kept ones leave of 1.
    Bucket,
}

impl Tail {
    pub fn is_renormalize(&self) -> bool {
        *self == Tail::Renormalize
    }
}

/// The smallest mass a tail bucket is given: a log of 0 would make the divergences that
/// divide by it infinite (DistillKit clamps the same way).
const TINY: f64 = 1e-8;

impl Divergence {
    /// Whether the paper's sparse cross-entropy computes it (with a constant for the KL):
    /// the forward divergences over renormalised targets.
    pub fn is_cross_entropy(self, tail: Tail) -> bool {
        matches!(self, Divergence::Ce | Divergence::Kl) && tail == Tail::Renormalize
    }

    /// Why it cannot be used with `tail`, if it cannot: the reverse KL of a renormalised
    /// target is infinite (the student has mass where the teacher has none), and so is
    /// the skew reverse KL at alpha 0; the skew KLs at alpha 1 compare a distribution with
    /// itself (always 0).
    pub fn check(self, tail: Tail) -> Result<(), String> {
        let reverse = match self {
            Divergence::ReverseKl => true,
            Divergence::Jsd { beta } => beta == 1.0,
            Divergence::SkewReverseKl { alpha } => alpha == 0.0,
            _ => false,
        };
        if reverse && tail == Tail::Renormalize {
            return Err(
                "the reverse KL of a top-k target renormalised over its kept ids is infinite (the target has mass \
                 outside them); use tail = \"bucket\", with a fusion that keeps each row's mass (min_ce/avg_ce: \
                 renormalize = false)"
                    .into(),
            );
        }
        let fraction = |what: &str, x: f64| match (0.0..=1.0).contains(&x) {
            true => Ok(()),
            false => Err(format!("{what} = {x}: it must be between 0 and 1")),
        };
        match self {
            Divergence::Jsd { beta } => fraction("beta", beta),
            Divergence::SkewKl { alpha: 1.0 } | Divergence::SkewReverseKl { alpha: 1.0 } => {
                Err("alpha = 1 mixes the distribution wholly into itself: the skew KL is 0 whatever the target; use alpha below 1".into())
            }
            Divergence::SkewKl { alpha } | Divergence::SkewReverseKl { alpha } => fraction("alpha", alpha),
            _ => Ok(()),
        }
    }

    /// The term of one outcome, `f(P, Q)`, and its derivative in `Q`.
    fn term(self, p: f64, q: f64) -> (f64, f64) {
        let xlogy = |x: f64, y: f64| if x == 0.0 { 0.0 } else { x * y.ln() };
        match self {
            // The cross-entropy's value, the KL's gradient.
            Divergence::Ce => (if p == 0.0 { 0.0 } else { -p * q.ln() }, -p / q),
            Divergence::Kl => (xlogy(p, p / q), -p / q),
            Divergence::ReverseKl => (xlogy(q, q / p), (q / p).ln() + 1.0),
            Divergence::Jsd { beta: 0.0 } => Divergence::Kl.term(p, q),
            Divergence::Jsd { beta: 1.0 } => Divergence::ReverseKl.term(p, q),
            Divergence::Jsd { beta } => {
                let m = beta * p + (1.0 - beta) * q;
                (beta * xlogy(p, p / m) + (1.0 - beta) * xlogy(q, q / m), (1.0 - beta) * (q / m).ln())
            }
            Divergence::SkewKl { alpha } => {
                let m = alpha * p + (1.0 - alpha) * q;
                (xlogy(p, p / m), -p * (1.0 - alpha) / m)
            }
            Divergence::SkewReverseKl { alpha } => {
                let m = alpha * q + (1.0 - alpha) * p;
                (xlogy(q, q / m), (q / m).ln() + 1.0 - q * alpha / m)
            }
            // At p = q (within rounding) the subgradient 0: no push either way.
            Divergence::Tv => match (p - q).abs() <= 1e-6 * (p + q) {
                true => (0.5 * (p - q).abs(), 0.0),
                false => (0.5 * (p - q).abs(), -0.5 * (p - q).signum()),
            },
        }
    }

    /// The divergence of one position over its kept ids and the rest, and into `grad` its
    /// derivative in the student's log-probability at each kept id (0 where the teacher's
    /// probability is 0: padding, whose student mass counts in the rest). `p` are the
    /// teacher's kept probabilities, `log_q` the student's log-probabilities at those ids.
    pub fn row(self, tail: Tail, p: &[f32], log_q: &[f32], grad: &mut [f64]) -> f64 {
        grad.fill(0.0);
        let kept: f64 = p.iter().filter(|&&x| x > 0.0).map(|&x| f64::from(x)).sum();
        if kept <= 0.0 {
            return 0.0;
        }
        let (scale, p_rest) = match tail {
            Tail::Renormalize => (1.0 / kept, 0.0),
            Tail::Bucket => (1.0, (1.0 - kept).max(TINY)),
        };
        let q_kept: f64 = p.iter().zip(log_q).filter(|(&x, _)| x > 0.0).map(|(_, &l)| f64::from(l).exp()).sum();
        let q_rest = (1.0 - q_kept).max(TINY);
        let (mut value, rest_slope) = self.term(p_rest, q_rest);
        for ((&pk, &lq), g) in p.iter().zip(log_q).zip(grad.iter_mut()) {
            if pk > 0.0 {
                let q = f64::from(lq).exp();
                let (f, slope) = self.term(f64::from(pk) * scale, q);
                value += f;
                // d q_k / d log q_k = q_k, and the rest loses what q_k gains.
                *g = q * (slope - rest_slope);
            }
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Divergence; 7] = [
        Divergence::Kl,
        Divergence::ReverseKl,
        Divergence::Jsd { beta: 0.3 },
        Divergence::SkewKl { alpha: 0.1 },
        Divergence::SkewReverseKl { alpha: 0.2 },
        Divergence::Tv,
        Divergence::Jsd { beta: 0.5 },
    ];

    /// A teacher of three kept ids (and a padded entry) leaving 0.1 of its mass, and a
    /// student's log-probabilities at them.
    fn case() -> (Vec<f32>, Vec<f32>) {
        (vec![0.5, 0.3, 0.1, 0.0], vec![0.2f32.ln(), 0.4f32.ln(), 0.1f32.ln(), 0.05f32.ln()])
    }

    /// Each divergence by hand over the four outcomes {a, b, c, rest}: the teacher's
    /// (0.5, 0.3, 0.1, 0.1), the student's (0.2, 0.4, 0.1, 0.3); the padded id's 0.05 is
    /// part of the student's rest.
    #[test]
    fn each_divergence_matches_a_hand_computation_with_a_tail_bucket() {
        let (p, q) = ([0.5, 0.3, 0.1, 0.1f64], [0.2, 0.4, 0.1, 0.3f64]);
        let kl = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * (x / y).ln()).sum::<f64>();
        let mix =
            |w: f64, a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| w * x + (1.0 - w) * y).collect::<Vec<_>>();
        let expected = [
            kl(&p, &q),
            kl(&q, &p),
            0.3 * kl(&p, &mix(0.3, &p, &q)) + 0.7 * kl(&q, &mix(0.3, &p, &q)),
            kl(&p, &mix(0.1, &p, &q)),
            kl(&q, &mix(0.2, &q, &p)),
            0.5 * p.iter().zip(&q).map(|(x, y)| (x - y).abs()).sum::<f64>(),
            0.5 * kl(&p, &mix(0.5, &p, &q)) + 0.5 * kl(&q, &mix(0.5, &p, &q)),
        ];
        let (tp, lq) = case();
        for (d, want) in ALL.iter().zip(expected) {
            let got = d.row(Tail::Bucket, &tp, &lq, &mut [0.0; 4]);
            assert!((got - want).abs() < 1e-6, "{d:?}: {got} vs {want}");
        }
    }

    /// With the kept probabilities renormalised the teacher has no rest: the forward KL is
    /// the sparse cross-entropy's (`sum p log p - sum p log q` over the kept ids).
    #[test]
    fn renormalised_targets_give_the_sparse_cross_entropy_s_kl() {
        let (p, lq) = case();
        let total: f32 = p.iter().sum();
        let want: f64 = p
            .iter()
            .zip(&lq)
            .filter(|(x, _)| **x > 0.0)
            .map(|(&x, &l)| f64::from(x / total) * (f64::from(x / total).ln() - f64::from(l)))
            .sum();
        let got = Divergence::Kl.row(Tail::Renormalize, &p, &lq, &mut [0.0; 4]);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert!(Divergence::ReverseKl.check(Tail::Renormalize).is_err());
        assert!(Divergence::Jsd { beta: 1.0 }.check(Tail::Renormalize).is_err());
        assert!(Divergence::Jsd { beta: 1.5 }.check(Tail::Bucket).is_err());
        assert!(Divergence::SkewReverseKl { alpha: 0.0 }.check(Tail::Renormalize).is_err());
        assert!(Divergence::SkewReverseKl { alpha: 0.0 }.check(Tail::Bucket).is_ok());
        assert!(Divergence::SkewKl { alpha: 1.0 }.check(Tail::Bucket).is_err());
        assert!(Divergence::SkewKl { alpha: 0.0 }.check(Tail::Renormalize).is_ok());
    }

    #[test]
    fn generalised_jsd_at_beta_0_and_1_is_the_forward_and_the_reverse_kl() {
        let (p, lq) = case();
        let row = |d: Divergence| d.row(Tail::Bucket, &p, &lq, &mut [0.0; 4]);
        assert_eq!(row(Divergence::Jsd { beta: 0.0 }), row(Divergence::Kl));
        assert_eq!(row(Divergence::Jsd { beta: 1.0 }), row(Divergence::ReverseKl));
        // And the skew KLs at 0 are the plain ones.
        assert!((row(Divergence::SkewKl { alpha: 0.0 }) - row(Divergence::Kl)).abs() < 1e-12);
        assert!((row(Divergence::SkewReverseKl { alpha: 0.0 }) - row(Divergence::ReverseKl)).abs() < 1e-12);
    }

    /// The tail bucket conserves mass: teacher and student each sum to one over the kept
    /// ids and the rest, so two equal distributions are at divergence 0 with no gradient.
    #[test]
    fn the_tail_bucket_conserves_mass() {
        let p = [0.5f32, 0.3, 0.1];
        let lq: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        for d in ALL {
            let mut grad = [1.0; 3];
            let value = d.row(Tail::Bucket, &p, &lq, &mut grad);
            assert!(value.abs() < 1e-6, "{d:?}: {value}");
            assert!(grad.iter().all(|g| g.abs() < 1e-5), "{d:?}: {grad:?}");
        }
    }
}
