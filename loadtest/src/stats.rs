//! Server-side costs read from /proc (RSS, CPU time) and latency histograms.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Resident set size of `pid` in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad VmRSS line {line}"))?
        .parse()?;
    Ok(kb * 1024)
}

/// Sum of the RSS of several processes.
pub fn rss_total(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|p| rss_bytes(*p)).sum()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when that is unavailable).
pub fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// User + system CPU seconds consumed so far by `pid` (all threads).
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after its closing parenthesis start at
    // field 3 (state), so utime (14) and stime (15) are at 11 and 12.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).unwrap_or(&"0").parse::<u64>()? + f.get(12).unwrap_or(&"0").parse::<u64>()?;
    Ok(ticks as f64 / clk_tck() as f64)
}

/// Sum of the CPU seconds of several processes.
pub fn cpu_total(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|p| cpu_secs(*p)).sum()
}

/// Microseconds since the Unix epoch (the timestamp that travels in payloads).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A latency histogram in microseconds, 1 µs to 60 s, 3 significant digits.
pub fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000, 3)?)
}

/// p50, p99, p99.9, max (and count, mean) in milliseconds.
pub fn summarize(h: &Histogram<u64>) -> Value {
    let ms = |v: u64| v as f64 / 1000.0;
    json!({
        "count": h.len(),
        "mean_ms": h.mean() / 1000.0,
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

/// Reads `"t":<digits>` out of a message without a full JSON parse.
pub fn extract_ts(text: &str) -> Option<u64> {
    let i = text.find("\"t\":")? + 4;
    let digits: &str = &text[i..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).unwrap() > 0);
        assert!(cpu_secs(me).unwrap() >= 0.0);
    }

    #[test]
    fn extracts_timestamps() {
        let m = r#"{"type":"message","channel":"b","data":{"t":123456,"s":1}}"#;
        assert_eq!(extract_ts(m), Some(123456));
        assert_eq!(extract_ts("{}"), None);
    }
}
