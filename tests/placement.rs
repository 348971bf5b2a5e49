//! Placement planners, token split, transfer plans and routing traces on hand-checked examples:
//! a skewed router balanced by swift and not by static EP, determinism and slot rules, exact
//! bytes per rank of the swift and rebalance plans, trace round trip and refusal.

use moe::placement::sharding::{self, ReplicaState};
use moe::placement::synthetic::ZipfTrace;
use moe::placement::{
    imbalance, split, swift, ByteSizes, Placement, PlacementKind, Planner, PlannerConfig, Trace,
    TraceWriter, TransferKind,
};

/// Rows each rank computes when every one of `ranks` sources routes `per_source[e]` rows to e.
fn rank_rows(p: &Placement, per_source: &[u64]) -> Vec<f64> {
    let mut rows = vec![0.0; p.ranks()];
    for (e, &n) in per_source.iter().enumerate() {
        let s = split::balanced(p.replicas(e), &vec![n; p.ranks()]);
        for (r, m) in split::received(&s, p.ranks()).into_iter().enumerate() {
            rows[r] += m as f64;
        }
    }
    rows
}

#[test]
fn skewed_router_swift_near_one_static_near_the_skew() {
    // 8 ranks, 8 experts; every source sends 1200 rows to expert 0 and 16 to each other: expert
    // 0 carries 9600 of 10496 rows. Static (one expert per rank): rank 0 has 9600, mean 1312,
    // max/mean = 7.317. Swift with 2 slots: expert 0 on all 8 ranks (1200 each), experts 2..7
    // (128) on ranks 0..5, expert 1 (64 per replica) last on ranks 6 and 7: 1328 or 1264, max/mean = 1328 / 1312 = 1.0122,
    // within Graham's bound 1 + w_max / mean = 1 + 1200 / 1312.
    let mut per_source = vec![16u64; 8];
    per_source[0] = 1200;
    let loads: Vec<f64> = per_source.iter().map(|&n| 8.0 * n as f64).collect();
    let st = Placement::static_ep(8, 8).unwrap();
    let sw = swift::plan(&loads, 8, 2).unwrap();
    assert_eq!(
        swift::replica_counts(&loads, 8, 2).unwrap(),
        vec![8, 2, 1, 1, 1, 1, 1, 1]
    );
    let st_rows = rank_rows(&st, &per_source);
    let sw_rows = rank_rows(&sw, &per_source);
    assert_eq!(
        st_rows,
        vec![9600.0, 128.0, 128.0, 128.0, 128.0, 128.0, 128.0, 128.0]
    );
    assert_eq!(
        sw_rows,
        vec![1328.0, 1328.0, 1328.0, 1328.0, 1328.0, 1328.0, 1264.0, 1264.0]
    );
    assert!((imbalance(&st_rows) - 9600.0 / 1312.0).abs() < 1e-12);
    assert!((imbalance(&sw_rows) - 1328.0 / 1312.0).abs() < 1e-12);
    assert!(imbalance(&sw_rows) < 1.02);
    assert_eq!(sw.rank_loads(&loads), sw_rows);
}

#[test]
fn uniform_load_swift_agrees_with_static() {
    // No spare slots (8 experts, 4 ranks × 2 slots): one replica each, two experts per rank,
    // every rank the same load as static's.
    let loads = vec![100.0; 8];
    let sw = swift::plan(&loads, 4, 2).unwrap();
    let st = Placement::static_ep(8, 4).unwrap();
    assert!((0..8).all(|e| sw.replicas(e).len() == 1));
    assert_eq!(sw.rank_loads(&loads), st.rank_loads(&loads));
    assert_eq!(sw.rank_loads(&loads), vec![200.0; 4]);
}

#[test]
fn plans_are_deterministic_and_respect_the_rules() {
    for (experts, ranks, slots) in [(8, 8, 2), (16, 4, 5), (64, 16, 6), (6, 4, 3), (128, 256, 1)] {
        let loads: Vec<f64> = (0..experts)
            .map(|e| ((e * 7919) % 101) as f64 * 10.0)
            .collect();
        let a = swift::plan(&loads, ranks, slots).unwrap();
        let b = swift::plan(&loads, ranks, slots).unwrap();
        assert_eq!(a, b);
        let mut used = vec![0; ranks];
        for e in 0..experts {
            let r = a.replicas(e);
            assert!(!r.is_empty(), "expert {e} has no replica");
            assert!(r.windows(2).all(|w| w[0] < w[1]), "expert {e}: {r:?}");
            for &j in r {
                used[j] += 1;
            }
        }
        assert!(
            used.iter().all(|&u| u <= slots),
            "{used:?} over {slots} slots"
        );
        // Every slot is filled unless every expert already sits on every rank.
        let total: usize = used.iter().sum();
        assert_eq!(total, (ranks * slots).min(experts * ranks));
    }
}

#[test]
fn too_few_slots_is_refused() {
    let e = swift::plan(&[1.0; 16], 8, 1).unwrap_err();
    assert_eq!(
        e.to_string(),
        "expert_slots = 1 per rank is too few: 16 experts over 8 ranks need at least 2 slots per \
         rank (every expert needs a replica)"
    );
    let cfg = PlannerConfig {
        kind: PlacementKind::Swift,
        ranks: 8,
        expert_slots: 1,
        rebalance_every: 1,
    };
    assert!(Planner::new(cfg, 2, 16).is_err());
}

const SIZES: ByteSizes = ByteSizes {
    param: 2,
    grad: 4,
    optimizer: 12,
};

#[test]
fn swift_transfers_match_a_hand_computed_plan() {
    // 3 ranks, experts of 10 parameters: owners' slices 4, 4, 2. Now: e0 on 0, 1, 2; e1 on 0.
    // Next: e0 on 0; e1 on 0, 1.
    // Reduce-scatter (4 B): e0 rank 0 → 1: 16, → 2: 8; rank 1 → 0: 16, → 2: 8;
    //   rank 2 → 0: 16, → 1: 16; e1 rank 0 → 1: 16, → 2: 8.
    // All-gather (2 B): e0 owner 1 → 0: 8, owner 2 → 0: 4; e1 owner 0 → 1: 8, owner 1 → 0: 8,
    //   owner 2 → 0: 4, → 1: 4.
    // Sent: rank 0 = 24 + 24 + 8 = 56, rank 1 = 24 + 8 + 8 = 40, rank 2 = 32 + 4 + 4 + 4 = 44.
    let now = Placement::new(3, 2, vec![vec![0, 1, 2], vec![0]]).unwrap();
    let next = Placement::new(3, 2, vec![vec![0], vec![0, 1]]).unwrap();
    let t = sharding::swift_step(&now, &next, 10, &SIZES);
    assert_eq!(sharding::bytes_sent_per_rank(&t, 3), vec![56, 40, 44]);
    assert_eq!(sharding::bytes_of(&t, TransferKind::GradReduceScatter), 104);
    assert_eq!(sharding::bytes_of(&t, TransferKind::ParamAllGather), 36);
    assert_eq!(sharding::bytes_of(&t, TransferKind::OptimizerStateMove), 0);
    assert!(t.iter().all(|x| x.src != x.dst));
}

#[test]
fn rebalance_moves_optimizer_state() {
    // Same placements, state whole on each replica. All-reduce of e0 over ranks 0, 1, 2
    // (slices 4, 4, 2 of 4-byte gradients): rank 0 sends 16 + 8 (reduce-scatter) + 16 + 16
    // (gather) = 56, rank 1 the same, rank 2 16 + 16 + 8 + 8 = 48. Rank 1 newly holds e1:
    // 10 × 2 B of parameters + 10 × 12 B of optimizer state from rank 0.
    let now = Placement::new(3, 2, vec![vec![0, 1, 2], vec![0]]).unwrap();
    let next = Placement::new(3, 2, vec![vec![0], vec![0, 1]]).unwrap();
    let mut t = sharding::replica_sync(&now, 10, &SIZES, ReplicaState::Full);
    assert_eq!(sharding::bytes_sent_per_rank(&t, 3), vec![56, 56, 48]);
    t.extend(sharding::rebalance_moves(&now, &next, 10, &SIZES));
    assert_eq!(sharding::bytes_sent_per_rank(&t, 3), vec![196, 56, 48]);
    assert_eq!(
        sharding::bytes_of(&t, TransferKind::OptimizerStateMove),
        120
    );
    assert_eq!(sharding::bytes_of(&t, TransferKind::ParamMove), 20);
    // Sharded over the replicas (static EP's ZeRO-1): parameters gathered at 2 B.
    let s = sharding::replica_sync(&now, 10, &SIZES, ReplicaState::Sharded);
    assert_eq!(sharding::bytes_sent_per_rank(&s, 3), vec![40, 40, 40]);
}

#[test]
fn planner_over_a_drifting_trace_keeps_state_in_place() {
    let trace = ZipfTrace {
        layers: 2,
        experts: 8,
        top_k: 2,
        d_model: 8,
        d_ff: 16,
        tokens: 256,
        steps: 12,
        skew: 1.5,
        drift_every: 3,
    }
    .generate();
    let cfg = PlannerConfig {
        kind: PlacementKind::Swift,
        ranks: 4,
        expert_slots: 3,
        rebalance_every: 1,
    };
    let mut swift_planner = Planner::new(cfg, 2, 8).unwrap();
    let mut rebalance = Planner::new(
        PlannerConfig {
            kind: PlacementKind::Rebalance,
            rebalance_every: 4,
            ..cfg
        },
        2,
        8,
    )
    .unwrap();
    let (mut swift_state, mut moved_state, mut changes) = (0, 0, 0);
    for (_, counts) in &trace.steps {
        let ran = swift_planner.advance(counts).unwrap();
        for (l, p) in ran.iter().enumerate() {
            let next = swift_planner.placement(l);
            changes += usize::from(p != next);
            let t = sharding::swift_step(p, next, 96, &SIZES);
            swift_state += sharding::bytes_of(&t, TransferKind::OptimizerStateMove);
        }
        let ran = rebalance.advance(counts).unwrap();
        for (l, p) in ran.iter().enumerate() {
            let t = sharding::rebalance_moves(p, rebalance.placement(l), 96, &SIZES);
            moved_state += sharding::bytes_of(&t, TransferKind::OptimizerStateMove);
        }
    }
    assert!(
        changes > 0,
        "the hot experts drift, so swift's placement must change"
    );
    assert_eq!(swift_state, 0);
    assert!(moved_state > 0);
}

#[test]
fn trace_round_trip_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let z = ZipfTrace {
        layers: 3,
        experts: 4,
        top_k: 2,
        d_model: 16,
        d_ff: 32,
        tokens: 10,
        steps: 5,
        skew: 1.0,
        drift_every: 2,
    };
    let trace = z.generate();
    let path = dir.path().join("t.jsonl");
    trace.write(&path).unwrap();
    assert_eq!(Trace::read(&path, Some(&trace.header)).unwrap(), trace);

    let mut other = trace.header.clone();
    other.d_model = 32;
    let e = Trace::read(&path, Some(&other)).unwrap_err().to_string();
    assert!(
        e.ends_with("line 1: trace of another model: d_model = 16 in the trace, 32 expected"),
        "{e}"
    );

    let mut w = TraceWriter::create(&path, trace.header.clone()).unwrap();
    let e = w.record(0, 3, &[1, 2, 3, 4]).unwrap_err().to_string();
    assert!(e.contains("record of layer 3 with 4 counts"), "{e}");
    w.record(0, 0, &[1, 2, 3, 4]).unwrap();
    w.record(0, 2, &[1, 2, 3, 4]).unwrap();
    w.finish().unwrap();
    let e = Trace::read(&path, None).unwrap_err().to_string();
    assert!(
        e.ends_with("line 3: at the end: step 0 has no counts for layer 1"),
        "{e}"
    );

    std::fs::write(&path, "{\"step\": 0}\n").unwrap();
    let e = Trace::read(&path, None).unwrap_err().to_string();
    assert!(e.contains("line 1: not a routing-trace header"), "{e}");
}
