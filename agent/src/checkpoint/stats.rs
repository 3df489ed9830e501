//! CRIU's `stats-dump` / `stats-restore` images: what CRIU measured itself (frozen time, pages).
//!
//! Layout (CRIU `images/stats.proto`, `criu/include/magic.h`): the service magic
//! `0x55105940`, the stats magic `0x57093306`, then one entry: a little-endian u32 length and
//! that many bytes of a `stats_entry` protobuf.

use std::time::Duration;

use prost::Message;

const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
const STATS_MAGIC: u32 = 0x5709_3306;

/// Upper bound on an entry: the real ones are well under 100 bytes.
const MAX_ENTRY: usize = 64 * 1024;

/// `dump_stats_entry` (times in microseconds).
#[derive(Clone, PartialEq, prost::Message)]
struct DumpStatsEntry {
    #[prost(uint32, required, tag = "1")]
    freezing_time: u32,
    #[prost(uint32, required, tag = "2")]
    frozen_time: u32,
    #[prost(uint32, required, tag = "3")]
    memdump_time: u32,
    #[prost(uint32, required, tag = "4")]
    memwrite_time: u32,
    #[prost(uint64, required, tag = "5")]
    pages_scanned: u64,
    #[prost(uint64, required, tag = "6")]
    pages_skipped_parent: u64,
    #[prost(uint64, required, tag = "7")]
    pages_written: u64,
    #[prost(uint64, required, tag = "9")]
    pages_lazy: u64,
}

/// `restore_stats_entry` (times in microseconds).
#[derive(Clone, PartialEq, prost::Message)]
struct RestoreStatsEntry {
    #[prost(uint64, required, tag = "1")]
    pages_compared: u64,
    #[prost(uint64, required, tag = "2")]
    pages_skipped_cow: u64,
    #[prost(uint32, required, tag = "3")]
    forking_time: u32,
    #[prost(uint32, required, tag = "4")]
    restore_time: u32,
    #[prost(uint64, optional, tag = "5")]
    pages_restored: Option<u64>,
}

/// `stats_entry`.
#[derive(Clone, PartialEq, prost::Message)]
struct StatsEntry {
    #[prost(message, optional, tag = "1")]
    dump: Option<DumpStatsEntry>,
    #[prost(message, optional, tag = "2")]
    restore: Option<RestoreStatsEntry>,
}

/// What CRIU measured during a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DumpStats {
    /// Time to freeze the tasks.
    pub freezing: Duration,
    /// Time the tasks were frozen (the application's pause).
    pub frozen: Duration,
    /// Time spent draining memory from the tasks.
    pub memdump: Duration,
    /// Time spent writing memory to the images.
    pub memwrite: Duration,
    /// Pages CRIU looked at.
    pub pages_scanned: u64,
    /// Pages skipped because the parent images hold them unchanged (memory tracking only).
    pub pages_skipped_parent: u64,
    /// Pages written to these images.
    pub pages_written: u64,
    /// Pages left for lazy (post-copy) transfer.
    pub pages_lazy: u64,
}

/// What CRIU measured during a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestoreStats {
    /// Time to fork the process tree.
    pub forking: Duration,
    /// Time of the whole restore as CRIU counts it.
    pub restore: Duration,
    /// Pages restored (when CRIU reports it).
    pub pages_restored: Option<u64>,
}

/// Why a stats image could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatsError {
    /// Shorter than its header or entry says.
    #[error("truncated stats image ({0} bytes)")]
    Truncated(usize),
    /// Not a CRIU stats image.
    #[error("bad magic {0:#010x}/{1:#010x}")]
    BadMagic(u32, u32),
    /// The entry length is implausible.
    #[error("stats entry of {0} bytes")]
    TooBig(usize),
    /// The protobuf entry does not decode.
    #[error("stats entry: {0}")]
    Decode(String),
    /// A dump stats file without a dump entry (or restore without restore).
    #[error("stats image has no {0} entry")]
    Missing(&'static str),
}

fn entry(bytes: &[u8]) -> Result<StatsEntry, StatsError> {
    let word = |at: usize| -> Result<u32, StatsError> {
        bytes
            .get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .ok_or(StatsError::Truncated(bytes.len()))
    };
    let (m1, m2) = (word(0)?, word(4)?);
    if m1 != IMG_SERVICE_MAGIC || m2 != STATS_MAGIC {
        return Err(StatsError::BadMagic(m1, m2));
    }
    let len = word(8)? as usize;
    if len > MAX_ENTRY {
        return Err(StatsError::TooBig(len));
    }
    let body = bytes
        .get(12..12 + len)
        .ok_or(StatsError::Truncated(bytes.len()))?;
    StatsEntry::decode(body).map_err(|e| StatsError::Decode(e.to_string()))
}

fn us(v: u32) -> Duration {
    Duration::from_micros(u64::from(v))
}

/// Parses the contents of a `stats-dump` image.
pub fn parse_dump_stats(bytes: &[u8]) -> Result<DumpStats, StatsError> {
    let d = entry(bytes)?.dump.ok_or(StatsError::Missing("dump"))?;
    Ok(DumpStats {
        freezing: us(d.freezing_time),
        frozen: us(d.frozen_time),
        memdump: us(d.memdump_time),
        memwrite: us(d.memwrite_time),
        pages_scanned: d.pages_scanned,
        pages_skipped_parent: d.pages_skipped_parent,
        pages_written: d.pages_written,
        pages_lazy: d.pages_lazy,
    })
}

/// Parses the contents of a `stats-restore` image.
pub fn parse_restore_stats(bytes: &[u8]) -> Result<RestoreStats, StatsError> {
    let r = entry(bytes)?
        .restore
        .ok_or(StatsError::Missing("restore"))?;
    Ok(RestoreStats {
        forking: us(r.forking_time),
        restore: us(r.restore_time),
        pages_restored: r.pages_restored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entry: &StatsEntry) -> Vec<u8> {
        let body = entry.encode_to_vec();
        let mut out = Vec::new();
        out.extend_from_slice(&IMG_SERVICE_MAGIC.to_le_bytes());
        out.extend_from_slice(&STATS_MAGIC.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn dump_entry() -> StatsEntry {
        StatsEntry {
            dump: Some(DumpStatsEntry {
                freezing_time: 1500,
                frozen_time: 250_000,
                memdump_time: 100,
                memwrite_time: 200,
                pages_scanned: 1000,
                pages_skipped_parent: 10,
                pages_written: 990,
                pages_lazy: 0,
            }),
            restore: None,
        }
    }

    #[test]
    fn dump_stats_parse() {
        let s = parse_dump_stats(&image(&dump_entry())).unwrap();
        assert_eq!(s.frozen, Duration::from_millis(250));
        assert_eq!(s.freezing, Duration::from_micros(1500));
        assert_eq!(s.pages_written, 990);
        assert_eq!(s.pages_skipped_parent, 10);
    }

    #[test]
    fn restore_stats_parse() {
        let e = StatsEntry {
            dump: None,
            restore: Some(RestoreStatsEntry {
                pages_compared: 0,
                pages_skipped_cow: 0,
                forking_time: 300,
                restore_time: 90_000,
                pages_restored: Some(77),
            }),
        };
        let s = parse_restore_stats(&image(&e)).unwrap();
        assert_eq!(s.restore, Duration::from_millis(90));
        assert_eq!(s.pages_restored, Some(77));
        assert_eq!(
            parse_dump_stats(&image(&e)),
            Err(StatsError::Missing("dump"))
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        let good = image(&dump_entry());
        for cut in 0..good.len() {
            assert!(parse_dump_stats(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert!(matches!(
            parse_dump_stats(&bad),
            Err(StatsError::BadMagic(..))
        ));
        let mut huge = good;
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_dump_stats(&huge),
            Err(StatsError::TooBig(_))
        ));
    }
}
