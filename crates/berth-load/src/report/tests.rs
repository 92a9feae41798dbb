//! The targets and the table, on fixture figures.

use std::time::Duration;

use super::*;
use crate::direct::Throughput;
use crate::paired::{InsideBerthd, Paired};

fn run() -> Run {
    let latency = Percentiles::of(&[Duration::from_millis(40), Duration::from_millis(60)]);
    let throughput = |per_sec| Throughput {
        per_sec,
        latency,
        p50_first_100_ms: Some(30.0),
        p50_last_100_ms: Some(36.0),
        teardown_per_sec: 50.0,
        reaped_after_kill: latency,
        made: 1000,
        memory: None,
    };
    Run {
        concurrency: 8,
        round: 1,
        floor_first: false,
        create: Creates {
            made: 1000,
            per_sec: 30.0,
            latency,
            p50_first_100_ms: Some(40.0),
            p50_last_100_ms: Some(48.0),
        },
        daemon: DaemonCost {
            before: ProcSample {
                rss_kb: 8 * 1024,
                ..ProcSample::default()
            },
            at_n: ProcSample {
                rss_kb: 20 * 1024,
                pss_kb: 19 * 1024,
                threads: 4,
                fds: 3000,
                ..ProcSample::default()
            },
            create_cpu_secs: 2.0,
            helper_cpu_secs: 0.5,
            teardown_cpu_secs: 0.4,
            host_kb_per_container: 700.0,
            other_children: 1,
        },
        stats: StatsLoad {
            skipped: Some("GetStats answers UNIMPLEMENTED".into()),
            ..StatsLoad::default()
        },
        exits: Exits {
            latency: Percentiles::of(&[Duration::from_millis(2), Duration::from_millis(9)]),
            teardown_per_sec: 45.0,
            missing: 0,
        },
        floor: Some(Floor {
            create_start: throughput(25.0),
            run_detached: throughput(40.0),
        }),
        youki_floor: None,
        memory: None,
    }
}

fn report() -> Report {
    let mut report = Report {
        host: Host {
            cpus: 2,
            kernel: "6.18".into(),
            memory_gib: 24.0,
            load_average_start: Some(0.1),
            load_average_end: Some(0.5),
            wakeup: Some(WakeupCost {
                across_cpus_us: Some(57.04),
                one_cpu_us: 3.96,
            }),
        },
        runtime: "runc".into(),
        runtime_version: "runc version 1.1.5".into(),
        n: 1000,
        channel: ChannelMode::Shared,
        runtime_skipped: None,
        youki: DirectYouki::default(),
        rounds: 1,
        runs: vec![run()],
        soak: None,
        paired: None,
        targets: Vec::new(),
    };
    report.targets = targets(&report);
    report
}

#[test]
fn targets_hold_each_figure_to_its_limit() {
    let report = report();
    let verdicts: Vec<(bool, &str)> = report
        .targets
        .iter()
        .map(|t| (t.pass, t.detail.as_str()))
        .collect();
    assert_eq!(
        verdicts,
        vec![
            (false, "30.0/s vs 40.0/s (run -d) = 0.75"),
            (true, "20.0 ≤ 25.6"),
            (true, "1 children of berthd besides the 1000 inits"),
            (
                false,
                "40.0 ms → 48.0 ms (+20%) (direct run -d: 30.0 ms → 36.0 ms (+20%))"
            ),
            (false, "45.0/s vs 50.0/s = 0.90"),
            (
                true,
                "p99 9.0 ms (direct kill to reaped: p99 60.0 ms), 0 missing"
            ),
            (false, "2.50 ms (0.50 ms of it the helper's)"),
        ]
    );
}

/// Three rounds, the second with the floor first: each run's targets are named by their round,
/// and each target's figure is held to its median over the rounds.
#[test]
fn with_several_rounds_the_targets_are_held_to_their_medians() {
    let mut report = report();
    report.rounds = 3;
    let mut second = run();
    second.round = 2;
    second.floor_first = true;
    second.create.per_sec = 39.0;
    second.exits.teardown_per_sec = 48.0;
    let mut third = run();
    third.round = 3;
    third.create.per_sec = 38.4;
    third.exits.missing = 1;
    report.runs.push(second);
    report.runs.push(third);
    report.targets = targets(&report);
    let named = |what: &str| {
        report
            .targets
            .iter()
            .find(|t| t.what == what)
            .unwrap_or_else(|| panic!("no target {what:?} in {:#?}", report.targets))
    };
    assert!(!named("round 1: C=8: create rate ≥ 0.95 × the direct floor").pass);
    assert!(named("round 2: C=8: create rate ≥ 0.95 × the direct floor").pass);
    let create = named("median of 3 rounds: C=8: create rate ≥ 0.95 × the direct floor");
    assert!(create.pass, "{create:?}");
    assert_eq!(create.detail, "0.960 (rounds, sorted: 0.750, 0.960, 0.975)");
    let teardown = named("median of 3 rounds: C=8: teardown rate ≥ 0.95 × direct kill+delete");
    assert!(!teardown.pass, "{teardown:?}");
    assert_eq!(
        teardown.detail,
        "0.900 (rounds, sorted: 0.900, 0.900, 0.960)"
    );
    // A missing exit is no noise: the round that had it fails the median as well.
    assert!(!named("round 3: C=8: exit event p99 ≤ 15 ms after the kill").pass);
    assert!(named("round 2: C=8: exit event p99 ≤ 15 ms after the kill").pass);
    let exits = named("median of 3 rounds: C=8: exit event p99 ≤ 15 ms after the kill");
    assert!(!exits.pass, "{exits:?}");
    assert_eq!(
        exits.detail,
        "9.000 (rounds, sorted: 9.000, 9.000, 9.000); failed outright in a round (see its line)"
    );
    let text = render(&report);
    assert!(
        text.contains("C=8, N=1000, round 2 of 3 (direct first)"),
        "{text}"
    );
}

#[test]
fn the_table_puts_berthd_beside_the_floor() {
    let text = render(&report());
    assert!(
        text.starts_with("berth load: runc (runc version 1.1.5), N=1000, one shared connection;"),
        "{text}"
    );
    assert!(
        text.lines().nth(1)
            == Some(
                "a thread wake-up round trip here takes 57.0 µs of CPU across two CPUs, 4.0 µs on one; berthd makes several per create"
            ),
        "{text}"
    );
    let create = text
        .lines()
        .find(|l| l.starts_with("create rate"))
        .expect("a create rate row");
    assert!(
        create.contains("30.0") && create.contains("40.0 (run -d)") && create.ends_with("0.75"),
        "{create}"
    );
    assert!(
        text.contains("skipped: GetStats answers UNIMPLEMENTED"),
        "{text}"
    );
    assert!(
        text.contains(
            "  pass  C=8: exit event p99 ≤ 15 ms after the kill: p99 9.0 ms (direct kill to reaped: p99 60.0 ms), 0 missing"
        ),
        "{text}"
    );
    let exits = text
        .lines()
        .find(|l| l.starts_with("exit event after Signal"))
        .expect("an exit event row");
    assert!(exits.contains("(reaped)"), "{exits}");
    assert!(text.contains("teardown (containers/s)"), "{text}");
    let teardown_cpu = text
        .lines()
        .find(|l| l.starts_with("berthd + helper CPU during teardown"))
        .expect("a teardown CPU row");
    assert!(teardown_cpu.contains("0.40 s, 0.40 ms"), "{teardown_cpu}");
    let flat = text
        .lines()
        .find(|l| l.starts_with("create p50, first → last 100"))
        .expect("a first → last row");
    assert!(
        flat.contains("40.0 → 48.0") && flat.contains("30.0 → 36.0 (run -d)"),
        "{flat}"
    );
}

#[test]
fn a_skipped_runtime_says_so_and_nothing_else() {
    let mut report = report();
    report.runtime = "crun".into();
    report.runtime_skipped = Some("crun run -d failed: cannot set hugetlb".into());
    let text = render(&report);
    assert!(
        text.ends_with("crun: skipped: crun run -d failed: cannot set hugetlb\n"),
        "{text}"
    );
    assert!(!text.contains("create rate"), "{text}");
}

#[test]
fn youki_by_hand_sits_beside_the_floor_without_changing_the_targets() {
    let mut report = report();
    let before: Vec<String> = report.targets.iter().map(|t| t.detail.clone()).collect();
    report.youki.version = Some("youki version 0.7.0".into());
    let run = &mut report.runs[0];
    let mut youki = run.floor.clone().expect("the fixture has a floor");
    youki.create_start.per_sec = 60.0;
    youki.run_detached.per_sec = 75.0;
    youki.create_start.teardown_per_sec = 90.0;
    run.youki_floor = Some(youki);
    report.targets = targets(&report);
    let after: Vec<String> = report.targets.iter().map(|t| t.detail.clone()).collect();
    assert_eq!(after, before);
    let text = render(&report);
    assert!(
        text.contains("\nyouki by hand: youki version 0.7.0\n"),
        "{text}"
    );
    let row = |start: &str| {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no {start} row in {text}"))
            .to_owned()
    };
    let rate = row("youki by hand create+start / run -d");
    assert!(
        rate.contains("60.0 / 75.0") && rate.ends_with("0.40"),
        "{rate}"
    );
    assert!(
        row("youki by hand run -d p50 / p90 / p99").contains("40.0 /"),
        "{text}"
    );
    let teardown = row("youki by hand teardown");
    assert!(
        teardown.contains("90.0 (kill+delete)") && teardown.ends_with("0.50"),
        "{teardown}"
    );
}

#[test]
fn a_skipped_youki_says_why() {
    let mut report = report();
    report.youki.skipped = Some("not installed".into());
    let text = render(&report);
    assert!(text.contains("\nyouki: skipped: not installed\n"), "{text}");
    assert!(!text.contains("youki by hand"), "{text}");
}

/// The paired creates are held to the rate target by their means (at concurrency 1 a rate is
/// one over the mean create) and printed after the table.
/// The report's targets made again, and the paired one among them.
fn paired_target(report: &mut Report) -> Target {
    report.targets = targets(report);
    report
        .targets
        .iter()
        .find(|t| t.what.starts_with("C=1 paired"))
        .cloned()
        .expect("a paired target")
}

#[test]
fn paired_creates_are_held_to_the_rate_target_by_their_means() {
    let mut report = report();
    let ms = |v: &[u64]| {
        Percentiles::of(
            &v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>(),
        )
    };
    report.paired = Some(Paired {
        pairs: 4,
        berthd: ms(&[20, 22, 22, 24]),
        direct: ms(&[19, 21, 21, 23]),
        inside_berthd: Some(InsideBerthd {
            handling_ms: 21.5,
            runtime_ms: 20.75,
        }),
    });
    let paired = paired_target(&mut report);
    assert!(paired.pass, "{paired:?}");
    assert_eq!(
        paired.detail,
        "mean create 22.0 ms vs 21.0 ms (run -d) over 4 pairs = 0.95"
    );
    let text = render(&report);
    assert!(
        text.contains("create p50 / mean / p99 (ms): berthd 22.0 / 22.0 / 24.0, run -d 21.0 / 21.0 / 23.0; rate ratio 0.95"),
        "{text}"
    );
    assert!(
        text.contains("runtime command 20.75 ms (run -d by hand 21.00 ms), rest of the handler 0.75 ms, outside the handler (client, HTTP/2, socket) 0.50 ms"),
        "{text}"
    );
    report.paired = Some(Paired {
        pairs: 4,
        berthd: ms(&[30, 30, 30, 30]),
        direct: ms(&[21, 21, 21, 21]),
        inside_berthd: None,
    });
    let paired = paired_target(&mut report);
    assert!(!paired.pass, "{paired:?}");
}
