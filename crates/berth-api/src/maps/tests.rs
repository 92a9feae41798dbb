use prost::encoding::{WireType, decode_key, decode_varint};

use super::*;
use crate::proto::Stats;

/// The fields of an encoded message: (tag, payload) for length-delimited ones, (tag, empty)
/// for varints.
fn fields(mut buf: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (tag, wire_type) = decode_key(&mut buf).unwrap();
        match wire_type {
            WireType::Varint => {
                decode_varint(&mut buf).unwrap();
                out.push((tag, Vec::new()));
            }
            WireType::LengthDelimited => {
                let len = decode_varint(&mut buf).unwrap() as usize;
                out.push((tag, buf[..len].to_vec()));
                buf = &buf[len..];
            }
            other => panic!("unexpected wire type {other:?}"),
        }
    }
    out
}

fn field(buf: &[u8], tag: u32) -> Vec<u8> {
    fields(buf).into_iter().find(|(t, _)| *t == tag).unwrap().1
}

fn tags(buf: &[u8]) -> Vec<u32> {
    fields(buf).into_iter().map(|(t, _)| t).collect()
}

#[test]
fn every_map_entry_of_a_stats_response_has_its_key_and_value() {
    let memory = MemoryStats {
        cache: 0,
        usage: Some(MemoryData::default()),
        stats: HashMap::from([
            ("swap".into(), 0),
            ("cache".into(), 4096),
            (String::new(), 7),
        ]),
        ..MemoryStats::default()
    };
    let cgroup = CgroupStats {
        memory_stats: Some(memory),
        hugetlb_stats: HashMap::from([
            ("2MB".into(), HugetlbStats::default()),
            (
                "1GB".into(),
                HugetlbStats {
                    usage: 1,
                    ..HugetlbStats::default()
                },
            ),
        ]),
        ..CgroupStats::default()
    };
    let response = Stats {
        cgroup_stats: Some(cgroup.clone()),
        ..Stats::default()
    };
    let wire = response.encode_to_vec();

    let cgroup_wire = field(&wire, 2);
    let memory_wire = field(&cgroup_wire, 2);
    let entries: Vec<_> = fields(&memory_wire)
        .into_iter()
        .filter(|(t, _)| *t == 5)
        .collect();
    assert_eq!(entries.len(), 3);
    for (_, entry) in &entries {
        assert_eq!(tags(entry), [1, 2], "{entry:?}");
    }
    let hugetlb: Vec<_> = fields(&cgroup_wire)
        .into_iter()
        .filter(|(t, _)| *t == 4)
        .collect();
    assert_eq!(hugetlb.len(), 2);
    for (_, entry) in &hugetlb {
        assert_eq!(tags(entry), [1, 2], "{entry:?}");
    }
    // prost decodes it back to the same values, and lengths agree with what was written.
    assert_eq!(Stats::decode(&wire[..]).unwrap(), response);
    assert_eq!(response.encoded_len(), wire.len());
    assert_eq!(cgroup.encoded_len(), cgroup_wire.len());
}

#[test]
fn unknown_fields_are_skipped_and_wrong_wire_types_refused() {
    let mut wire = MemoryStats {
        cache: 3,
        ..MemoryStats::default()
    }
    .encode_to_vec();
    wire.extend_from_slice(&[0x30, 0x01]); // field 6, varint
    assert_eq!(MemoryStats::decode(&wire[..]).unwrap().cache, 3);
    assert!(MemoryStats::decode(&[0x28, 0x01][..]).is_err()); // field 5 as a varint
}
