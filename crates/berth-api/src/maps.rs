//! The two messages of `proto/api.proto` with a map field, written by hand so that every map
//! entry carries both its key and its value, even when one is the default (`"swap": 0`).
//!
//! Proto3 lets an encoder omit them, and prost's derive does; but the protobuf decoders of 2016,
//! which the 2016 Go client of this API (containerd 0.0.4's `ctr`) and the original daemon use,
//! refuse an entry without both ("proto: bad map data: missing key/val"), and so the whole
//! response. Decoding is prost's own. `build.rs` points the generated code here (`extern_path`);
//! `proto::MemoryStats` and `proto::CgroupStats` name these types.
//!
//! Owns: the encoding of these two messages. Does not own: any other message (generated).

use std::collections::HashMap;

use prost::bytes::{Buf, BufMut};
use prost::encoding::{
    DecodeContext, WireType, check_wire_type, encode_key, encode_varint, encoded_len_varint,
    hash_map, key_len, message, skip_field, string, uint64,
};
use prost::{DecodeError, Message};

use crate::proto::{BlkioStats, CpuStats, HugetlbStats, MemoryData};

/// `types.MemoryStats`.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct MemoryStats {
    pub cache: u64,
    pub usage: Option<MemoryData>,
    pub swap_usage: Option<MemoryData>,
    pub kernel_usage: Option<MemoryData>,
    pub stats: HashMap<String, u64>,
}

/// `types.CgroupStats`.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct CgroupStats {
    pub cpu_stats: Option<CpuStats>,
    pub memory_stats: Option<MemoryStats>,
    pub blkio_stats: Option<BlkioStats>,
    /// "size of hugepage: stats of the hugepage"
    pub hugetlb_stats: HashMap<String, HugetlbStats>,
}

/// Writes each entry of a map field as a message with its key (field 1) and value (field 2),
/// both always present.
fn encode_entries<V>(
    tag: u32,
    map: &HashMap<String, V>,
    value_len: impl Fn(&V) -> usize,
    encode_value: impl Fn(&V, &mut dyn BufMut),
    mut buf: &mut impl BufMut,
) {
    for (key, value) in map {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint((string::encoded_len(1, key) + value_len(value)) as u64, buf);
        string::encode(1, key, &mut buf);
        encode_value(value, &mut buf);
    }
}

fn entries_len<V>(tag: u32, map: &HashMap<String, V>, value_len: impl Fn(&V) -> usize) -> usize {
    map.iter()
        .map(|(key, value)| {
            let len = string::encoded_len(1, key) + value_len(value);
            key_len(tag) + encoded_len_varint(len as u64) + len
        })
        .sum()
}

fn stat_len(value: &u64) -> usize {
    uint64::encoded_len(2, value)
}

fn hugetlb_len(value: &HugetlbStats) -> usize {
    message::encoded_len(2, value)
}

impl Message for MemoryStats {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.cache != 0 {
            uint64::encode(1, &self.cache, buf);
        }
        for (tag, data) in [
            (2, &self.usage),
            (3, &self.swap_usage),
            (4, &self.kernel_usage),
        ] {
            if let Some(data) = data {
                message::encode(tag, data, buf);
            }
        }
        encode_entries(
            5,
            &self.stats,
            stat_len,
            |v, mut b| uint64::encode(2, v, &mut b),
            buf,
        );
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => uint64::merge(wire_type, &mut self.cache, buf, ctx),
            2 => message::merge(
                wire_type,
                self.usage.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            3 => message::merge(
                wire_type,
                self.swap_usage.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            4 => message::merge(
                wire_type,
                self.kernel_usage.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            5 => check_wire_type(WireType::LengthDelimited, wire_type).and_then(|()| {
                hash_map::merge(string::merge, uint64::merge, &mut self.stats, buf, ctx)
            }),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        let cache = if self.cache != 0 {
            uint64::encoded_len(1, &self.cache)
        } else {
            0
        };
        let data = [
            (2, &self.usage),
            (3, &self.swap_usage),
            (4, &self.kernel_usage),
        ]
        .into_iter()
        .filter_map(|(tag, data)| data.as_ref().map(|d| message::encoded_len(tag, d)))
        .sum::<usize>();
        cache + data + entries_len(5, &self.stats, stat_len)
    }

    fn clear(&mut self) {
        *self = MemoryStats::default();
    }
}

impl Message for CgroupStats {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if let Some(cpu) = &self.cpu_stats {
            message::encode(1, cpu, buf);
        }
        if let Some(memory) = &self.memory_stats {
            message::encode(2, memory, buf);
        }
        if let Some(blkio) = &self.blkio_stats {
            message::encode(3, blkio, buf);
        }
        encode_entries(
            4,
            &self.hugetlb_stats,
            hugetlb_len,
            |v, mut b| message::encode(2, v, &mut b),
            buf,
        );
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            1 => message::merge(
                wire_type,
                self.cpu_stats.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            2 => message::merge(
                wire_type,
                self.memory_stats.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            3 => message::merge(
                wire_type,
                self.blkio_stats.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            4 => check_wire_type(WireType::LengthDelimited, wire_type).and_then(|()| {
                hash_map::merge(
                    string::merge,
                    message::merge,
                    &mut self.hugetlb_stats,
                    buf,
                    ctx,
                )
            }),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        self.cpu_stats
            .as_ref()
            .map_or(0, |m| message::encoded_len(1, m))
            + self
                .memory_stats
                .as_ref()
                .map_or(0, |m| message::encoded_len(2, m))
            + self
                .blkio_stats
                .as_ref()
                .map_or(0, |m| message::encoded_len(3, m))
            + entries_len(4, &self.hugetlb_stats, hugetlb_len)
    }

    fn clear(&mut self) {
        *self = CgroupStats::default();
    }
}

#[cfg(test)]
mod tests;
