//! What the relay may use of the machine: the container's memory limit and the budgets sized from it when
//! the config names none.
//!
//! A relay that holds more than its pod's limit is killed by the kernel with every session in flight, is
//! restarted, and meets the same burst again. The budgets keep it under the limit instead: what does not
//! fit waits (a delivery connection) or is refused for now (452 4.3.1, the client retries).
//!
//! The limit is read from the cgroup the relay runs in (v2, then v1); the budgets are pure functions of the
//! config and that limit, so they are tested without a container.

use herald_config::Config;

/// cgroup v2: the memory limit of the relay's own cgroup (the container's, with a cgroup namespace).
const CGROUP_V2_MAX: &str = "/sys/fs/cgroup/memory.max";
/// cgroup v1: the memory controller's limit.
const CGROUP_V1_LIMIT: &str = "/sys/fs/cgroup/memory/memory.limit_in_bytes";
/// cgroup v1 says "no limit" with the largest page-aligned counter (9223372036854771712 on 4 KiB pages);
/// anything from here up is no limit a machine has.
const V1_UNLIMITED: u64 = 1 << 62;

/// Memory per delivery connection when sizing their number from the memory limit: a connection holds one
/// piece of its message, a stuffed copy of it and its TLS state, far less; the rest is headroom.
const BYTES_PER_DELIVERY: u64 = 2 * 1024 * 1024;
/// Bounds of the default number of delivery connections.
const MIN_DELIVERIES: u64 = 16;
const MAX_DELIVERIES: u64 = 1000;
/// The default number of delivery connections when no memory limit is known.
const DELIVERIES_WITHOUT_LIMIT: usize = 200;
/// The bodies budget when there is no container limit to size it from.
const DEFAULT_INBOUND: u64 = 256 * 1024 * 1024;

/// The container's memory limit in bytes, or None when there is none (or none could be read). Reads
/// files: call it off the async runtime.
pub fn memory_limit() -> Option<u64> {
    let v2 = std::fs::read_to_string(CGROUP_V2_MAX).ok();
    let v1 = match v2 {
        Some(_) => None,
        None => std::fs::read_to_string(CGROUP_V1_LIMIT).ok(),
    };
    limit_from(v2.as_deref(), v1.as_deref())
}

/// The memory limit that the cgroup files' texts give: v2's `memory.max` when there is one (a number, or
/// `max` for none), else v1's `memory.limit_in_bytes` (a number, huge for none).
fn limit_from(v2: Option<&str>, v1: Option<&str>) -> Option<u64> {
    if let Some(text) = v2 {
        // "max" and anything unreadable alike: no limit we can size by.
        return text.trim().parse::<u64>().ok().filter(|&n| n > 0);
    }
    v1?.trim()
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0 && n < V1_UNLIMITED)
}

/// Delivery connections open at once, all destinations together: `delivery.max_connections`, or one per
/// 2 MiB of `limit` (16 to 1000), or 200 when no limit is known.
pub fn delivery_connections(config: &Config, limit: Option<u64>) -> usize {
    if let Some(n) = config.delivery.max_connections {
        return n as usize;
    }
    match limit {
        Some(bytes) => (bytes / BYTES_PER_DELIVERY).clamp(MIN_DELIVERIES, MAX_DELIVERIES) as usize,
        None => DELIVERIES_WITHOUT_LIMIT,
    }
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

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn cgroup_v2_gives_a_number_or_max() {
        assert_eq!(limit_from(Some("536870912\n"), None), Some(512 * MIB));
        assert_eq!(limit_from(Some("max\n"), None), None);
        // v2 present: v1 (which a hybrid host may also mount) is not looked at.
        assert_eq!(limit_from(Some("max\n"), Some("1073741824\n")), None);
        assert_eq!(limit_from(Some("garbage"), None), None);
    }

    #[test]
    fn cgroup_v1_gives_a_number_or_a_huge_value_for_none() {
        assert_eq!(limit_from(None, Some("1073741824\n")), Some(1024 * MIB));
        assert_eq!(limit_from(None, Some("9223372036854771712\n")), None);
        assert_eq!(limit_from(None, Some("")), None);
        assert_eq!(limit_from(None, None), None);
    }

    #[test]
    fn delivery_connections_follow_the_config_then_the_limit() {
        let mut c = Config::parse(
            "hostname: relay.test\nspool_dir: s\nlisteners: [{ name: a, address: \"127.0.0.1:1\" }]\n",
        )
        .unwrap();
        assert_eq!(delivery_connections(&c, None), 200);
        assert_eq!(delivery_connections(&c, Some(512 * MIB)), 256);
        assert_eq!(delivery_connections(&c, Some(8 * MIB)), 16);
        assert_eq!(delivery_connections(&c, Some(64 * 1024 * MIB)), 1000);
        c.delivery.max_connections = Some(3);
        assert_eq!(delivery_connections(&c, Some(512 * MIB)), 3);
    }

    #[test]
    fn the_inbound_budget_follows_the_limit_unless_configured() {
        let mut c = Config::embedded_default();
        assert_eq!(inbound_bytes(&c, None), 256 * MIB);
        assert_eq!(inbound_bytes(&c, Some(1024 * MIB)), 256 * MIB);
        assert_eq!(inbound_bytes(&c, Some(512 * MIB)), 128 * MIB);
        // A tiny limit still lets one largest message in.
        assert_eq!(
            inbound_bytes(&c, Some(64 * MIB)),
            c.limits.max_message_size as u64
        );
        c.limits.max_inbound_bytes = Some(100 * MIB);
        assert_eq!(inbound_bytes(&c, Some(1024 * MIB)), 100 * MIB);
    }
}
