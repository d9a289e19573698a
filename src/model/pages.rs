//! Weights in 2 MiB pages (Linux transparent huge pages).
//!
//! Decoding reads every weight once per loop, gigabytes per token: with 4 KiB pages every 4 KiB
//! of weights costs a TLB miss and a page walk. On this machine (THP in `madvise` mode, the usual
//! default) Q4_K_M 1.4B decoded 5% faster with its weights in huge pages (4 interleaved `run`s
//! each: 6.27 -> 6.59 tok/s). So the weight buffers ask for them: before they are written where
//! this crate allocates them (float weights), and by collapsing them afterwards where candle does
//! (quantized tensors). Best effort: a kernel that declines leaves the 4 KiB pages, which work
//! the same. `OURO_QUANT_HUGEPAGES=0` turns it off.

/// Size of a transparent huge page on x86-64 and (with 4 KiB base pages) arm64.
const HUGE: usize = 2 << 20;

/// Asks for the whole 2 MiB pages inside `len` bytes at `ptr` to be huge pages: `populated =
/// false` before the memory is first written (`MADV_HUGEPAGE`: its page faults then take huge
/// pages), `true` after (`MADV_COLLAPSE`: copied into huge pages now, contents unchanged).
/// Returns whether the kernel accepted.
pub fn advise(ptr: *const u8, len: usize, populated: bool) -> bool {
    #[cfg(target_os = "linux")]
    {
        if std::env::var("OURO_QUANT_HUGEPAGES").is_ok_and(|v| v == "0") {
            return false;
        }
        let start = (ptr as usize).next_multiple_of(HUGE);
        let end = (ptr as usize + len) / HUGE * HUGE;
        if end <= start {
            return false;
        }
        let advice = if populated { libc::MADV_COLLAPSE } else { libc::MADV_HUGEPAGE };
        // Safety: the range lies inside memory this process owns (`ptr .. ptr + len`); neither
        // advice changes its contents.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) == 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (ptr, len, populated);
        false
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// A field of the `/proc/self/smaps` entry of the mapping that holds `p` (`"AnonHugePages:"`:
    /// its value in kB; `"VmFlags:"`: the flags).
    fn smaps_field(p: *const u8, field: &str) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                    inside = (a..b).contains(&(p as usize));
                    continue;
                }
            }
            if inside && line.starts_with(field) {
                return line[field.len()..].trim().to_string();
            }
        }
        String::new()
    }

    /// Where the kernel offers huge pages, a buffer advised before it is written carries the
    /// advice (`hg` in its flags: its page faults take huge pages when memory allows), and one
    /// collapsed after is backed by them and keeps its contents; where it does not, `advise`
    /// says so.
    #[test]
    fn weight_buffers_get_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        let offered = !thp.is_empty() && !thp.contains("[never]") && std::env::var("OURO_QUANT_HUGEPAGES").map_or(true, |v| v != "0");
        let n = 8 * HUGE;
        let mut before = vec![0u8; n];
        let ok = advise(before.as_ptr(), n, false);
        assert_eq!(ok, offered, "MADV_HUGEPAGE with THP {thp:?}");
        before.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        // (the advice covers the whole huge pages inside: the kernel splits the mapping there)
        let inner = |p: *const u8| (p as usize).next_multiple_of(HUGE) as *const u8;
        crate::test_report::note(&if offered {
            "ran: huge-page advice on weight buffers (THP offered)".to_string()
        } else {
            format!("NOT RUN here: huge-page advice on weight buffers (THP {:?}); only the refusal was checked", thp.trim())
        });
        if offered {
            let flags = smaps_field(inner(before.as_ptr()), "VmFlags:");
            assert!(flags.split_whitespace().any(|f| f == "hg"), "flags {flags:?}");
        }
        let mut after = vec![0u8; n];
        after.iter_mut().enumerate().for_each(|(i, b)| *b = (i / 7) as u8);
        let collapsed = advise(after.as_ptr(), n, true);
        crate::test_report::note(if collapsed {
            "ran: MADV_COLLAPSE of weight buffers into huge pages"
        } else {
            "NOT RUN here: MADV_COLLAPSE into huge pages (kernel older than 6.1, THP off, or no free huge pages)"
        });
        if collapsed {
            // MADV_COLLAPSE succeeds only once the range is in huge pages
            let kb: usize = smaps_field(inner(after.as_ptr()), "AnonHugePages:").trim_end_matches("kB").trim().parse().unwrap();
            assert!(kb >= 2048, "collapsed, yet {kb} kB in huge pages");
        }
        assert!(after.iter().enumerate().all(|(i, &b)| b == (i / 7) as u8));
        assert!(before.iter().enumerate().all(|(i, &b)| b == i as u8));
        // a range holding no whole huge page is left alone
        assert!(!advise(after.as_ptr(), HUGE / 2, true));
    }
}
