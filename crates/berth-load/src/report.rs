//! The figures of a load run, the targets they are held to, and the table that shows them.

use serde::Serialize;

use super::ChannelMode;
use super::daemon::{Exits, StatsLoad};
use super::density::{self, MemoryTrace};
use super::direct::Floor;
use super::paired::Paired;
use super::procfs::ProcSample;
use super::soak::Soak;
use super::summary::Percentiles;
use super::table::Table;
use super::wakeup::WakeupCost;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub host: Host,
    pub runtime: String,
    pub runtime_version: String,
    pub n: usize,
    pub channel: ChannelMode,
    /// Why the runtime could not run here, when it could not: nothing else was measured.
    pub runtime_skipped: Option<String>,
    /// youki run by hand beside the floor (`--direct-youki`).
    pub youki: DirectYouki,
    /// How many times each concurrency level ran (`--rounds`).
    pub rounds: usize,
    pub runs: Vec<Run>,
    pub soak: Option<Soak>,
    /// Creates through berthd and by hand, interleaved (`--paired`).
    pub paired: Option<Paired>,
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub cpus: usize,
    pub kernel: String,
    pub memory_gib: f64,
    pub load_average_start: Option<f64>,
    pub load_average_end: Option<f64>,
    /// What a thread hand-off costs here, measured before the run.
    pub wakeup: Option<WakeupCost>,
}

/// The second direct floor, youki by hand: its version, or why it was not measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DirectYouki {
    pub version: Option<String>,
    pub skipped: Option<String>,
}

/// One concurrency level: berthd's figures, then the direct floor's.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub concurrency: usize,
    /// Which of the `--rounds` this is, from 1.
    pub round: usize,
    /// The direct floors ran before berthd in this round.
    pub floor_first: bool,
    pub create: Creates,
    pub daemon: DaemonCost,
    pub stats: StatsLoad,
    pub exits: Exits,
    pub floor: Option<Floor>,
    /// youki by hand, the same way as the floor, for comparison.
    pub youki_floor: Option<Floor>,
    /// berthd's memory trace (`--memory-every`).
    pub memory: Option<MemoryTrace>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Creates {
    /// Containers made: N, unless a memory trace's creates stopped short.
    pub made: usize,
    pub per_sec: f64,
    pub latency: Option<Percentiles>,
    /// p50 of the first and of the last 100 creates: does a create get slower with more running?
    pub p50_first_100_ms: Option<f64>,
    pub p50_last_100_ms: Option<f64>,
}

/// berthd before the creates and with all N running.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonCost {
    pub before: ProcSample,
    pub at_n: ProcSample,
    /// berthd's own CPU over the creates; the CPU target holds it and `helper_cpu_secs` together.
    pub create_cpu_secs: f64,
    /// The spawn helper's own CPU over the creates (not the runtime processes it starts): it
    /// does berthd's work in a process of its own, and counts towards berthd's CPU target.
    pub helper_cpu_secs: f64,
    /// berthd's and its spawn helper's CPU from the first kill until the last container is
    /// deleted from the runtime: the exits, their clean-up and the deletes' spawns.
    pub teardown_cpu_secs: f64,
    /// The host's MemAvailable drop over the creates, per container.
    pub host_kb_per_container: f64,
    /// berthd's children that are not container inits (the spawn helper).
    pub other_children: i64,
}

impl DaemonCost {
    /// berthd's and its spawn helper's CPU over the creates, per create made.
    fn cpu_ms_per_create(&self, n: usize) -> f64 {
        (self.create_cpu_secs + self.helper_cpu_secs) * 1000.0 / n.max(1) as f64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub what: String,
    pub pass: bool,
    pub detail: String,
    /// Which figure at which concurrency: the rounds' figures are gathered by it.
    #[serde(skip)]
    key: (usize, &'static str),
    /// The figure held to the bound, for the median over rounds.
    #[serde(skip)]
    value: f64,
    #[serde(skip)]
    bound: Bound,
    /// A failure no other round makes up for (a missing exit, a process per container).
    #[serde(skip)]
    broken: bool,
}

/// What a target's figure must be.
#[derive(Debug, Clone, Copy)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

impl Bound {
    fn holds(self, value: f64) -> bool {
        match self {
            Bound::AtLeast(least) => value >= least,
            Bound::AtMost(most) => value <= most,
        }
    }
}

impl Target {
    fn new(
        key: (usize, &'static str),
        what: String,
        value: f64,
        bound: Bound,
        detail: String,
    ) -> Target {
        Target {
            what,
            pass: bound.holds(value),
            detail,
            key,
            value,
            bound,
            broken: false,
        }
    }

    /// Fails the target, whatever its figure, when `broken`.
    fn broken_if(mut self, broken: bool) -> Target {
        self.broken = broken;
        self.pass &= !broken;
        self
    }
}

/// The targets, for whatever this run measured: each run's, and with several rounds the
/// median of each target's figure over them.
pub fn targets(report: &Report) -> Vec<Target> {
    let mut of_runs: Vec<Vec<Target>> = report.runs.iter().map(run_targets).collect();
    let mut over_rounds = Vec::new();
    if report.rounds > 1 {
        over_rounds = medians(&of_runs);
        for (run, targets) in report.runs.iter().zip(&mut of_runs) {
            for target in targets {
                target.what = format!("round {}: {}", run.round, target.what);
            }
        }
    }
    let mut out: Vec<Target> = of_runs.into_iter().flatten().chain(over_rounds).collect();
    if let Some((paired, ratio)) = report
        .paired
        .as_ref()
        .and_then(|p| Some((p, p.rate_ratio()?)))
    {
        out.push(Target::new(
            (1, "paired create rate"),
            "C=1 paired: create rate ≥ 0.95 × run -d's, the two interleaved".into(),
            ratio,
            Bound::AtLeast(0.95),
            format!(
                "mean create {:.1} ms vs {:.1} ms (run -d) over {} pairs = {ratio:.2}",
                paired.berthd.map_or(0.0, |p| p.mean_ms),
                paired.direct.map_or(0.0, |p| p.mean_ms),
                paired.pairs
            ),
        ));
    }
    if let Some(soak) = &report.soak {
        let (rss, fds) = soak.drift_percent();
        out.push(Target::new(
            (0, "soak drift"),
            "soak: RSS and fds flat (± 5%) from the middle to the end".into(),
            rss.abs().max(fds.abs()),
            Bound::AtMost(5.0),
            format!("RSS {rss:+.1}%, fds {fds:+.1}%"),
        ));
        out.push(Target::new(
            (0, "soak missing exits"),
            "soak: no exit event missing".into(),
            soak.missing_exits as f64,
            Bound::AtMost(0.0),
            format!("{} missing of {}", soak.missing_exits, soak.cycles),
        ));
    }
    out
}

/// For each figure, the median of the rounds' values, failed outright if any round was broken.
fn medians(of_runs: &[Vec<Target>]) -> Vec<Target> {
    let mut gathered: Vec<(&Target, Vec<f64>, bool)> = Vec::new();
    for target in of_runs.iter().flatten() {
        match gathered
            .iter_mut()
            .find(|(first, ..)| first.key == target.key)
        {
            Some((_, values, broken)) => {
                values.push(target.value);
                *broken |= target.broken;
            }
            None => gathered.push((target, vec![target.value], target.broken)),
        }
    }
    gathered
        .into_iter()
        .map(|(first, mut values, broken)| {
            values.sort_by(f64::total_cmp);
            let median = median(&values);
            let each: Vec<String> = values.iter().map(|v| format!("{v:.3}")).collect();
            let mut detail = format!("{median:.3} (rounds, sorted: {})", each.join(", "));
            if broken {
                detail.push_str("; failed outright in a round (see its line)");
            }
            Target::new(
                first.key,
                format!("median of {} rounds: {}", values.len(), first.what),
                median,
                first.bound,
                detail,
            )
            .broken_if(broken)
        })
        .collect()
}

/// The median of sorted `values`: the middle one, or the mean of the middle two.
fn median(values: &[f64]) -> f64 {
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The targets one run is held to.
fn run_targets(run: &Run) -> Vec<Target> {
    let mut out = Vec::new();
    let c = run.concurrency;
    let n = run.create.made;
    if let Some(floor) = &run.floor {
        let (launch, best) = floor.best();
        let ratio = run.create.per_sec / best.per_sec;
        out.push(Target::new(
            (c, "create rate"),
            format!("C={c}: create rate ≥ 0.95 × the direct floor"),
            ratio,
            Bound::AtLeast(0.95),
            format!(
                "{:.1}/s vs {:.1}/s ({}) = {ratio:.2}",
                run.create.per_sec,
                best.per_sec,
                launch.name()
            ),
        ));
    }
    let limit_kb = 10 * 1024 + 16 * n as u64;
    out.push(Target::new(
        (c, "berthd rss"),
        format!("C={c}: berthd RSS at {n} ≤ 10 MB + 16 KB each"),
        run.daemon.at_n.rss_kb as f64 / 1024.0,
        Bound::AtMost(limit_kb as f64 / 1024.0),
        format!("{} ≤ {}", mb(run.daemon.at_n.rss_kb), mb(limit_kb)),
    ));
    out.push(
        Target::new(
            (c, "processes"),
            format!("C={c}: no process per container besides its own"),
            run.daemon.other_children as f64,
            Bound::AtMost(1.0),
            format!(
                "{} children of berthd besides the {n} inits",
                run.daemon.other_children
            ),
        )
        .broken_if(run.daemon.other_children > 1),
    );
    if let (Some(first), Some(last)) = (run.create.p50_first_100_ms, run.create.p50_last_100_ms) {
        // The direct runtime's own slowing, for scale: most of it is the kernel's.
        let direct = run
            .floor
            .as_ref()
            .and_then(Floor::p50_first_and_last_100)
            .map(|(launch, first, last)| {
                format!(
                    " (direct {}: {})",
                    launch.name(),
                    first_to_last(first, last)
                )
            })
            .unwrap_or_default();
        out.push(Target::new(
            (c, "flat create p50"),
            format!("C={c}: create p50 with {n} running within 10% of the first 100"),
            last / first,
            Bound::AtMost(1.10),
            format!("{}{direct}", first_to_last(first, last)),
        ));
    }
    if let Some(floor) = &run.floor {
        let direct = floor.best_teardown_per_sec();
        let ratio = run.exits.teardown_per_sec / direct;
        out.push(Target::new(
            (c, "teardown rate"),
            format!("C={c}: teardown rate ≥ 0.95 × direct kill+delete"),
            ratio,
            Bound::AtLeast(0.95),
            format!(
                "{:.1}/s vs {direct:.1}/s = {ratio:.2}",
                run.exits.teardown_per_sec
            ),
        ));
    }
    if let Some(exit) = &run.exits.latency {
        // The density issue's bound: 5 ms with one kill at a time, 15 ms with several.
        let bound = if c == 1 { 5.0 } else { 15.0 };
        let kernel = run
            .floor
            .as_ref()
            .and_then(Floor::reaped_after_kill)
            .map(|p| format!(" (direct kill to reaped: p99 {:.1} ms)", p.p99_ms))
            .unwrap_or_default();
        // A missing exit fails the target whatever the latency of the others.
        out.push(
            Target::new(
                (c, "exit p99"),
                format!("C={c}: exit event p99 ≤ {bound} ms after the kill"),
                exit.p99_ms,
                Bound::AtMost(bound),
                format!(
                    "p99 {:.1} ms{kernel}, {} missing",
                    exit.p99_ms, run.exits.missing
                ),
            )
            .broken_if(run.exits.missing > 0),
        );
    }
    let cpu_ms = run.daemon.cpu_ms_per_create(n);
    out.push(Target::new(
        (c, "berthd cpu"),
        format!("C={c}: berthd CPU (its spawn helper's included) ≤ 0.8 ms per create"),
        cpu_ms,
        Bound::AtMost(0.8),
        format!(
            "{cpu_ms:.2} ms ({:.2} ms of it the helper's)",
            run.daemon.helper_cpu_secs * 1000.0 / n.max(1) as f64
        ),
    ));
    out
}

/// "57.0 µs of CPU across two CPUs, 3.9 µs on one", or only the last where there is one CPU.
fn wakeup_cost(cost: &WakeupCost) -> String {
    match cost.across_cpus_us {
        Some(across) => format!(
            "{across:.1} µs of CPU across two CPUs, {:.1} µs on one",
            cost.one_cpu_us
        ),
        None => format!("{:.1} µs of CPU on the one CPU", cost.one_cpu_us),
    }
}

/// "a ms → b ms (+x%)".
fn first_to_last(first: f64, last: f64) -> String {
    format!(
        "{first:.1} ms → {last:.1} ms ({:+.0}%)",
        (last / first - 1.0) * 100.0
    )
}

pub fn render(report: &Report) -> String {
    let mut out = format!(
        "berth load: {} ({}){}, {} connection{}; {} CPUs, {:.0} GiB, kernel {}, load average {} → {}\n",
        report.runtime,
        report.runtime_version,
        if report.soak.is_some() {
            String::new()
        } else {
            format!(", N={}", report.n)
        },
        match report.channel {
            ChannelMode::Shared => "one shared",
            ChannelMode::PerTask => "one per task",
        },
        if report.channel == ChannelMode::Shared {
            ""
        } else {
            "s"
        },
        report.host.cpus,
        report.host.memory_gib,
        report.host.kernel,
        opt(report.host.load_average_start, 2),
        opt(report.host.load_average_end, 2),
    );
    if let Some(wakeup) = &report.host.wakeup {
        out.push_str(&format!(
            "a thread wake-up round trip here takes {}; berthd makes several per create\n",
            wakeup_cost(wakeup)
        ));
    }
    if let Some(why) = &report.runtime_skipped {
        out.push_str(&format!("{}: skipped: {why}\n", report.runtime));
        return out;
    }
    if !report.runs.is_empty() {
        match &report.youki {
            DirectYouki {
                skipped: Some(why), ..
            } => out.push_str(&format!("youki: skipped: {why}\n")),
            DirectYouki {
                version: Some(version),
                ..
            } => out.push_str(&format!("youki by hand: {version}\n")),
            _ => {}
        }
        out.push('\n');
        out.push_str(&runs_table(report).render());
    }
    for run in &report.runs {
        let floors = run.floor.iter().chain(&run.youki_floor);
        let traces: Vec<&MemoryTrace> = run
            .memory
            .iter()
            .chain(floors.flat_map(Floor::memory_traces))
            .collect();
        if !traces.is_empty() {
            out.push_str(&format!("\nC={}", run.concurrency));
            if report.rounds > 1 {
                out.push_str(&format!(", round {}", run.round));
            }
            out.push_str(&density::render(&traces));
        }
    }
    if let Some(paired) = &report.paired {
        out.push_str(&render_paired(paired));
    }
    if let Some(soak) = &report.soak {
        out.push('\n');
        out.push_str(&soak_table(soak).render());
    }
    if !report.targets.is_empty() {
        out.push_str("\ntargets\n");
        for target in &report.targets {
            let verdict = if target.pass { "pass" } else { "MISS" };
            out.push_str(&format!(
                "  {verdict}  {}: {}\n",
                target.what, target.detail
            ));
        }
    }
    out
}

fn runs_table(report: &Report) -> Table {
    let mut table = Table::new(&["figure", "berthd", "direct", "berthd/direct"]);
    for run in &report.runs {
        let n = run.create.made;
        let round = if report.rounds > 1 {
            let order = if run.floor_first {
                "direct first"
            } else {
                "berthd first"
            };
            format!(", round {} of {} ({order})", run.round, report.rounds)
        } else {
            String::new()
        };
        if n == report.n {
            table.section(format!("C={}, N={n}{round}", run.concurrency));
        } else {
            table.section(format!(
                "C={}, N={n} of {} (creates stopped){round}",
                run.concurrency, report.n
            ));
        }
        let best = run.floor.as_ref().map(Floor::best);
        let floor_rate = best.map(|(launch, t)| format!("{:.1} ({})", t.per_sec, launch.name()));
        table.row(vec![
            "create rate (containers/s)".into(),
            format!("{:.1}", run.create.per_sec),
            floor_rate.unwrap_or_default(),
            best.map(|(_, t)| ratio(run.create.per_sec, t.per_sec))
                .unwrap_or_default(),
        ]);
        table.row(vec![
            "create latency p50 / p90 / p99 (ms)".into(),
            run.create.latency.map(|p| p.triple()).unwrap_or_default(),
            best.and_then(|(_, t)| t.latency.map(|p| p.triple()))
                .unwrap_or_default(),
            match (run.create.latency, best.and_then(|(_, t)| t.latency)) {
                (Some(ours), Some(floor)) => ratio(ours.p50_ms, floor.p50_ms),
                _ => String::new(),
            },
        ]);
        if let Some(floor) = &run.floor {
            table.row(vec![
                "direct create+start / run -d (containers/s)".into(),
                String::new(),
                format!(
                    "{:.1} / {:.1}",
                    floor.create_start.per_sec, floor.run_detached.per_sec
                ),
                String::new(),
            ]);
        }
        if let Some(youki) = &run.youki_floor {
            youki_rows(&mut table, run, youki);
        }
        if let (Some(first), Some(last)) = (run.create.p50_first_100_ms, run.create.p50_last_100_ms)
        {
            let direct = run
                .floor
                .as_ref()
                .and_then(Floor::p50_first_and_last_100)
                .map(|(launch, first, last)| format!("{first:.1} → {last:.1} ({})", launch.name()))
                .unwrap_or_default();
            table.row(vec![
                "create p50, first → last 100 (ms)".into(),
                format!("{first:.1} → {last:.1}"),
                direct,
                String::new(),
            ]);
        }
        let (before, at_n) = (&run.daemon.before, &run.daemon.at_n);
        table.row(vec![
            format!("berthd RSS / PSS at {n} (MB)"),
            format!("{} / {}", mb(at_n.rss_kb), mb(at_n.pss_kb)),
            String::new(),
            String::new(),
        ]);
        table.row(vec![
            "berthd RSS before → growth per container".into(),
            format!(
                "{} → {:.1} KB",
                mb(before.rss_kb),
                (at_n.rss_kb as f64 - before.rss_kb as f64) / n.max(1) as f64
            ),
            String::new(),
            String::new(),
        ]);
        table.row(vec![
            format!("berthd threads / fds at {n}"),
            format!("{} / {}", at_n.threads, at_n.fds),
            String::new(),
            String::new(),
        ]);
        table.row(vec![
            "berthd children besides inits".into(),
            run.daemon.other_children.to_string(),
            String::new(),
            String::new(),
        ]);
        table.row(vec![
            // perf/compare reads this row's last figure.
            "berthd + helper CPU during creates (s, ms each)".into(),
            format!(
                "{:.2} + {:.2} s, {:.2} ms",
                run.daemon.create_cpu_secs,
                run.daemon.helper_cpu_secs,
                run.daemon.cpu_ms_per_create(n)
            ),
            String::new(),
            String::new(),
        ]);
        table.row(vec![
            "host memory per container (MB)".into(),
            format!("{:.2}", run.daemon.host_kb_per_container / 1024.0),
            String::new(),
            String::new(),
        ]);
        let stats = &run.stats;
        match &stats.skipped {
            Some(why) => table.note("stats load", format!("skipped: {why}")),
            None => {
                table.note(
                    "stats load",
                    format!(
                        "{} subscribers for {:.0} s: berthd {:.1}% CPU, {} samples received",
                        stats.subscribers,
                        stats.secs,
                        stats.berthd_cpu_percent,
                        stats.samples_received
                    ),
                );
                match (&stats.tick, &stats.tick_skipped) {
                    (Some(tick), _) => table.note(
                        "sampler tick",
                        format!("{:.2} ms ({})", tick.mean_ms, tick.metric),
                    ),
                    (None, Some(why)) => table.note("sampler tick", format!("skipped: {why}")),
                    (None, None) => {}
                }
            }
        }
        // The direct column: kill to reaped with no daemon, what the kernel takes.
        let reaped = run.floor.as_ref().and_then(Floor::reaped_after_kill);
        table.row(vec![
            "exit event after Signal p50 / p90 / p99 (ms)".into(),
            run.exits.latency.map(|p| p.triple()).unwrap_or_default(),
            reaped
                .map(|p| format!("{} (reaped)", p.triple()))
                .unwrap_or_default(),
            String::new(),
        ]);
        let direct_teardown = run.floor.as_ref().map(Floor::best_teardown_per_sec);
        table.row(vec![
            "berthd + helper CPU during teardown (s, ms each)".into(),
            format!(
                "{:.2} s, {:.2} ms",
                run.daemon.teardown_cpu_secs,
                run.daemon.teardown_cpu_secs * 1000.0 / n.max(1) as f64
            ),
            String::new(),
            String::new(),
        ]);
        table.row(vec![
            "teardown (containers/s)".into(),
            format!(
                "{:.1} ({} missing)",
                run.exits.teardown_per_sec, run.exits.missing
            ),
            direct_teardown
                .map(|t| format!("{t:.1} (kill+delete)"))
                .unwrap_or_default(),
            direct_teardown
                .map(|t| ratio(run.exits.teardown_per_sec, t))
                .unwrap_or_default(),
        ]);
    }
    table
}

/// The paired creates: berthd's and the runtime's by hand, interleaved at concurrency 1.
fn render_paired(paired: &Paired) -> String {
    let figures = |p: Option<Percentiles>| {
        p.map(|p| format!("{:.1} / {:.1} / {:.1}", p.p50_ms, p.mean_ms, p.p99_ms))
            .unwrap_or_default()
    };
    let mut out = format!(
        "\npaired at C=1, {} creates each way, interleaved (which goes first swaps every pair)\n\
         create p50 / mean / p99 (ms): berthd {}, run -d {}; rate ratio {}\n",
        paired.pairs,
        figures(paired.berthd),
        figures(paired.direct),
        paired
            .rate_ratio()
            .map(|r| format!("{r:.2}"))
            .unwrap_or_default()
    );
    if let (Some(inside), Some(client)) = (paired.inside_berthd, paired.berthd) {
        out.push_str(&format!(
            "berthd's mean create, split (its metrics): runtime command {:.2} ms (run -d by hand {}), \
             rest of the handler {:.2} ms, outside the handler (client, HTTP/2, socket) {:.2} ms\n",
            inside.runtime_ms,
            paired
                .direct
                .map(|d| format!("{:.2} ms", d.mean_ms))
                .unwrap_or_default(),
            inside.handling_ms - inside.runtime_ms,
            client.mean_ms - inside.handling_ms,
        ));
    }
    out
}

/// youki by hand in the direct column, and berthd over it.
fn youki_rows(table: &mut Table, run: &Run, youki: &Floor) {
    let (launch, best) = youki.best();
    table.row(vec![
        "youki by hand create+start / run -d (containers/s)".into(),
        String::new(),
        format!(
            "{:.1} / {:.1}",
            youki.create_start.per_sec, youki.run_detached.per_sec
        ),
        ratio(run.create.per_sec, best.per_sec),
    ]);
    table.row(vec![
        format!("youki by hand {} p50 / p90 / p99 (ms)", launch.name()),
        String::new(),
        best.latency.map(|p| p.triple()).unwrap_or_default(),
        String::new(),
    ]);
    let teardown = youki.best_teardown_per_sec();
    table.row(vec![
        "youki by hand teardown (containers/s)".into(),
        String::new(),
        format!("{teardown:.1} (kill+delete)"),
        ratio(run.exits.teardown_per_sec, teardown),
    ]);
}

fn soak_table(soak: &Soak) -> Table {
    let mut table = Table::new(&["soak", "start", "middle", "end", "middle → end"]);
    table.section(format!(
        "{:.0} s at C={}: {} cycles ({:.1}/s), {} base containers, stats: {}",
        soak.secs,
        soak.concurrency,
        soak.cycles,
        soak.cycles_per_sec,
        soak.base_containers,
        match &soak.stats_skipped {
            Some(why) => format!("skipped: {why}"),
            None => format!("{} subscribers", soak.stats_subscribers),
        }
    ));
    let (rss_drift, fd_drift) = soak.drift_percent();
    let row = |what: &str, pick: fn(&ProcSample) -> String, drift: String| {
        vec![
            what.to_owned(),
            pick(&soak.start),
            pick(&soak.middle),
            pick(&soak.end),
            drift,
        ]
    };
    table.row(row(
        "berthd RSS (MB)",
        |s| mb(s.rss_kb),
        format!("{rss_drift:+.1}%"),
    ));
    table.row(row("berthd PSS (MB)", |s| mb(s.pss_kb), String::new()));
    table.row(row(
        "berthd fds",
        |s| s.fds.to_string(),
        format!("{fd_drift:+.1}%"),
    ));
    table.row(row(
        "berthd threads",
        |s| s.threads.to_string(),
        String::new(),
    ));
    let triple = |p: Option<Percentiles>| p.map(|p| p.triple()).unwrap_or_default();
    table.row(vec![
        "create p50 / p90 / p99 (ms)".into(),
        triple(soak.create),
        String::new(),
        String::new(),
        String::new(),
    ]);
    table.row(vec![
        "exit event p50 / p90 / p99 (ms)".into(),
        triple(soak.exit),
        String::new(),
        String::new(),
        String::new(),
    ]);
    table.row(vec![
        "exit events missing / unexpected".into(),
        format!("{} / {}", soak.missing_exits, soak.unexpected_exits),
        String::new(),
        String::new(),
        String::new(),
    ]);
    table
}

/// KiB as MB with one decimal.
pub fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

fn ratio(ours: f64, floor: f64) -> String {
    if floor > 0.0 {
        format!("{:.2}", ours / floor)
    } else {
        String::new()
    }
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "?".into(), |v| format!("{v:.decimals$}"))
}

#[cfg(test)]
mod tests;
