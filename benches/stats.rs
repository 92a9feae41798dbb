//! Stats benchmarks: parsing each file kind; one sampler tick over 1000 live (empty) v1 cgroups
//! with io_uring, io_uring with capped io-wq workers, and pread, against a bare pread loop over
//! the same open files; publishing one snapshot to 1 and to 1000 waiting subscribers.
//!
//! Needs root and cgroup v1 controllers for the tick benchmarks (it makes `berth-bench/<n>` in
//! each hierarchy and removes them after); without them only the parser benchmarks run. After
//! criterion's runs it prints the goal comparisons from its own short timing loop. Those lines
//! are informational: timing on a shared machine decides nothing here, and nothing checks them;
//! pass and miss for the density targets come from `scripts/load`.

use std::hint::black_box;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::stats::cgroup::{Location, Mounts, Source};
use berth::stats::parse;
use berth::stats::snapshot::{Builder, FileKind, Names};
use berth::stats::{Backend, ContainerStats, Sampler};
use criterion::{Criterion, criterion_group, criterion_main};

const CGROUPS: usize = 1000;
const PARENT: &str = "berth-bench";
const CONTROLLERS: [&str; 4] = ["cpuacct", "cpu", "memory", "blkio"];

const NET_DEV: &[u8] = b"Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    3193      29    0    0    0     0          0         0     3193      29    0    0    0     0       0          0
  eth0: 110834862    6105    0    0    0     0          0         0   497796    5336    0    0    0     0       0          0
";

fn parsers(c: &mut Criterion) {
    let memory_stat = std::fs::read("/sys/fs/cgroup/memory/memory.stat").unwrap_or_else(|_| {
        b"cache 42221568\nrss 5722112\nrss_huge 0\nshmem 9068544\nmapped_file 6926336\n".repeat(8)
    });
    let usage_all = b"cpu user system\n0 784791543193 108210388670\n1 774754709871 107248878536\n";
    let blkio = b"8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 12288\n8:0 Discard 0\n8:0 Total 12288\nTotal 12288\n";
    let io_stat = b"8:16 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n";
    let mut group = c.benchmark_group("parse");
    group.bench_function("single value", |b| {
        b.iter(|| parse::single_u64("memory.usage_in_bytes", black_box(b"10834243584\n")))
    });
    group.bench_function("memory.stat", |b| {
        b.iter(|| {
            parse::flat_keyed("memory.stat", black_box(&memory_stat), |k, v| {
                black_box((k, v));
            })
        })
    });
    group.bench_function("cpuacct.usage_all", |b| {
        b.iter(|| {
            parse::cpuacct_usage_all(black_box(usage_all), |u, s| {
                black_box((u, s));
            })
        })
    });
    group.bench_function("blkio", |b| {
        b.iter(|| {
            parse::blkio_v1("blkio", black_box(blkio), |l| {
                black_box(l);
            })
        })
    });
    group.bench_function("io.stat", |b| {
        b.iter(|| {
            parse::io_stat(black_box(io_stat), |a, b, k, v| {
                black_box((a, b, k, v));
            })
        })
    });
    group.bench_function("net/dev", |b| {
        b.iter(|| {
            parse::net_dev(black_box(NET_DEV), |l| {
                black_box(l);
            })
        })
    });
    group.bench_function("memory.stat into a snapshot", |b| {
        let mut names = Names::default();
        b.iter(|| {
            let mut builder = Builder::new(&mut names, &[]);
            builder
                .apply(FileKind::MemoryStatV1, black_box(&memory_stat))
                .unwrap();
            builder.finish(0)
        })
    });
    group.finish();
}

/// 1000 empty cgroups in every hierarchy the sampler reads, removed on drop.
struct BenchCgroups {
    dirs: Vec<PathBuf>,
}

impl BenchCgroups {
    fn create() -> Option<BenchCgroups> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("tick benchmarks need root; skipped");
            return None;
        }
        let mut made = BenchCgroups { dirs: Vec::new() };
        for controller in CONTROLLERS {
            let parent = PathBuf::from(format!("/sys/fs/cgroup/{controller}/{PARENT}"));
            if std::fs::create_dir_all(&parent).is_err() {
                eprintln!("no v1 {controller} hierarchy; tick benchmarks skipped");
                return None;
            }
            made.dirs.push(parent.clone());
            for n in 0..CGROUPS {
                let dir = parent.join(n.to_string());
                std::fs::create_dir_all(&dir).expect("make a bench cgroup");
                made.dirs.push(dir);
            }
        }
        Some(made)
    }

    fn containers(&self, mounts: &Mounts) -> Vec<Arc<ContainerStats>> {
        (0..CGROUPS)
            .map(|n| {
                let location = Location::V1(mounts.v1_dirs(&format!("/{PARENT}/{n}")));
                let source = Source::open(&location, None).expect("open bench cgroup files");
                Arc::new(ContainerStats::new(n.to_string(), source))
            })
            .collect()
    }
}

impl Drop for BenchCgroups {
    fn drop(&mut self) {
        // Children before their parents.
        for dir in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// The floor: one pread per open file, nothing else.
fn bare_pread(containers: &[Arc<ContainerStats>], buffer: &mut [u8]) {
    for container in containers {
        for file in &container.source().files {
            black_box(rustix::io::pread(file.fd.as_fd(), &mut *buffer, 0).ok());
        }
    }
}

struct Variant {
    name: &'static str,
    backend: Backend,
    iowq_workers: Option<u32>,
}

const VARIANTS: [Variant; 4] = [
    Variant {
        name: "io_uring",
        backend: Backend::IoUring,
        iowq_workers: None,
    },
    Variant {
        name: "io_uring, 1 io-wq worker",
        backend: Backend::IoUring,
        iowq_workers: Some(1),
    },
    Variant {
        name: "io_uring, 2 io-wq workers",
        backend: Backend::IoUring,
        iowq_workers: Some(2),
    },
    Variant {
        name: "pread",
        backend: Backend::Pread,
        iowq_workers: None,
    },
];

/// Median of `runs` timings of `f`, for the printed comparisons.
fn median(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn tick(c: &mut Criterion) {
    let Some(cgroups) = BenchCgroups::create() else {
        return;
    };
    // About 16 open files per cgroup: more than a default soft limit.
    let mut limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current = limit.maximum;
    let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
    let mounts = Mounts::discover();
    let containers = cgroups.containers(&mounts);
    let files: usize = containers.iter().map(|c| c.files()).sum();
    let mut buffer = vec![0u8; 16 * 1024];
    let mut group = c.benchmark_group(format!("tick over {CGROUPS} cgroups ({files} files)"));
    group.sample_size(10);
    group.bench_function("bare pread loop", |b| {
        b.iter(|| bare_pread(&containers, &mut buffer))
    });
    for variant in &VARIANTS {
        let mut sampler = Sampler::new(variant.backend, variant.iowq_workers);
        group.bench_function(variant.name, |b| b.iter(|| sampler.tick(&containers)));
    }
    group.finish();

    println!(
        "\ngoal (informational): a tick costs at most 1.2 x a bare pread loop over the same open fds"
    );
    let bare = median(15, || bare_pread(&containers, &mut buffer));
    println!(
        "  bare pread loop: {bare:?} for {files} files ({:?} a file)",
        bare / files as u32
    );
    for variant in &VARIANTS {
        let mut sampler = Sampler::new(variant.backend, variant.iowq_workers);
        let took = median(15, || {
            sampler.tick(&containers);
        });
        let ratio = took.as_secs_f64() / bare.as_secs_f64();
        let verdict = if ratio <= 1.2 { "within" } else { "over" };
        println!(
            "  {:<26} {took:?} = {ratio:.2} x bare ({verdict} the goal)",
            variant.name
        );
    }
}

fn fan_out(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mounts = Mounts::discover();
    let Ok(location) = mounts.locate(std::process::id()) else {
        eprintln!("no cgroup for this process; fan-out benchmarks skipped");
        return;
    };
    let mut results = Vec::new();
    let mut group = c.benchmark_group("publish one snapshot");
    for subscribers in [1usize, 1000] {
        let source = Source::open(&location, Some(std::process::id())).unwrap();
        let container = Arc::new(ContainerStats::new("bench", source));
        // Subscribers wait for each snapshot, as GetStats streams do.
        let tasks: Vec<_> = (0..subscribers)
            .map(|_| {
                let mut sub = container.subscribe();
                runtime.spawn(async move { while sub.next().await.is_some() {} })
            })
            .collect();
        let mut sampler = Sampler::new(Backend::Pread, None);
        let name = format!("sample and publish to {subscribers}");
        group.bench_function(&name, |b| {
            b.iter(|| sampler.tick(std::slice::from_ref(&container)))
        });
        results.push((
            subscribers,
            median(201, || {
                sampler.tick(std::slice::from_ref(&container));
            }),
        ));
        for task in tasks {
            task.abort();
        }
    }
    group.finish();
    println!(
        "\ngoal (informational): 1000 subscribers cost at most 1.2 x one (sampler side: one sample, one publish)"
    );
    let one = results[0].1;
    for (subscribers, took) in &results {
        let ratio = took.as_secs_f64() / one.as_secs_f64();
        println!("  {subscribers:>4} subscribers: {took:?} = {ratio:.2} x one");
    }
}

criterion_group!(benches, parsers, tick, fan_out);
criterion_main!(benches);
