use super::*;

const MEMINFO: &[u8] = b"\
MemTotal:       24684544 kB
MemFree:          438328 kB
MemAvailable:   23843112 kB
Buffers:            4392 kB
Cached:         22802712 kB
AnonPages:       1583336 kB
Shmem:              8544 kB
Slab:             980000 kB
SReclaimable:     860896 kB
SUnreclaim:       119104 kB
KernelStack:        2712 kB
PageTables:        12480 kB
Committed_AS:     541904 kB
Percpu:             1328 kB
HugePages_Total:       0
";

#[test]
fn meminfo_gives_every_field_in_kb() {
    let info = parse_meminfo(MEMINFO).unwrap();
    assert_eq!(
        info,
        Meminfo {
            mem_free_kb: 438328,
            mem_available_kb: 23843112,
            anon_pages_kb: 1583336,
            shmem_kb: 8544,
            slab_kb: 980000,
            s_unreclaim_kb: 119104,
            kernel_stack_kb: 2712,
            page_tables_kb: 12480,
            percpu_kb: 1328,
            committed_as_kb: 541904,
        }
    );
}

#[test]
fn meminfo_names_what_it_lacks() {
    let err = parse_meminfo(b"MemFree: 1 kB\nMemAvailable: 2 kB\n").unwrap_err();
    assert!(err.starts_with("no AnonPages, Shmem, Slab"), "{err}");
    assert!(err.ends_with("Committed_AS line"), "{err}");
    let mut torn = MEMINFO.to_vec();
    torn.extend_from_slice(b"Percpu: lots kB\n");
    assert_eq!(parse_meminfo(&torn).unwrap_err(), "Percpu: no number of kB");
}

const SLABINFO: &[u8] = b"\
slabinfo - version: 2.1
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>
inode_cache          285    299    624   13    2 : tunables    0    0    0 : slabdata     23     23      0
dentry            162973 172095    192   21    1 : tunables    0    0    0 : slabdata   8195   8195      0
kmalloc-64          2228   6144     64   64    1 : tunables    0    0    0 : slabdata     96     96      0
";

#[test]
fn slabinfo_counts_each_cache_by_its_slabs_pages() {
    let caches = parse_slabinfo(SLABINFO, 4096).unwrap();
    let found: Vec<(&str, u64, u64)> = caches
        .iter()
        .map(|c| (c.name.as_str(), c.objects, c.bytes))
        .collect();
    assert_eq!(
        found,
        [
            ("inode_cache", 299, 23 * 2 * 4096),
            ("dentry", 172095, 8195 * 4096),
            ("kmalloc-64", 6144, 96 * 4096),
        ]
    );
}

#[test]
fn slabinfo_refuses_what_it_cannot_read() {
    let err = parse_slabinfo(b"slabinfo - version: 1.1\n", 4096).unwrap_err();
    assert!(err.starts_with("unknown slabinfo header"), "{err}");
    let short = b"slabinfo - version: 2.1\ndentry 1 2 192 21 1\n";
    assert_eq!(
        parse_slabinfo(short, 4096).unwrap_err(),
        "dentry: no slabdata columns"
    );
    let torn = b"slabinfo - version: 2.1\ndentry 1 x 192 21 1 : tunables 0 0 0 : slabdata 1 1 0\n";
    assert_eq!(
        parse_slabinfo(torn, 4096).unwrap_err(),
        "dentry: no number in column 3"
    );
}

#[test]
fn proc_cgroups_counts_each_hierarchy_once() {
    let text = b"\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t3\t10\t1
cpu\t1\t12\t1
cpuacct\t1\t12\t1
memory\t4\t20\t1
net_cls\t0\t1\t1
pids\t8\t11\t1
";
    assert_eq!(
        parse_proc_cgroups(text),
        Ok(CgroupCounts {
            v1_hierarchies: 10 + 12 + 20 + 11,
            memory: 20,
        })
    );
    assert!(parse_proc_cgroups(b"memory 4 twenty 1\n").is_err());
    assert!(parse_proc_cgroups(b"memory 4\n").is_err());
}

#[test]
fn loadavg_gives_the_task_count() {
    assert_eq!(
        parse_loadavg_tasks(b"6.91 3.93 2.89 11/169 5526\n"),
        Ok(169)
    );
    assert!(parse_loadavg_tasks(b"6.91 3.93 2.89\n").is_err());
}

fn look(containers: usize, slab_kb: u64, dentry_bytes: u64, rss_kb: u64) -> HostMemory {
    HostMemory {
        containers,
        meminfo: Meminfo {
            mem_available_kb: 1_000_000 - slab_kb,
            slab_kb,
            ..Meminfo::default()
        },
        slabs: vec![
            SlabCache {
                name: "dentry".into(),
                objects: 0,
                bytes: dentry_bytes,
            },
            SlabCache {
                name: "kmalloc-64".into(),
                objects: 0,
                bytes: 4096,
            },
        ],
        cgroups: CgroupCounts {
            v1_hierarchies: 9 * containers as u64,
            memory: containers as u64,
        },
        tasks: 100 + containers as u64,
        inits: containers as u64,
        inits_pss_kb: 100 * containers as u64,
        daemon: Some(ProcSample {
            rss_kb,
            fds: 10 + 2 * containers as u64,
            ..ProcSample::default()
        }),
    }
}

#[test]
fn growth_is_per_container_added_by_kind() {
    let before = look(0, 1000, 1024 * 1024, 8000);
    let after = look(1000, 51_000, 3 * 1024 * 1024, 9000);
    let growth = growth(&before, &after);
    let of = |kind: &str| {
        growth
            .iter()
            .find(|g| g.kind == kind)
            .unwrap_or_else(|| panic!("no {kind} in {growth:?}"))
            .per_container
    };
    assert_eq!(of("MemAvailable drop"), 50.0);
    assert_eq!(of("Slab"), 50.0);
    assert_eq!(of("berthd RSS"), 1.0);
    assert_eq!(of("berthd fds"), 2.0);
    assert_eq!(of("tasks on the host"), 1.0);
    assert_eq!(of("cgroups (all v1 hierarchies)"), 9.0);
    assert_eq!(of("container inits' PSS"), 100.0);
    assert!((of("slab dentry") - 2.048).abs() < 1e-9);
    // A cache that did not grow is not listed.
    assert!(!growth.iter().any(|g| g.kind == "slab kmalloc-64"));
}
