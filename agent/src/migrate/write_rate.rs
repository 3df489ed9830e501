//! How fast a running container dirties its memory: what an `auto` migration measures before it
//! picks its mode.
//!
//! Post-copy moves a container in ~0.3 s whatever its size, but afterwards every first touch of a
//! page that has not arrived yet waits for the network: a program that rewrites its memory fast
//! stalls for longer than pre-copy's freeze would have taken. Pre-copy converges only when the
//! rounds outpace the writes. Both depend on the write rate, and these kernels have no soft-dirty
//! bits to read it from, so it is measured directly: the resident pages of the container's
//! writable private mappings (`/proc/<pid>/maps` + `pagemap`) are read twice through
//! `process_vm_readv` a short window apart, without freezing anything, and the pages whose
//! contents changed are counted. Large processes are sampled (every k-th resident page) and the
//! count scaled, so the measurement costs the same for 64 MiB and 4 GiB.

use std::fs::File;
use std::io::{IoSliceMut, Read, Seek, SeekFrom};
use std::time::{Duration, Instant};

use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

/// Page size of the platforms berth runs on (x86_64, aarch64 with 4 KiB pages).
pub const PAGE: usize = 4096;

/// Pages read per `process_vm_readv` call (the kernel's `UIO_MAXIOV` is 1024).
const BATCH: usize = 256;

/// Errors of a measurement.
#[derive(Debug, thiserror::Error)]
pub enum WriteRateError {
    /// A `/proc` file of a process could not be read.
    #[error("read /proc/{pid}/{file}: {source}")]
    Proc {
        /// The process.
        pid: i32,
        /// The file below `/proc/<pid>`.
        file: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// None of the processes could be read at all.
    #[error("none of the container's processes could be measured")]
    NothingReadable,
}

/// What one measurement found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteRate {
    /// Estimated distinct bytes dirtied per second (scaled up from the sample).
    pub bytes_per_sec: f64,
    /// Resident pages of the writable private mappings, all processes.
    pub resident_pages: u64,
    /// Pages read in each pass.
    pub sampled_pages: u64,
    /// Sampled pages whose contents differed between the passes.
    pub changed_pages: u64,
    /// Time between a page's two reads (average over the passes).
    pub window: Duration,
    /// How long the whole measurement took.
    pub took: Duration,
}

impl WriteRate {
    /// The rate in MiB/s.
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes_per_sec / (1024.0 * 1024.0)
    }
}

/// How an `auto` migration chooses: measure for `window`, then post-copy unless the container
/// both writes fast (at or above `postcopy_below_mib_s`) and is small (resident at most
/// `precopy_max_resident_mib`), where pre-copy wins.
///
/// Why, from `cargo xtask bench migrate` on the 2-core VM (README "Live migration"): post-copy
/// answered clients again 0.22–0.36 s after the freeze at every size and rate, and its program
/// paused no longer than that up to 10 MiB/s; under 100 MiB/s of writes the program's first
/// touches of pages not pulled yet stretched its pause to 0.5 s (64 MiB), 1.1 s (256 MiB) and
/// 1.5 s (1 GiB). Without soft-dirty tracking pre-copy's freeze handles all memory three times
/// (final dump, images, restore), so it grows with the size: 0.37 s, 0.79 s and 4.3 s there.
/// Pre-copy is the shorter pause only for small, write-heavy containers (up to ~300 MiB here).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoPolicy {
    /// The write rate (MiB/s) from which pre-copy may be chosen.
    pub postcopy_below_mib_s: f64,
    /// The largest resident size (MiB) pre-copy is chosen for.
    pub precopy_max_resident_mib: u64,
    /// Time between the two reads of each page.
    pub window: Duration,
    /// Pages read per pass at most (the estimate scales up from them).
    pub max_sample_pages: usize,
}

impl Default for AutoPolicy {
    fn default() -> Self {
        Self {
            postcopy_below_mib_s: 32.0,
            precopy_max_resident_mib: 320,
            window: Duration::from_millis(200),
            // 64 MiB: two passes cost ~0.1 s of one core whatever the container's size.
            max_sample_pages: 16 * 1024,
        }
    }
}

impl AutoPolicy {
    /// Whether a container measured as `rate` should move by post-copy.
    pub fn prefers_postcopy(&self, rate: &WriteRate) -> bool {
        let resident_mib = rate.resident_pages.saturating_mul(PAGE as u64) >> 20;
        rate.mib_per_sec() < self.postcopy_below_mib_s
            || resident_mib > self.precopy_max_resident_mib
    }
}

/// One page to read: in which process, where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target {
    pid: i32,
    addr: u64,
}

/// Measures the write rate of `pids` (the container's processes): reads at most
/// `max_sample_pages` of their resident pages, waits `window`, reads them again.
///
/// Processes that vanish meanwhile are skipped; fails only when no process could be read.
pub fn measure(
    pids: &[i32],
    window: Duration,
    max_sample_pages: usize,
) -> Result<WriteRate, WriteRateError> {
    let started = Instant::now();
    let mut resident = Vec::new();
    let mut readable = 0usize;
    let mut last_error = None;
    for &pid in pids {
        match resident_pages(pid) {
            Ok(pages) => {
                readable += 1;
                resident.extend(pages.into_iter().map(|addr| Target { pid, addr }));
            }
            Err(e) => last_error = Some(e),
        }
    }
    if readable == 0 {
        return Err(last_error.unwrap_or(WriteRateError::NothingReadable));
    }
    let sample = sample(&resident, max_sample_pages.max(1));
    let first_start = Instant::now();
    let first = hash_pages(&sample);
    let first_end = Instant::now();
    std::thread::sleep(window);
    let second_start = Instant::now();
    let second = hash_pages(&sample);
    let second_end = Instant::now();
    let elapsed = ((second_start - first_start) + (second_end - first_end)) / 2;
    let changed = changed_pages(&first, &second);
    let sampled = sample.len() as u64;
    Ok(WriteRate {
        bytes_per_sec: estimate(changed, sampled, resident.len() as u64, elapsed),
        resident_pages: resident.len() as u64,
        sampled_pages: sampled,
        changed_pages: changed,
        window: elapsed,
        took: started.elapsed(),
    })
}

/// Scales the sample's changed pages to the resident set, per second.
fn estimate(changed: u64, sampled: u64, resident: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if sampled == 0 || secs <= 0.0 {
        return 0.0;
    }
    let scale = resident as f64 / sampled as f64;
    changed as f64 * scale * PAGE as f64 / secs
}

/// Pages that differ between the two passes; a page unreadable in either pass counts as
/// changed only if it was readable in one (unmapped or mapped meanwhile).
fn changed_pages(first: &[Option<u64>], second: &[Option<u64>]) -> u64 {
    first
        .iter()
        .zip(second)
        .filter(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => a != b,
            (None, None) => false,
            _ => true,
        })
        .count() as u64
}

/// Every k-th page, k chosen so at most `max` remain; spread over all mappings so a hot region
/// anywhere is seen in proportion.
fn sample(pages: &[Target], max: usize) -> Vec<Target> {
    if pages.len() <= max {
        return pages.to_vec();
    }
    let step = pages.len().div_ceil(max);
    pages.iter().step_by(step).copied().collect()
}

/// The resident pages of `pid`'s writable private mappings.
fn resident_pages(pid: i32) -> Result<Vec<u64>, WriteRateError> {
    let proc_err = |file| move |source| WriteRateError::Proc { pid, file, source };
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(proc_err("maps"))?;
    let mut pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(proc_err("pagemap"))?;
    let mut pages = Vec::new();
    let mut entries = Vec::new();
    for (start, end) in writable_private_ranges(&maps) {
        let count = ((end - start) / PAGE as u64) as usize;
        entries.resize(count * 8, 0);
        pagemap
            .seek(SeekFrom::Start(start / PAGE as u64 * 8))
            .and_then(|_| pagemap.read_exact(&mut entries))
            .map_err(proc_err("pagemap"))?;
        pages.extend(present_pages(start, &entries));
    }
    Ok(pages)
}

/// `(start, end)` of each mapping in a `/proc/<pid>/maps` text that is writable and private
/// and not one of the kernel's special areas (which cannot be read this way, and never move).
fn writable_private_ranges(maps: &str) -> Vec<(u64, u64)> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let name = fields.nth(3).unwrap_or("");
            let perms = perms.as_bytes();
            if perms.len() < 4 || perms[1] != b'w' || perms[3] != b'p' {
                return None;
            }
            if matches!(name, "[vvar]" | "[vsyscall]" | "[vdso]" | "[vvar_vclock]") {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = u64::from_str_radix(start, 16).ok()?;
            let end = u64::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end))
        })
        .collect()
}

/// Addresses of the pages a pagemap slice (8 bytes per page from `start`) marks present.
fn present_pages(start: u64, entries: &[u8]) -> impl Iterator<Item = u64> + '_ {
    const PRESENT: u64 = 1 << 63;
    entries
        .chunks_exact(8)
        .enumerate()
        .filter_map(move |(i, entry)| {
            let bytes: [u8; 8] = entry.try_into().ok()?;
            (u64::from_ne_bytes(bytes) & PRESENT != 0).then_some(start + (i * PAGE) as u64)
        })
}

/// A hash of each page (`None` where it could not be read), in `pages`' order.
fn hash_pages(pages: &[Target]) -> Vec<Option<u64>> {
    let mut out = Vec::with_capacity(pages.len());
    let mut buf = vec![0u8; BATCH * PAGE];
    let mut i = 0;
    while i < pages.len() {
        // A batch is one process's pages, so one syscall reads it.
        let pid = pages[i].pid;
        let end = pages[i..]
            .iter()
            .take(BATCH)
            .position(|t| t.pid != pid)
            .map_or((i + BATCH).min(pages.len()), |n| i + n);
        let batch = &pages[i..end];
        let remote: Vec<RemoteIoVec> = batch
            .iter()
            .map(|t| RemoteIoVec {
                base: t.addr as usize,
                len: PAGE,
            })
            .collect();
        let local = &mut buf[..batch.len() * PAGE];
        let read = process_vm_readv(Pid::from_raw(pid), &mut [IoSliceMut::new(local)], &remote)
            .unwrap_or(0);
        // The kernel stops at the first page it cannot read; the rest is retried one by one.
        let whole = read / PAGE;
        for page in local[..whole * PAGE].chunks_exact(PAGE) {
            out.push(Some(hash(page)));
        }
        for t in &batch[whole..] {
            out.push(read_one(t).map(|page| hash(&page)));
        }
        i = end;
    }
    out
}

fn read_one(t: &Target) -> Option<Vec<u8>> {
    let mut page = vec![0u8; PAGE];
    let remote = [RemoteIoVec {
        base: t.addr as usize,
        len: PAGE,
    }];
    match process_vm_readv(
        Pid::from_raw(t.pid),
        &mut [IoSliceMut::new(&mut page)],
        &remote,
    ) {
        Ok(n) if n == PAGE => Some(page),
        _ => None,
    }
}

/// A fast 64-bit hash of a page: only equality between two reads of the same page matters (a
/// miss makes the estimate a page low), so no cryptographic strength is needed.
fn hash(page: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for word in page.chunks_exact(8) {
        let w = u64::from_ne_bytes(word.try_into().unwrap_or([0; 8]));
        h = (h ^ w).wrapping_mul(K).rotate_left(29);
    }
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_writable_private_ordinary_mappings_count() {
        let maps = "\
00400000-00452000 r-xp 00000000 08:02 173521 /usr/bin/prog
00651000-00652000 rw-p 00051000 08:02 173521 /usr/bin/prog
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000200000 rw-s 00000000 00:05 1234 /dev/shm/x
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0 [vvar]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]
garbage line
";
        assert_eq!(
            writable_private_ranges(maps),
            vec![
                (0x651000, 0x652000),
                (0x7f00_0000_0000, 0x7f00_0010_0000),
                (0x7ffd_0000_0000, 0x7ffd_0002_1000)
            ]
        );
    }

    #[test]
    fn pagemap_present_bit_selects_pages() {
        let mut entries = Vec::new();
        for present in [true, false, true] {
            let v: u64 = if present { 1 << 63 | 42 } else { 1 << 62 };
            entries.extend_from_slice(&v.to_ne_bytes());
        }
        let got: Vec<u64> = present_pages(0x1000, &entries).collect();
        assert_eq!(got, vec![0x1000, 0x3000]);
    }

    #[test]
    fn samples_spread_and_bounded() {
        let pages: Vec<Target> = (0..1000)
            .map(|i| Target {
                pid: 1,
                addr: i * PAGE as u64,
            })
            .collect();
        assert_eq!(sample(&pages, 2000).len(), 1000);
        let s = sample(&pages, 100);
        assert_eq!(s.len(), 100);
        assert_eq!(s[1].addr, 10 * PAGE as u64);
        assert!(sample(&pages, 300).len() <= 300);
    }

    #[test]
    fn changes_count_and_scale() {
        let a = [Some(1), Some(2), None, Some(4), None];
        let b = [Some(1), Some(3), Some(5), None, None];
        assert_eq!(changed_pages(&a, &b), 3);
        // 10 of 100 sampled changed, 1000 resident, in half a second: 100 pages × 2 per second.
        let rate = estimate(10, 100, 1000, Duration::from_millis(500));
        assert_eq!(rate, (100 * PAGE * 2) as f64);
        assert_eq!(estimate(0, 0, 10, Duration::from_secs(1)), 0.0);
    }

    #[test]
    fn policy_picks_postcopy_below_its_rate() {
        let policy = AutoPolicy::default();
        let at = |mib: f64, resident_mib: u64| WriteRate {
            bytes_per_sec: mib * 1024.0 * 1024.0,
            resident_pages: resident_mib * 256,
            sampled_pages: 1,
            changed_pages: 0,
            window: Duration::from_millis(200),
            took: Duration::ZERO,
        };
        assert!(policy.prefers_postcopy(&at(0.0, 64)));
        assert!(policy.prefers_postcopy(&at(10.0, 64)));
        assert!(!policy.prefers_postcopy(&at(32.0, 64)));
        assert!(!policy.prefers_postcopy(&at(100.0, 256)));
        assert!(!policy.prefers_postcopy(&at(100.0, 320)));
        // Large: pre-copy's freeze grows with the size, post-copy's pause with the writes.
        assert!(policy.prefers_postcopy(&at(100.0, 321)));
        assert!(policy.prefers_postcopy(&at(100.0, 1024)));
    }

    #[test]
    fn page_hash_sees_any_word_change() {
        let mut page = vec![0u8; PAGE];
        let h0 = hash(&page);
        page[PAGE - 1] = 1;
        assert_ne!(hash(&page), h0);
        page[PAGE - 1] = 0;
        assert_eq!(hash(&page), h0);
    }

    /// A real child process that rewrites part of its memory while we measure: the rate is seen,
    /// and a quiet one measures (close to) zero.
    #[test]
    fn measures_a_writing_process_and_a_quiet_one() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        // Measuring ourselves: a thread writes 64 pages every millisecond into a 32 MiB buffer
        // (~250 MiB/s of distinct pages until it wraps), another buffer stays still.
        let size = 32 << 20;
        let mut busy = vec![1u8; size];
        let quiet = vec![2u8; size];
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            let ptr = busy.as_mut_ptr() as usize;
            std::thread::spawn(move || {
                let mut n: usize = 0;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        let off = (n % (size / PAGE)) * PAGE;
                        // SAFETY: `busy` outlives this thread (joined below) and only this
                        // thread writes it; the measurement reads it through the kernel.
                        unsafe { *((ptr + off) as *mut u8) = (n >> 8) as u8 ^ 0x5a };
                        n += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let me = std::process::id() as i32;
        let rate = measure(&[me], Duration::from_millis(200), 1 << 20).unwrap();
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        assert!(rate.resident_pages >= (2 * size / PAGE) as u64, "{rate:?}");
        // The writer dirties at least a few MiB in 200 ms even on a loaded machine.
        assert!(rate.mib_per_sec() > 5.0, "{rate:?}");
        std::hint::black_box(&quiet);

        // A process that only sleeps.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // Past its loader's relocations.
        std::thread::sleep(Duration::from_millis(200));
        let quiet_rate = measure(&[child.id() as i32], Duration::from_millis(100), 1 << 20);
        let _ = child.kill();
        let _ = child.wait();
        let quiet_rate = quiet_rate.unwrap();
        assert!(quiet_rate.resident_pages > 0, "{quiet_rate:?}");
        assert_eq!(quiet_rate.changed_pages, 0, "{quiet_rate:?}");
        // Gone processes are skipped, none at all is an error.
        assert!(measure(&[i32::MAX], Duration::ZERO, 10).is_err());
    }
}
