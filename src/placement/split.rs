//! How an expert's rows are split among its replicas: from `counts[src]` rows of expert e on each
//! source rank and the expert's replica ranks, the rows each source sends to each replica,
//! `[src]` → (replica rank, rows). Every rank computes the same split from the exchanged counts.

/// Balanced, local replica first (swift, rebalance): replica j of r takes
/// ⌊N / r⌋ rows (+1 for the first N mod r), N = Σ counts. A source holding a replica keeps up to
/// that replica's share; the remaining rows fill the replicas' remaining shares in rank order.
/// Replica loads differ by at most one row.
pub fn balanced(replicas: &[usize], counts: &[u64]) -> Vec<Vec<(usize, u64)>> {
    let total: u64 = counts.iter().sum();
    let r = replicas.len() as u64;
    let mut share: Vec<u64> = (0..r)
        .map(|j| total / r + u64::from(j < total % r))
        .collect();
    let mut left = counts.to_vec();
    let mut out = vec![Vec::new(); counts.len()];
    for (j, &rank) in replicas.iter().enumerate() {
        if let Some(have) = left.get_mut(rank) {
            let keep = (*have).min(share[j]);
            if keep > 0 {
                out[rank].push((rank, keep));
                *have -= keep;
                share[j] -= keep;
            }
        }
    }
    let mut j = 0;
    for (src, have) in left.iter_mut().enumerate() {
        while *have > 0 {
            while share[j] == 0 {
                j += 1;
            }
            let take = (*have).min(share[j]);
            out[src].push((replicas[j], take));
            *have -= take;
            share[j] -= take;
        }
    }
    out
}

/// Static EP (DeepSpeed-MoE): rows stay in the source's DP group, rank = dp · ep + ep_rank; the
/// replica of that group takes all of them (`replicas` as `Placement::static_ep` lays them out).
pub fn within_group(replicas: &[usize], counts: &[u64], ep: usize) -> Vec<Vec<(usize, u64)>> {
    counts
        .iter()
        .enumerate()
        .map(|(src, &n)| {
            let dst = replicas[(src / ep).min(replicas.len() - 1)];
            if n > 0 {
                vec![(dst, n)]
            } else {
                Vec::new()
            }
        })
        .collect()
}

/// Rows each rank receives: `[rank]` = Σ over sources.
pub fn received(split: &[Vec<(usize, u64)>], ranks: usize) -> Vec<u64> {
    let mut rows = vec![0u64; ranks];
    for sends in split {
        for &(dst, n) in sends {
            rows[dst] += n;
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_keeps_local_rows_and_evens_the_rest() {
        // 4 sources, replicas on ranks 1 and 3; 10 rows → 5 each. Rank 1 keeps 4 (all it has),
        // rank 3 keeps 3; the rest fill replica 1 then replica 3 in source order.
        let s = balanced(&[1, 3], &[2, 4, 1, 3]);
        assert_eq!(s[0], vec![(1, 1), (3, 1)]);
        assert_eq!(s[1], vec![(1, 4)]);
        assert_eq!(s[2], vec![(3, 1)]);
        assert_eq!(s[3], vec![(3, 3)]);
        assert_eq!(received(&s, 4), vec![0, 5, 0, 5]);
        // 7 rows over 3 replicas: 3, 2, 2.
        let s = balanced(&[0, 1, 2], &[7, 0, 0]);
        assert_eq!(s[0], vec![(0, 3), (1, 2), (2, 2)]);
    }

    #[test]
    fn within_group_stays_in_the_dp_group() {
        // ep = 2, 4 ranks: expert on ranks 1 (group 0) and 3 (group 1).
        let s = within_group(&[1, 3], &[2, 4, 1, 0], 2);
        assert_eq!(s, vec![vec![(1, 2)], vec![(1, 4)], vec![(3, 1)], vec![]]);
    }
}
