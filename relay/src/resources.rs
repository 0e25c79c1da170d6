//! What the relay may use of the machine: the container's memory limit, and the budgets sized from it when
//! the config names none.
//!
//! A relay that holds more than its pod's limit is killed by the kernel with every session in flight, is
//! restarted, and meets the same burst again. The budgets keep it under the limit instead: what does not
//! fit waits (a deferred delivery connection) or is refused for now (452 4.3.1, the client retries).

use herald_config::Config;

/// cgroup v2 and v1 files holding the memory limit of the container the process runs in.
const CGROUP_V2: &str = "/sys/fs/cgroup/memory.max";
const CGROUP_V1: &str = "/sys/fs/cgroup/memory/memory.limit_in_bytes";

/// The bodies budget when there is no container limit to size it from.
const DEFAULT_INBOUND: u64 = 256 * 1024 * 1024;

/// The container's memory limit in bytes, if it has one.
pub async fn memory_limit() -> Option<u64> {
    for path in [CGROUP_V2, CGROUP_V1] {
        if let Ok(text) = tokio::fs::read_to_string(path).await {
            return parse_limit(&text);
        }
    }
    None
}

/// The content of a cgroup memory limit file: a number of bytes, or `max` (v2) or a value near `i64::MAX`
/// (v1's way to say unlimited) for none.
pub fn parse_limit(text: &str) -> Option<u64> {
    let n: u64 = text.trim().parse().ok()?;
    // v1 reports "no limit" as the largest page-aligned i64; no real container has an exabyte.
    (n < 1 << 60).then_some(n)
}

/// Bytes of message bodies all sessions may hold: `limits.max_inbound_bytes`, else a quarter of the
/// container's limit (the rest is for the queue index, TLS sessions, deliveries and the allocator's slack),
/// else 256 MiB. Never less than one message of the largest allowed size.
pub fn inbound_bytes(config: &Config, limit: Option<u64>) -> u64 {
    let floor = config.limits.max_message_size as u64;
    config
        .limits
        .max_inbound_bytes
        .unwrap_or_else(|| limit.map_or(DEFAULT_INBOUND, |l| l / 4).max(floor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_files_are_read_as_the_kernel_writes_them() {
        assert_eq!(parse_limit("536870912\n"), Some(512 << 20));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit(""), None);
    }

    #[test]
    fn the_inbound_budget_follows_the_limit_unless_configured() {
        let mut c = Config::embedded_default();
        assert_eq!(inbound_bytes(&c, None), 256 << 20);
        assert_eq!(inbound_bytes(&c, Some(1 << 30)), 256 << 20);
        assert_eq!(inbound_bytes(&c, Some(512 << 20)), 128 << 20);
        // A tiny limit still lets one largest message in.
        assert_eq!(
            inbound_bytes(&c, Some(64 << 20)),
            c.limits.max_message_size as u64
        );
        c.limits.max_inbound_bytes = Some(100 << 20);
        assert_eq!(inbound_bytes(&c, Some(1 << 30)), 100 << 20);
    }
}
