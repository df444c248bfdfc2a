use super::*;

fn loads(weights: &[u32]) -> Vec<BackendLoad> {
    weights
        .iter()
        .map(|&weight| BackendLoad::new(weight, false))
        .collect()
}

fn names(count: usize) -> Vec<String> {
    (0..count)
        .map(|index| format!("10.0.0.{index}:80"))
        .collect()
}

fn input(random: u64, key_hash: Option<u64>, now: Instant) -> PickInput {
    PickInput {
        key_hash,
        random,
        now,
        slow_start: Duration::ZERO,
    }
}

fn picks(balancer: &Balancer, backends: &[BackendLoad], count: usize) -> Vec<usize> {
    let now = Instant::now();
    (0..count)
        .filter_map(|n| balancer.pick(backends, |_| true, &input(n as u64, None, now)))
        .collect()
}

#[test]
fn smooth_weighted_round_robin_spreads_the_heavy_backend() {
    let backends = loads(&[5, 1, 1]);
    let balancer = Balancer::new(Balance::RoundRobin, &backends, &names(3), Duration::ZERO);
    assert_eq!(picks(&balancer, &backends, 7), vec![0, 0, 1, 0, 2, 0, 0]);
    // Over many rounds the shares are exact.
    let mut counts = [0usize; 3];
    for index in picks(&balancer, &backends, 7000) {
        counts[index] += 1;
    }
    assert_eq!(counts, [5000, 1000, 1000]);
}

#[test]
fn equal_weights_go_round_robin() {
    let backends = loads(&[1, 1, 1]);
    let balancer = Balancer::new(Balance::RoundRobin, &backends, &names(3), Duration::ZERO);
    assert_eq!(picks(&balancer, &backends, 6), vec![0, 1, 2, 0, 1, 2]);
}

#[test]
fn unavailable_backends_are_skipped_and_backups_used_only_when_no_primary_is_left() {
    let mut backends = loads(&[1, 1]);
    backends.push(BackendLoad::new(1, true));
    let balancer = Balancer::new(Balance::RoundRobin, &backends, &names(3), Duration::ZERO);
    let now = Instant::now();
    for n in 0..10 {
        let chosen = balancer.pick(&backends, |index| index != 0, &input(n, None, now));
        assert_eq!(chosen, Some(1));
    }
    let chosen = balancer.pick(&backends, |index| index == 2, &input(0, None, now));
    assert_eq!(chosen, Some(2));
    assert_eq!(
        balancer.pick(&backends, |_| false, &input(0, None, now)),
        None
    );
}

#[test]
fn least_connections_prefers_the_least_loaded_per_weight() {
    let backends = loads(&[1, 1, 2]);
    backends[0].in_flight.store(3, Ordering::Relaxed);
    backends[1].in_flight.store(1, Ordering::Relaxed);
    backends[2].in_flight.store(4, Ordering::Relaxed);
    let balancer = Balancer::new(
        Balance::LeastConnections,
        &backends,
        &names(3),
        Duration::ZERO,
    );
    assert_eq!(picks(&balancer, &backends, 5), vec![1; 5]);
    // Ties rotate.
    backends[0].in_flight.store(0, Ordering::Relaxed);
    backends[1].in_flight.store(0, Ordering::Relaxed);
    backends[2].in_flight.store(0, Ordering::Relaxed);
    let mut seen = picks(&balancer, &backends, 3);
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2]);
}

#[test]
fn weighted_random_follows_the_weights() {
    let backends = loads(&[3, 1]);
    let balancer = Balancer::new(Balance::Random, &backends, &names(2), Duration::ZERO);
    let now = Instant::now();
    let mut counts = [0usize; 2];
    for n in 0..4000u64 {
        let random = mix(n);
        if let Some(index) = balancer.pick(&backends, |_| true, &input(random, None, now)) {
            counts[index] += 1;
        }
    }
    assert!((2800..3200).contains(&counts[0]), "{counts:?}");
}

#[test]
fn peak_ewma_avoids_a_slow_backend() {
    let backends = loads(&[1, 1, 1]);
    let start = Instant::now();
    for (index, backend) in backends.iter().enumerate() {
        let latency = if index == 2 { 100 } else { 1 };
        backend.observe_latency(Duration::from_millis(latency), start);
    }
    let balancer = Balancer::new(Balance::PeakEwma, &backends, &names(3), Duration::ZERO);
    let mut counts = [0usize; 3];
    for n in 0..3000u64 {
        if let Some(index) = balancer.pick(&backends, |_| true, &input(mix(n), None, start)) {
            counts[index] += 1;
        }
    }
    // The slow one only wins when both candidates are it, which p2c never draws.
    assert_eq!(counts[2], 0, "{counts:?}");
    assert!(counts[0] > 1000 && counts[1] > 1000, "{counts:?}");
}

#[test]
fn peak_ewma_jumps_to_a_peak_and_decays_back() {
    let load = BackendLoad::new(1, false);
    let start = Instant::now();
    load.observe_latency(Duration::from_millis(2), start);
    load.observe_latency(
        Duration::from_millis(200),
        start + Duration::from_millis(10),
    );
    let peak = load.latency_estimate(start + Duration::from_millis(10));
    assert!((peak - 0.2).abs() < 1e-9, "{peak}");
    let later = load.latency_estimate(start + Duration::from_secs(60));
    assert!(later < 0.01, "{later}");
}

#[test]
fn maglev_shares_follow_weights_and_removing_one_of_n_moves_about_one_nth() {
    let count = 10;
    let table = Maglev::new(&names(count), &vec![1; count]);
    let mut shares = vec![0usize; count];
    for &slot in &table.table {
        shares[slot as usize] += 1;
    }
    let even = Maglev::TABLE_SIZE / count;
    assert!(
        shares.iter().all(|&share| share.abs_diff(even) <= 1),
        "{shares:?}"
    );

    // The same backends without the last one: a rebuilt table.
    let fewer = Maglev::new(&names(count - 1), &vec![1; count - 1]);
    let keys = 100_000u64;
    let moved = (0..keys)
        .filter(|&key| {
            let hash = mix(key);
            let before = table.lookup(hash, &|_| true);
            let after = fewer.lookup(hash, &|_| true);
            before != Some(count - 1) && before != after
        })
        .count();
    let lost = (0..keys)
        .filter(|&key| table.lookup(mix(key), &|_| true) == Some(count - 1))
        .count();
    // Reported with `cargo test -p bouncer-proxy maglev -- --nocapture`.
    println!(
        "removing 1 of {count} backends moved {:.2}% of {keys} keys: {lost} of the removed backend, {moved} of the others",
        (lost + moved) as f64 * 100.0 / keys as f64
    );
    // Keys of the removed backend must move; of the others, only a small share may.
    assert!(lost.abs_diff(keys as usize / count) < 1000, "{lost}");
    assert!(moved < keys as usize / 50, "{moved} other keys moved");

    // An unavailable backend moves only its own keys.
    let moved_when_down = (0..keys)
        .filter(|&key| {
            let hash = mix(key);
            let before = table.lookup(hash, &|_| true);
            before != Some(3) && before != table.lookup(hash, &|index| index != 3)
        })
        .count();
    assert_eq!(moved_when_down, 0);
}

#[test]
fn maglev_weights_give_proportional_shares() {
    let table = Maglev::new(&names(2), &[3, 1]);
    let heavy = table.table.iter().filter(|&&slot| slot == 0).count();
    let share = heavy as f64 / Maglev::TABLE_SIZE as f64;
    assert!((share - 0.75).abs() < 0.01, "{share}");
}

#[test]
fn the_stable_hash_does_not_change_between_builds() {
    assert_eq!(stable_hash(b"client-1", 0), stable_hash(b"client-1", 0));
    assert_ne!(stable_hash(b"client-1", 0), stable_hash(b"client-2", 0));
    // A fixed value: instances of different builds must agree on where a key goes.
    assert_eq!(stable_hash(b"", 0), mix(0xcbf2_9ce4_8422_2325));
}

#[test]
fn slow_start_ramps_a_backend_from_a_tenth_to_its_full_weight() {
    let backends = loads(&[1, 1]);
    let slow_start = Duration::from_secs(10);
    let balancer = Balancer::new(Balance::RoundRobin, &backends, &names(2), slow_start);
    let start = Instant::now();
    backends[1].start_ramp(start);
    let share_at = |at: Duration| {
        let now = start + at;
        let input = PickInput {
            key_hash: None,
            random: 0,
            now,
            slow_start,
        };
        let picks = (0..1000)
            .filter_map(|_| balancer.pick(&backends, |_| true, &input))
            .filter(|&index| index == 1)
            .count();
        picks as f64 / 1000.0
    };
    // Weight 0.1 against 1, then 0.5 against 1, then equal.
    assert!((share_at(Duration::ZERO) - 0.1 / 1.1).abs() < 0.01);
    assert!((share_at(Duration::from_secs(5)) - 0.5 / 1.5).abs() < 0.01);
    assert!((share_at(Duration::from_secs(10)) - 0.5).abs() < 0.01);
    // A ramp may be set to begin later, when an ejection ends.
    backends[0].start_ramp(start + Duration::from_secs(20));
    assert!(
        (backends[0].weight_at(start + Duration::from_secs(15), slow_start) - 0.1).abs() < 1e-9
    );
    assert!(
        (backends[0].weight_at(start + Duration::from_secs(25), slow_start) - 0.5).abs() < 1e-9
    );
}

#[test]
fn least_connections_shares_ties_evenly_beside_a_busy_backend() {
    let backends = loads(&[1, 1, 1]);
    backends[0].in_flight.store(1, Ordering::Relaxed);
    let balancer = Balancer::new(
        Balance::LeastConnections,
        &backends,
        &names(3),
        Duration::ZERO,
    );
    let picks = picks(&balancer, &backends, 600);
    let to = |index: usize| picks.iter().filter(|&&pick| pick == index).count();
    assert_eq!((to(0), to(1), to(2)), (0, 300, 300));
}

#[test]
fn peak_ewma_tries_an_avoided_slow_backend_again_after_a_while() {
    let backends = loads(&[1, 1]);
    let balancer = Balancer::new(Balance::PeakEwma, &backends, &names(2), Duration::ZERO);
    let start = Instant::now();
    backends[1].observe_latency(Duration::from_millis(100), start);
    let fast_answer_at =
        |at: Duration| backends[0].observe_latency(Duration::from_millis(1), start + at);
    fast_answer_at(Duration::ZERO);
    assert_eq!(
        balancer.pick(&backends, |_| true, &input(7, None, start)),
        Some(0)
    );
    // The fast backend keeps answering; the slow one gets no requests and so no new samples,
    // until its estimate has decayed below the fast one's.
    for second in 1..=60 {
        fast_answer_at(Duration::from_secs(second));
    }
    let later = start + Duration::from_secs(60);
    assert_eq!(
        balancer.pick(&backends, |_| true, &input(7, None, later)),
        Some(1)
    );
}

#[test]
fn peak_ewma_does_not_let_a_stalled_backend_decay_to_fast() {
    let backends = loads(&[1, 1]);
    let balancer = Balancer::new(Balance::PeakEwma, &backends, &names(2), Duration::ZERO);
    let start = Instant::now();
    backends[0].observe_latency(Duration::from_millis(1), start);
    backends[1].observe_latency(Duration::from_millis(50), start);
    // The slow one holds requests that never end; a minute later it is still the costlier.
    backends[1].in_flight.store(3, Ordering::Relaxed);
    for second in 1..=60 {
        backends[0].observe_latency(
            Duration::from_millis(1),
            start + Duration::from_secs(second),
        );
    }
    let later = start + Duration::from_secs(60);
    assert_eq!(
        balancer.pick(&backends, |_| true, &input(7, None, later)),
        Some(0)
    );
}
