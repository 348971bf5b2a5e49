//! The expert-parallel token exchange. Rows `[N, d]` sorted by destination rank and, within a
//! rank, by its local expert go out with `counts: [size * k]` (k = local experts per rank);
//! counts travel first, then rows (variable all-to-all). The receiver gets `[M, d]` in source
//! order (source 0's rows for its k experts, then source 1's, ...), `recv_counts: [size * k]`,
//! and `expert_major_order` to regroup them by local expert for the grouped GEMM. `reverse`
//! sends rows of the received layout back to where they came from (combine, and the backward).

use super::{Error, Group, Result};
use crate::runtime::Tensor;

/// The counts of one exchange, kept for the way back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExchangePlan {
    /// Counts per destination member and local expert, `[size * k]`.
    send_counts: Vec<usize>,
    /// Counts per source member and local expert, `[size * k]`.
    recv_counts: Vec<usize>,
    /// Local experts per member.
    k: usize,
}

/// Sends `rows` to their ranks (see the module comment) and returns the rows received and the plan.
pub fn exchange(group: &Group, rows: &Tensor, counts: &[usize]) -> Result<(Tensor, ExchangePlan)> {
    let plan = ExchangePlan::new(group, counts)?;
    let received = plan.forward(group, rows)?;
    Ok((received, plan))
}

impl ExchangePlan {
    /// Exchanges `counts: [size * k]` with the group's other members.
    pub fn new(group: &Group, counts: &[usize]) -> Result<ExchangePlan> {
        if counts.is_empty() || counts.len() % group.size() != 0 {
            return Err(Error::invalid(
                "exchange",
                format!(
                    "{} counts: expected k per rank for {} ranks (k >= 1)",
                    counts.len(),
                    group.size()
                ),
            ));
        }
        let recv_counts = group.all_to_all_counts(counts)?;
        Ok(ExchangePlan {
            k: counts.len() / group.size(),
            send_counts: counts.to_vec(),
            recv_counts,
        })
    }

    pub fn send_counts(&self) -> &[usize] {
        &self.send_counts
    }
    /// Rows received per (source member, local expert), `[size * k]`.
    pub fn recv_counts(&self) -> &[usize] {
        &self.recv_counts
    }
    /// Rows received in all.
    pub fn recv_rows(&self) -> usize {
        self.recv_counts.iter().sum()
    }

    fn per_member(&self, counts: &[usize]) -> Vec<usize> {
        counts.chunks(self.k).map(|c| c.iter().sum()).collect()
    }

    /// Rows in the send layout `[N, ..]` → rows in the received layout `[M, ..]`.
    pub fn forward(&self, group: &Group, rows: &Tensor) -> Result<Tensor> {
        group.all_to_all(
            rows,
            &self.per_member(&self.send_counts),
            &self.per_member(&self.recv_counts),
        )
    }

    /// Rows in the received layout `[M, ..]` → back to their senders, in the send layout `[N, ..]`.
    pub fn reverse(&self, group: &Group, rows: &Tensor) -> Result<Tensor> {
        group.all_to_all(
            rows,
            &self.per_member(&self.recv_counts),
            &self.per_member(&self.send_counts),
        )
    }

    /// For each position of the expert-major layout (local expert 0's rows from source 0, then
    /// from source 1, ..., then local expert 1's), the index of that row in the received layout;
    /// and the rows per local expert `[k]`.
    pub fn expert_major_order(&self) -> (Vec<usize>, Vec<usize>) {
        let sources = self.recv_counts.len() / self.k;
        let mut start = vec![0usize; self.recv_counts.len()];
        let mut at = 0;
        for (i, &c) in self.recv_counts.iter().enumerate() {
            start[i] = at;
            at += c;
        }
        let mut order = Vec::with_capacity(at);
        let mut per_expert = vec![0usize; self.k];
        for (e, total) in per_expert.iter_mut().enumerate() {
            for s in 0..sources {
                let i = s * self.k + e;
                order.extend(start[i]..start[i] + self.recv_counts[i]);
                *total += self.recv_counts[i];
            }
        }
        (order, per_expert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_rank_round_trip_and_order() {
        let g = Group::single();
        let x = Tensor::from_vec((0..12).map(|v| v as f32).collect::<Vec<_>>(), &[6, 2]).unwrap();
        let (got, plan) = exchange(&g, &x, &[2, 0, 4]).unwrap();
        assert_eq!(got.to_vec::<f32>().unwrap(), x.to_vec::<f32>().unwrap());
        assert_eq!(plan.recv_counts(), &[2, 0, 4]);
        assert_eq!(plan.recv_rows(), 6);
        assert_eq!(plan.expert_major_order(), ((0..6).collect(), vec![2, 0, 4]));
        let back = plan.reverse(&g, &got).unwrap();
        assert_eq!(back.to_vec::<f32>().unwrap(), x.to_vec::<f32>().unwrap());
        assert!(exchange(&g, &x, &[2, 0, 3]).is_err());
        assert!(ExchangePlan::new(&g, &[]).is_err());
    }

    #[test]
    fn expert_major_order_interleaves_sources() {
        // Two sources, two local experts: source 0 sent (1, 2) rows, source 1 sent (3, 0).
        let plan = ExchangePlan {
            send_counts: vec![0; 4],
            recv_counts: vec![1, 2, 3, 0],
            k: 2,
        };
        // Received layout: s0e0 = [0], s0e1 = [1, 2], s1e0 = [3, 4, 5].
        assert_eq!(
            plan.expert_major_order(),
            (vec![0, 3, 4, 5, 1, 2], vec![4, 2])
        );
    }
}
